"""How the browser tests find Chromium, and what they do without one: skip with the reason
on a newcomer's machine, fail in CI (the way the PostgreSQL tests do)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.browser import CHROMIUM_VARIABLE, NoChromium, chromium_path

REPO = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/chromium"

# A browser test of its own, run by a pytest in a subprocess with the project's fixtures.
TINY_BROWSER_TEST = """
from playwright.async_api import Browser


async def test_a_page_opens(chromium: Browser) -> None:
    page = await chromium.new_page()
    assert await page.evaluate("1 + 1") == 2
"""
TINY_CONFIG = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
"""


def _run_tiny_browser_test(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text(TINY_CONFIG)
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.support.browser"]\n')
    (tmp_path / "test_tiny_browser.py").write_text(TINY_BROWSER_TEST)
    environment = {key: value for key, value in os.environ.items() if key != "CI"}
    environment |= {CHROMIUM_VARIABLE: MISSING, "PYTHONPATH": str(REPO)}
    if ci is not None:
        environment["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-ra", str(tmp_path)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("ci", [None, "false"])
def test_without_chromium_the_browser_tests_skip_with_the_reason_outside_ci(
    tmp_path: Path, ci: str | None
) -> None:
    run = _run_tiny_browser_test(tmp_path, ci)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 skipped" in run.stdout, run.stdout
    reasons = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED [1] ")]
    assert len(reasons) == 1
    assert f"{CHROMIUM_VARIABLE}={MISSING} is not" in reasons[0]


def test_without_chromium_the_browser_tests_fail_in_ci(tmp_path: Path) -> None:
    run = _run_tiny_browser_test(tmp_path, "true")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 error" in run.stdout, run.stdout
    assert "skipped" not in run.stdout
    assert f"{CHROMIUM_VARIABLE}={MISSING} is not an executable file" in run.stdout
    assert "CI must run the browser tests" in run.stdout


def test_the_named_chromium_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    named = tmp_path / "my-chromium"
    named.write_text("#!/bin/sh\n")
    named.chmod(0o755)
    monkeypatch.setenv(CHROMIUM_VARIABLE, str(named))
    assert chromium_path(playwright_own=MISSING) == str(named)


def test_a_named_file_that_cannot_run_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    named = tmp_path / "not-executable"
    named.write_text("")
    monkeypatch.setenv(CHROMIUM_VARIABLE, str(named))
    with pytest.raises(NoChromium, match="is not an executable file"):
        chromium_path(playwright_own=MISSING)


def test_playwright_s_own_chromium_is_used_when_nothing_else_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = tmp_path / "chrome"
    own.write_text("#!/bin/sh\n")
    own.chmod(0o755)
    monkeypatch.delenv(CHROMIUM_VARIABLE, raising=False)
    found = chromium_path(playwright_own=str(own))
    # Debian's comes first where it is installed.
    assert found in ("/usr/bin/chromium", str(own))
    if not os.access("/usr/bin/chromium", os.X_OK):
        assert found == str(own)
