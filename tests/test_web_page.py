"""The chat page at / in a real headless Chromium: type a message, see a streamed reply."""

import os
import shutil
from pathlib import Path

import pytest
from test_serve import MODEL, running_server, wait_ready

from camelid.formats.load import load_model
from camelid.generate.generate import generate
from camelid.generate.sampling import SamplingParams

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
def test_chat_page_streams_a_reply(tmp_path):
    from playwright.sync_api import sync_playwright

    expected = generate(load_model(MODEL), ["Once upon a time"], 12, SamplingParams.greedy())[0].text
    with running_server() as (base, _), sync_playwright() as p:
        wait_ready(base)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(base + "/")
        page.wait_for_selector("#model:has-text('stories')")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "12")
        page.fill("#input", "Once upon a time")
        page.press("#input", "Enter")
        page.wait_for_selector(".stats", timeout=30000)
        assert page.inner_text(".msg.user") == "Once upon a time"
        assert page.eval_on_selector(".msg.assistant", "e => e.textContent") == expected
        assert "tokens/s" in page.inner_text(".stats")
        shot = Path(os.environ.get("CAMELID_SCREENSHOT_DIR", tmp_path)) / "chat_page.png"
        page.screenshot(path=str(shot))
        browser.close()
