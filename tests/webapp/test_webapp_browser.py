"""The example app's page in headless Chromium: live lines appear as the run prints them, and
the Cancel button stops the run (issue 12 item 6). Set ``PRISMQ_SCREENSHOT=path`` to keep a
screenshot (docs/img/fastapi_app.png is made this way)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright import sync_api as playwright
from webapp_support import AppServer, wait_gone

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None, reason="no chromium on PATH (Debian: apt install chromium)"
    ),
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX pids"),
]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[AppServer]:
    app = AppServer(tmp_path / "data", workers=2)
    yield app
    app.close()


def test_page_shows_live_lines_and_cancels(server: AppServer) -> None:
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(server.url)
            # A short run that completes, then a long one with a child process.
            page.select_option("#module", "count")
            page.fill("#params", '{"lines": 5, "delay": 0.05}')
            page.click("#start")
            page.wait_for_selector("#output .end", timeout=30_000)
            assert page.text_content("#status") == "completed"
            assert page.locator("#output div[data-seq]").all_text_contents() == [
                f"line {i} of 5" for i in range(1, 6)
            ]
            page.fill("#params", '{"lines": 100000, "delay": 0.05, "child": true}')
            page.click("#start")
            page.wait_for_selector('#output div[data-seq="12"]', timeout=30_000)
            shown = page.locator("#output div[data-seq]").all_text_contents()
            assert shown[0].startswith("child pid ")
            assert shown[1:13] == [f"line {i} of 100000" for i in range(1, 13)]
            child = int(shown[0].split()[2])
            row = page.locator("#runs tr.selected")
            run_id = row.get_attribute("data-run-id")
            assert run_id is not None
            with server.client() as client:
                pid = client.get(f"/api/runs/{run_id}").json()["pid"]
            assert page.text_content("#status") == "running"
            screenshot = os.environ.get("PRISMQ_SCREENSHOT")
            if screenshot:
                page.screenshot(path=screenshot)
            page.click("#cancel")
            page.wait_for_function(
                "document.getElementById('status').textContent === 'cancelled'", timeout=30_000
            )
            page.wait_for_selector("#output .end", timeout=30_000)
            assert page.locator("#output .end").text_content() == "[run cancelled, exit code -15]"
            assert page.is_disabled("#cancel")
            assert wait_gone([pid, child])
            page.wait_for_selector(f'#runs tr[data-run-id="{run_id}"] td.cancelled')
        finally:
            browser.close()
