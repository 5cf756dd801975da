"""The web UI in a real browser (headless Chromium driven by Playwright) on the tiny random model.

Skipped, with the reason, only when Chromium or Playwright is missing. A screenshot goes to test-output/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamchat.config import load_settings
from streamchat.frontends.web_screenshot import CHROMIUM_ARGS

CHROMIUM = "/usr/bin/chromium"
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
WAIT_MS = 45_000  # generous: the machine may be busy; a healthy run takes a few seconds per step

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::pandas.errors.Pandas4Warning", "ignore:Type a message first:UserWarning"
)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip(f"Chromium is missing ({CHROMIUM}): apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is missing: .venv/bin/pip install -r requirements-dev.txt")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def url():
    from streamchat.frontends.web import build_app, launch

    from test_ui_api import endless_talker

    # Replies long enough to press Stop in the middle; a small window so that turns evict.
    settings = load_settings(overrides={"sinks": 4, "window": 60, "max_new_tokens": 100_000, "seed": 0})
    blocks = build_app(endless_talker(), settings)
    _, address, _ = launch(blocks, port=None, prevent_thread_lock=True, quiet=True)
    yield address
    blocks.close()
    blocks.chat_app.sessions.close()


def stat(page, name: str) -> float:
    """A number of the memory panel (its first word)."""
    return float(page.locator(f'[data-stat="{name}"]').inner_text().split()[0].replace(",", ""))


def plot_line(page) -> str:
    """The drawn path of the memory plot's lines (changes when new points arrive)."""
    paths = page.locator("#token-plot .mark-line path")
    return "".join(paths.nth(i).get_attribute("d") or "" for i in range(paths.count()))


def wait_until(page, predicate, message: str, timeout_ms: int = WAIT_MS) -> None:
    """Poll `predicate()` (Python, reading the page) until true; fail with `message` otherwise.

    Waits on elements, not on network idle: the panel's timer keeps the network busy for ever.
    """
    for _ in range(timeout_ms // 100):
        if predicate():
            return
        page.wait_for_timeout(100)
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "ui-browser-failure.png"), full_page=True)
    pytest.fail(f"{message} (screenshot: test-output/ui-browser-failure.png)")


def test_chat_memory_panel_stop_and_demo(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    try:
        page.goto(url, wait_until="domcontentloaded")
        page.locator('[data-stat="seen_total"]').wait_for(timeout=WAIT_MS)
        assert stat(page, "seen_total") == 0 and stat(page, "turns") == 0
        page.locator("#send").click()  # nothing typed: refused with a message, nothing breaks
        wait_until(page, lambda: "Type a message first" in page.locator("#status").inner_text(), "no refusal shown")

        # A streamed reply, with the memory panel and the plot updating while it streams.
        page.locator("#message textarea").fill("Tell me a story about a dragon.")
        page.locator("#message textarea").press("Enter")
        bot = page.locator('#chat [data-testid="bot"]')
        page.locator('#chat [data-testid="user"]').first.wait_for(timeout=WAIT_MS)
        wait_until(page, lambda: bot.count() > 0 and len(bot.last.inner_text().strip()) > 0, "no reply appeared")
        first_text = bot.last.inner_text()
        wait_until(page, lambda: len(bot.last.inner_text()) > len(first_text), "the reply did not stream")
        seen = stat(page, "seen_total")
        line = plot_line(page)
        wait_until(page, lambda: stat(page, "seen_total") > seen, "the memory panel did not update while generating")
        wait_until(page, lambda: plot_line(page) and plot_line(page) != line, "the plot did not update")
        assert stat(page, "kv_mb") > 0 and stat(page, "rss_mb") > 10
        assert "/ 64" in page.locator('[data-stat="cache_tokens"]').inner_text()
        assert "generating" in page.locator("#memory-panel").inner_text()

        # Stop really stops; the next message works.
        page.locator("#stop").click()
        wait_until(page, lambda: "stopped" in page.locator("#status").inner_text(), "Stop did not stop the reply")
        assert page.locator("#chat").get_by_text("(stopped)").count() == 1
        wait_until(page, lambda: stat(page, "turns") == 1, "the panel did not count the stopped turn")
        assert stat(page, "evicted_total") > 0, "a long reply in a 64-token cache must evict"
        assert page.locator("#chat").get_by_text("earlier tokens evicted this turn").count() >= 1
        replies = bot.count()
        page.locator("#message textarea").fill("Hello there!")
        page.locator("#send").click()
        wait_until(page, lambda: bot.count() > replies and bot.last.inner_text().strip(), "no reply after a Stop")
        page.locator("#stop").click()
        wait_until(page, lambda: stat(page, "turns") == 2, "the second turn did not finish")

        # The endless demo runs scripted turns until Stop.
        page.locator("#demo").click()
        wait_until(page, lambda: "endless demo running" in page.locator("#memory-panel").inner_text(), "no demo")
        demo_turns = page.locator('#chat [data-testid="user"]').filter(has_text="demo:")
        wait_until(page, lambda: demo_turns.count() >= 1, "the demo sent no scripted turn")
        OUTPUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUTPUT / "ui-browser.png"), full_page=True)
        page.locator("#stop").click()
        wait_until(page, lambda: "Endless demo stopped" in page.locator("#status").inner_text(), "demo did not stop")
        wait_until(page, lambda: "idle" in page.locator("#memory-panel").inner_text(), "the panel still shows the demo")
        turns = stat(page, "turns")
        page.wait_for_timeout(2000)
        assert stat(page, "turns") == turns, "the demo went on after Stop"

        # Each tab has its own session; closing a tab frees it.
        sessions = page.locator('[data-stat="sessions"]')
        other = browser.new_page()
        other.set_default_timeout(WAIT_MS)
        other.goto(url, wait_until="domcontentloaded")
        other.locator('[data-stat="seen_total"]').wait_for(timeout=WAIT_MS)
        assert stat(other, "seen_total") == 0 and stat(other, "turns") == 0
        wait_until(page, lambda: sessions.inner_text().startswith("2 /"), "the second tab got no session")
        other.close()
        wait_until(page, lambda: sessions.inner_text().startswith("1 /"), "closing a tab did not free its session")
    finally:
        page.close()


def test_save_downloads_and_load_resumes_in_another_tab(browser, url, tmp_path):
    """Save conversation gives a file to download; Load conversation in a fresh tab resumes it: the same messages
    on the page, the same cache figures in the panel."""
    page, other = browser.new_page(), browser.new_page()
    for tab in (page, other):
        tab.set_default_timeout(WAIT_MS)
        tab.goto(url, wait_until="domcontentloaded")
        tab.locator('[data-stat="seen_total"]').wait_for(timeout=WAIT_MS)
    try:
        page.locator("#message textarea").fill("Tell me about the sea.")
        page.locator("#send").click()
        bot = page.locator('#chat [data-testid="bot"]')
        wait_until(page, lambda: bot.count() > 0 and len(bot.last.inner_text().strip()) > 20, "no reply appeared")
        page.locator("#stop").click()
        wait_until(page, lambda: stat(page, "turns") == 1, "the turn did not finish")
        seen = stat(page, "seen_total")

        page.locator("#save").click()
        link = page.locator('#saved a[download="conversation.streamchat"]')
        wait_until(page, lambda: link.count() > 0, "no download link after Save")
        with page.expect_download() as download:
            link.first.click()
        saved = tmp_path / "conversation.streamchat"
        download.value.save_as(saved)
        assert saved.stat().st_size > 1000

        with other.expect_file_chooser() as chooser:
            other.locator("#load").click()
        chooser.value.set_files(str(saved))
        wait_until(other, lambda: "Loaded" in other.locator("#status").inner_text(), "Load did not resume the file")
        assert other.locator('#chat [data-testid="user"]').filter(has_text="Tell me about the sea.").count() == 1
        assert other.locator('#chat [data-testid="bot"]').count() == 1
        wait_until(other, lambda: stat(other, "seen_total") == seen, "the panel does not show the resumed cache")
        assert stat(other, "turns") == 1
    finally:
        page.close()
        other.close()
