"""The playground page at ``/``, driven in headless Chromium against a real server process."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A CPU generation with a fusion on a cache miss takes seconds, and longer on a busy machine.
GENERATION_TIMEOUT_MS = 120_000

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'"
)
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package", allow_module_level=True)

expect = sync_api.expect


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def console_errors() -> list[str]:
    """Collect the page's console errors and uncaught exceptions, such as CSP violations."""
    return []


@pytest.fixture
def page(browser, server, console_errors):
    """Open the playground in a fresh browser context."""
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    opened = context.new_page()

    def record_console(message) -> None:
        if message.type == "error":
            console_errors.append(message.text)

    opened.on("console", record_console)
    opened.on("pageerror", lambda error: console_errors.append(str(error)))
    opened.goto(server.url + "/")
    yield opened
    context.close()


def generate(page, preference: str) -> None:
    """Set the slider, submit, and wait until the stream has ended."""
    page.locator("#preference").fill(preference)
    page.locator("#submit").click()
    expect(page.locator("#state")).to_have_text("done", timeout=GENERATION_TIMEOUT_MS)


def test_playground_served_as_html(server):
    response = httpx.get(server.url + "/", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", response.text)


def test_playground_labels_slider_ends(page):
    expect(page.locator(".end.harmless")).to_contain_text("most harmless")
    expect(page.locator(".end.helpful")).to_contain_text("most helpful")
    assert page.locator("#preference").get_attribute("min") == "0"
    assert page.locator("#preference").get_attribute("max") == "1"


def shown(coefficients: dict[str, float]) -> str:
    """Return the playground's line for ``coefficients``."""
    return (
        f"helpfulness α = {coefficients['helpfulness']:.2f}, "
        f"harmlessness β = {coefficients['harmlessness']:.2f}"
    )


def test_playground_streams_and_shows_coefficients(page, console_errors, slider_ends):
    page.locator("#max-tokens").fill("24")
    page.locator("#temperature").fill("0")
    # count how often the output changes, to tell a live stream from one late write
    page.evaluate(
        """() => {
            window.outputUpdates = 0;
            new MutationObserver(() => { window.outputUpdates += 1; })
                .observe(document.getElementById("output"),
                         {childList: true, characterData: true, subtree: true});
        }"""
    )

    generate(page, "1")
    helpful_text = page.locator("#output").inner_text()
    helpful_coefficients = page.locator("#coefficients").inner_text()
    updates = page.evaluate("window.outputUpdates")
    assert helpful_text.strip()
    assert updates > 2
    assert helpful_coefficients == shown(slider_ends[1.0])
    assert page.locator("#cache").inner_text() in ("hit", "miss")
    assert page.locator("#finish-reason").inner_text() in ("stop", "length")

    generate(page, "0")
    harmless_coefficients = page.locator("#coefficients").inner_text()
    assert harmless_coefficients != helpful_coefficients
    assert harmless_coefficients == shown(slider_ends[0.0])
    assert page.locator("#output").inner_text().strip()

    generate(page, "0")
    assert page.locator("#cache").inner_text() == "hit"
    assert console_errors == []

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)


def test_playground_shows_json_error(page):
    page.locator("#max-tokens").fill("1000000")
    page.locator("#submit").click()
    error = page.locator("#error")
    expect(error).to_be_visible(timeout=30_000)
    expect(error).to_contain_text("HTTP 422")
    expect(error).to_contain_text("max_new_tokens")
    expect(page.locator("#state")).to_have_text("failed")
    assert page.locator("#submit").is_enabled()
