"""Screenshot the running UI during the endless demo (how docs/screenshot.png is made).

    python app.py &                      # the real app, embedded model
    python -m streamchat.frontends.web_screenshot --seconds 300 --out docs/screenshot.png

Drives headless Chromium (/usr/bin/chromium) with Playwright: opens the page, starts the endless demo, waits,
takes the screenshot, then presses Stop.
"""

from __future__ import annotations

import argparse
import sys
import time

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--out", default="test-output/screenshot.png")
    parser.add_argument("--seconds", type=float, default=300, help="how long the demo runs before the shot")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(args.url, wait_until="domcontentloaded")
        page.locator('[data-stat="seen_total"]').wait_for(timeout=60_000)
        page.locator("#demo").click()
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            time.sleep(min(30.0, args.seconds))
            seen = page.locator('[data-stat="seen_total"]').inner_text()
            print(f"{time.monotonic() - started:5.0f} s: {seen} tokens seen", flush=True)
        page.screenshot(path=args.out, full_page=True)
        page.locator("#stop").click()
        page.wait_for_timeout(2000)
        browser.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
