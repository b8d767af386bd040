"""What a test does when something outside the project is missing: skip, or fail in CI.

A newcomer's machine may lack PostgreSQL, Redis or a Chromium; the tests that need it
skip with the reason (`pytest -ra` prints it). CI must run everything, so there the same
test fails instead of skipping silently.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """Whether this run is CI's: the CI variable is set to anything but empty, 0 or false."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(problem: str, *, ci_must: str) -> NoReturn:
    """Skip the test for this problem, or fail it in CI, which must `ci_must`."""
    if in_ci():
        pytest.fail(f"{problem}; CI must {ci_must}")
    pytest.skip(problem)
