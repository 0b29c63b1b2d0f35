"""The browser chat page in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by playwright.

    python -m pytest tests/test_web_demo.py -q

One test starts the real launcher (scripts/web_demo.py) on the session's tiny checkpoint and chats through the page;
the others use an in-process server around test_serve's FakeModel, so the page's <think> block, tool calls,
streaming growth and stop button are checked on replies that are known in advance. Screenshots go to the test's
tmp dir.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does as root)")
sync_api = pytest.importorskip("playwright.sync_api")

from conftest import script_env  # noqa: E402
from test_serve import TOOLS, FakeModel, serve, serve_in_thread  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def fake_page_server():
    from trainer.trainer_utils import load_tokenizer
    tok = load_tokenizer(str(ROOT / "model"))
    model = FakeModel(tok, context=2048)
    url, server = serve_in_thread(serve.create_app(model, tok, "fake-model", max_tokens_limit=1000))
    yield url, model
    server.should_exit = True


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")
    n = page.locator(".msg.assistant").count()
    page.locator(".msg.assistant.done").nth(n - 1).wait_for(timeout=30_000)
    return page.locator(".msg.assistant").nth(n - 1)


@pytest.mark.slow
def test_launcher_serves_page_and_real_model_replies(tiny_sft, browser, tmp_path):
    """python scripts/web_demo.py --weight full_sft ... --no_browser: one process serves the page and the API."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "web_demo.py"), "--weight", "full_sft",
                             "--save_dir", str(tiny_sft / "out"), "--port", str(port), "--no_browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=script_env(tmp_path))
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.time() + 90
        while not any("chat page:" in line for line in lines):
            assert proc.poll() is None and time.time() < deadline, "".join(lines)
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/"
        assert any(url in line for line in lines)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.getElementById('model-name').textContent === 'full_sft_64'")
        # greedy, so the page must show exactly what the same request through the API returns (a barely trained
        # model may well answer with whitespace or only a <think> block: what matters is that the page shows it all)
        page.fill("#max_tokens", "40")
        page.evaluate("const t = document.getElementById('temperature'); t.value = '0';"
                      "t.dispatchEvent(new Event('input'))")
        question = "你好，请介绍一下你自己。"
        reply = send(page, question)
        meta = reply.locator(".meta").inner_text()
        assert "finish: " in meta and "prompt +" in meta and "error" not in meta, meta
        body = {"model": "full_sft_64", "messages": [{"role": "user", "content": question}], "temperature": 0,
                "max_tokens": 40}
        request = urllib.request.Request(url + "v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            api = json.load(r)
        message, usage = api["choices"][0]["message"], api["usage"]
        assert usage["completion_tokens"] >= 1
        assert f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} reply" in meta
        assert f"finish: {api['choices'][0]['finish_reason']}" in meta
        assert reply.locator(".content").text_content() == (message["content"] or "")
        think = reply.locator("details.think .think-text")
        shown = think.text_content() if think.count() else ""
        assert shown == (message.get("reasoning_content") or "")
        page.screenshot(path=str(tmp_path / "real_model.png"), full_page=True)
        assert (tmp_path / "real_model.png").stat().st_size > 5000
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the server's own line and 130, not a training run's message
        assert proc.wait(30) == 130
        time.sleep(0.2)
        assert lines[-1].strip() == "server stopped" and "Traceback" not in "".join(lines), "".join(lines[-20:])
    finally:
        if proc.poll() is None:
            proc.kill()


def test_page_streams_thinks_and_shows_tool_calls(fake_page_server, browser, tmp_path):
    url, model = fake_page_server
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'fake-model'")

    # streaming: record the reply's length at every DOM change; it must grow in several steps
    page.evaluate("""() => { window.lengths = [];
        new MutationObserver(() => { const c = document.querySelectorAll('.msg.assistant .content');
            if (c.length) window.lengths.push(c[c.length - 1].textContent.length); })
        .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#max_tokens", "30")
    reply = send(page, "slow please")
    lengths = page.evaluate("window.lengths")
    ticks = model.tok("tick " * 40, add_special_tokens=False)["input_ids"][:30]
    assert reply.locator(".content").inner_text() == model.tok.decode(ticks).strip()
    assert len(set(lengths)) >= 5 and lengths == sorted(lengths), lengths

    # <think> as a collapsible block, folded once the answer is there; history of 1 turn goes with the request
    page.fill("#max_tokens", "200")
    reply = send(page, "think: what is 3 + 4?")
    think = reply.locator("details.think")
    assert think.locator(".think-text").text_content() == "The user asks 3 + 4. That is 7."
    assert think.get_attribute("open") is None and reply.locator(".content").inner_text() == "3 + 4 = 7."
    think.locator("summary").click()
    assert think.get_attribute("open") is not None
    page.evaluate("document.getElementById('history').value = '1'")
    reply = send(page, "and again")
    prompt = model.prompts[-1]
    assert "think: what is 3 + 4?" in prompt and "slow please" not in prompt

    # tools from the settings box -> the call is shown
    page.locator("details:has(#tools) summary").click()
    page.fill("#tools", json.dumps(TOOLS))
    reply = send(page, "weather in Paris?")
    assert "get_weather" in reply.locator(".tool-call").inner_text()
    assert '"city": "Paris"' in reply.locator(".tool-call").inner_text()
    assert "finish: tool_calls" in reply.locator(".meta").inner_text()
    page.screenshot(path=str(tmp_path / "think_and_tools.png"), full_page=True)


def test_stop_button_ends_generation(fake_page_server, browser):
    url, model = fake_page_server
    page = browser.new_page()
    page.goto(url + "/")
    page.fill("#max_tokens", "1000")
    page.fill("#input", "slow and long")
    page.press("#input", "Enter")
    page.wait_for_function("(document.querySelector('.msg.assistant .content') || {}).textContent?.length > 20")
    runs = len(model.runs)
    page.click("#stop")
    page.locator(".msg.assistant.done").wait_for(timeout=10_000)
    assert "(stopped)" in page.locator(".msg.assistant .meta").inner_text()
    deadline = time.time() + 10
    while not model.runs[runs - 1][1]:
        assert time.time() < deadline, "the server kept generating after the page stopped"
        time.sleep(0.05)
    assert model.runs[runs - 1][0] < 500
