"""The dashboard in a real headless Chromium (Playwright): log in, find a failed run, replay it, watch it succeed.

Uses the machine's Chromium (``/usr/bin/chromium``, Debian's package), never a
browser Playwright downloads; without it the test is skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Vivoflow
from tests.test_dashboard import TOKEN, booking, failed_booking, secured  # noqa: F401 - `secured` is a fixture

CHROMIUM = Path(os.environ.get("VIVOFLOW_TEST_CHROMIUM", "/usr/bin/chromium"))
#: Quiet, offline Chromium: no sandbox (containers run as root), no GPU, no calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture
def page() -> Iterator[Any]:
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) to run browser tests"
        print(reason)
        pytest.skip(reason)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(20_000)
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()


def test_log_in_filter_failed_open_and_replay(page: Any, secured: Vivoflow, smtp_sink: Any,  # noqa: F811
                                             tmp_path: Path) -> None:
    delivery_id, failed = failed_booking(secured, smtp_sink, n=1)
    booking(secured, n=2)  # two more runs that succeeded, for the filter to hide

    page.goto(secured.url + "/")
    assert "/login" in page.url  # the token is set: the list asks for it first
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("table#runs tr.run")
    assert page.locator("table#runs tr.run").count() == 4

    page.select_option("select[name=status]", "failed")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**/?*status=failed*")
    assert page.locator("table#runs tr.run").count() == 1
    assert page.locator("table#runs tr.run .badge").inner_text() == "failed"

    page.click(f"a[href='/runs/{failed['id']}']")
    page.wait_for_selector("#step-confirm")
    assert "no such user" in page.locator("#step-confirm pre.error").inner_text()
    assert "jamie.rivera@example.com" in page.locator("pre.raw-body").inner_text()

    page.click("button#replay")
    # The page reloads itself until the replay's run has finished; Playwright waits across the reloads.
    page.wait_for_selector("#replays tr.replay-run .badge.succeeded")
    new = [r for r in secured.runs(delivery_id) if r["replay_of"] == failed["id"]]
    assert [r["status"] for r in new] == ["succeeded"]
    assert page.locator(f"#replays a[href='/runs/{new[0]['id']}']").count() == 1
    assert "made the run(s) below" in page.locator("p.notice").inner_text()

    screenshot = tmp_path / "replayed.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.exists() and screenshot.stat().st_size > 10_000
    if keep := os.environ.get("VIVOFLOW_TEST_SCREENSHOTS"):  # to look at it: a folder to copy it into
        shutil.copy(screenshot, Path(keep) / screenshot.name)
