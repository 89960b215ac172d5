"""The chat page at / in a real headless Chromium: type a message, see a streamed reply."""

import os
import shutil
from pathlib import Path

import pytest

from camelid.formats.load import load_model
from camelid.generate.generate import generate
from camelid.generate.sampling import SamplingParams

from test_serve import MODEL, running_server, wait_ready

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def send(page, text, temperature="0", max_tokens="12"):
    page.fill("#temperature", temperature)
    page.fill("#max_tokens", max_tokens)
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_chat_page_streams_a_reply_and_keeps_the_conversation(browser, tmp_path):
    expected = generate(load_model(MODEL), ["Once upon a time"], 12, SamplingParams.greedy())[0].text
    with running_server() as (base, _):
        wait_ready(base)
        context = browser.new_context()
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
        page = context.new_page()
        page.goto(base + "/")
        page.wait_for_selector("#model:has-text('stories')")
        send(page, "Once upon a time")
        page.wait_for_selector(".stats", timeout=30000)
        assert page.inner_text(".msg.user") == "Once upon a time"
        assert page.eval_on_selector(".msg.assistant", "e => e.dataset.raw") == expected
        assert "tokens/s" in page.inner_text(".stats")
        page.click(".msg.assistant > .copy")  # the reply's copy button puts its text on the clipboard
        assert page.evaluate("navigator.clipboard.readText()") == expected
        shot = Path(os.environ.get("CAMELID_SCREENSHOT_DIR", tmp_path)) / "chat_page.png"
        page.screenshot(path=str(shot))

        # The stop button ends a reply mid-stream; the server cancels its generation.
        send(page, "The cat", temperature="1", max_tokens="400")
        page.wait_for_selector("#stop:not([hidden])")
        page.wait_for_function("document.querySelectorAll('.msg.assistant')[1].dataset.raw.length > 0",
                               timeout=30000)
        page.click("#stop")
        page.wait_for_selector(".stats:has-text('[stopped]')", timeout=30000)
        assert page.is_visible("#send") and not page.is_visible("#stop")

        # The conversation survives a reload, and a new one is listed beside it.
        page.reload()
        page.wait_for_selector(".msg.assistant")
        assert page.eval_on_selector_all(".msg.user", "es => es.map(e => e.textContent)") == [
            "Once upon a time", "The cat"]
        assert page.eval_on_selector(".msg.assistant", "e => e.dataset.raw") == expected
        page.click("#reset")
        send(page, "One day")
        page.wait_for_selector(".stats", timeout=30000)
        page.reload()
        page.wait_for_selector("#conversations li")
        assert page.eval_on_selector_all("#conversations li span", "es => es.map(e => e.textContent)") == [
            "One day", "Once upon a time"]
        context.close()


def test_replies_render_markdown_and_code_without_running_html(browser):
    with running_server() as (base, _):
        wait_ready(base)
        page = browser.new_page()
        page.goto(base + "/")
        page.wait_for_selector("#model:has-text('stories')")
        html = page.evaluate("""() => {
            const d = document.createElement("div");
            render(d, "# Title\\n\\n**bold** and `x`\\n\\n```python\\nprint(1)\\n```\\n\\n<img src=x onerror=alert(1)>");
            return d.innerHTML; }""")
        assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>x</code>" in html
        assert '<pre><code class="language-python">print(1)' in html and html.count('class="copy"') == 2
        assert "onerror" not in html  # sanitized
        page.close()
