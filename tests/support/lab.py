"""A lab page for testing the chat's ES modules on their own in Chromium, with no server.

Playwright serves the page itself: `/static/...` from the repository's static files, and
`/lab.js` from the test's own script, which imports the modules under test and puts what
the test needs on `window.lab`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from playwright.async_api import Page, Route

STATIC = Path(__file__).resolve().parents[2] / "src" / "blogchat" / "web" / "static"
ORIGIN = "http://blogchat.test"
LAB_PAGE = """<!doctype html><meta charset="utf-8"><title>lab</title>
<script type="module" src="/lab.js"></script>"""


async def open_lab(page: Page, script: str) -> Page:
    """Load the lab page with this module script; returns once it set `window.lab.ready`."""

    async def serve(route: Route) -> None:
        path = urlparse(route.request.url).path
        if path == "/lab.js":
            await route.fulfill(body=script, content_type="text/javascript")
        elif path.startswith("/static/"):
            file = (STATIC / path.removeprefix("/static/")).resolve()
            if STATIC in file.parents and file.is_file():
                await route.fulfill(path=file, content_type="text/javascript")
            else:
                await route.fulfill(status=404, body="not found")
        else:
            await route.fulfill(body=LAB_PAGE, content_type="text/html")

    await page.route(f"{ORIGIN}/**", serve)
    await page.goto(f"{ORIGIN}/lab")
    await page.wait_for_function("window.lab && window.lab.ready")
    return page


async def run(lab: Page, script: str, arg: Any = None) -> Any:
    """Evaluate a function body with `lab` and `arg` in scope; returns its (JSON) result."""
    return await lab.evaluate(f"(arg) => {{ {script} }}", arg)
