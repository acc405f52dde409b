"""The web client in a real browser: Debian's Chromium driven by Playwright, calling the
real signaling server (tiny profile) over WebRTC, with a recording as the microphone.

Needs /usr/bin/chromium (`apt-get install chromium`) and `pip install playwright`; the
module is skipped when either is missing. Playwright's own browser download is not used.
Set VOICE_AGENT_WEB_SCREENSHOT=/some/path.png to keep a screenshot of the page in a call.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)", allow_module_level=True)
try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright
except ImportError as e:
    pytest.skip(f"playwright cannot be imported ({e}); pip install playwright", allow_module_level=True)

from aiohttp import web
from support import FIXTURES

from agent.audio import read_audio, write_wav
from agent.call.factory import SessionFactory
from agent.config import load_settings
from agent.models.manager import UnifiedModelManager
from signaling.server import create_app

MIC_RATE = 48_000
CALL_TIMEOUT_S = 40

# Inbound audio of the page's peer connection (the agent's voice), or null.
INBOUND_AUDIO_JS = """async () => {
    const pc = window.voiceAgent.pc;
    if (!pc) return null;
    let found = null;
    (await pc.getStats()).forEach((r) => {
        if (r.type === "inbound-rtp" && r.kind === "audio") {
            found = {energy: r.totalAudioEnergy || 0, samples: r.totalSamplesReceived || 0,
                     packets: r.packetsReceived || 0};
        }
    });
    return found;
}"""

# Text of the agent's lines in the transcript (from reply_text or turn events).
AGENT_LINES_JS = """() => [...document.querySelectorAll('#transcript [data-role="agent"] .bubble')]
    .map((b) => b.textContent.trim()).filter((t) => t && t !== "…")"""

# The loudest the microphone meter showed, recorded by the page from now on.
WATCH_MIC_JS = """() => {
    window.__micPeak = 0;
    const meter = document.getElementById("mic-meter");
    new MutationObserver(() => {
        window.__micPeak = Math.max(window.__micPeak, Number(meter.getAttribute("aria-valuenow")) || 0);
    }).observe(meter, {attributes: true, attributeFilter: ["aria-valuenow"]});
}"""


class ServerThread:
    """The real aiohttp app on 127.0.0.1 (a free port), in a thread with its own event loop."""

    def __init__(self, app: web.Application) -> None:
        self.runner = web.AppRunner(app)
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._thread = threading.Thread(target=self.loop.run_forever, name="signaling-server", daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    async def _start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self.loop.close()

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
            return json.load(resp)


@pytest.fixture(scope="module")
def server():
    settings = load_settings("tiny", env={})
    models = UnifiedModelManager(settings)
    models.load()
    thread = ServerThread(create_app(SessionFactory(models), settings)).start()
    yield thread
    thread.stop()
    models.unload()


@pytest.fixture(scope="module")
def fake_mic(tmp_path_factory) -> Path:
    """question1.wav with 1 s of silence before and 6 s after, 48 kHz mono 16-bit."""
    speech = read_audio(FIXTURES / "question1.wav", MIC_RATE)
    silence = np.zeros(MIC_RATE, dtype=np.int16)
    path = tmp_path_factory.mktemp("mic") / "caller.wav"
    write_wav(path, np.concatenate([silence, speech, np.tile(silence, 6)]), MIC_RATE)
    return path


@pytest.fixture(scope="module")
def browser(fake_mic):
    pw = sync_playwright().start()
    browser = pw.chromium.launch(
        executable_path=str(CHROMIUM),
        headless=True,
        args=[
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={fake_mic.resolve()}%noloop",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )
    yield browser
    browser.close()
    pw.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 900, "height": 1000})
    page = context.new_page()
    page.errors = []  # uncaught exceptions in the page
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    context.close()


def state(page) -> str:
    return page.evaluate("window.voiceAgent.state")


def test_call_hears_the_agent_and_hangs_up(server, page, tmp_path):
    started = time.monotonic()
    page.goto(server.url + "/")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-kind", "ready", timeout=10_000)
    assert state(page) == "idle"

    # The voice list comes from /health, default voice selected.
    voices = server.health()
    voice = page.get_by_role("combobox", name="Voice")
    expect(voice).to_be_enabled()
    assert page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)") == voices["voices"]
    expect(voice).to_have_value(voices["default_voice"])

    call = page.get_by_role("button", name="Call", exact=True)
    expect(call).to_be_enabled()
    page.evaluate(WATCH_MIC_JS)
    call.click()
    page.wait_for_function("window.voiceAgent.state === 'in-call'", timeout=20_000)
    expect(voice).to_be_disabled()
    hang_up = page.get_by_role("button", name="Hang up call")
    expect(hang_up).to_be_visible()
    assert page.evaluate("window.voiceAgent.callId")
    assert server.health()["active_calls"] == 1

    # The agent's audio arrives (non-silent, still flowing) and its words appear.
    deadline = time.monotonic() + CALL_TIMEOUT_S
    first = last = None
    agent_lines: list[str] = []
    while time.monotonic() < deadline:
        stats = page.evaluate(INBOUND_AUDIO_JS)
        if stats:
            first = first or stats
            last = stats
        agent_lines = page.evaluate(AGENT_LINES_JS)
        heard = last is not None and last["energy"] > 0 and last["samples"] > first["samples"]
        if heard and agent_lines:
            break
        page.wait_for_timeout(500)
    events = [e["type"] for e in page.evaluate("window.voiceAgent.events")]
    assert last is not None, "no inbound audio in getStats()"
    assert last["samples"] > first["samples"], f"remote audio is not flowing: {first} -> {last}"
    assert last["energy"] > 0, f"the agent's audio is silent: {last}; events {events}"
    assert agent_lines, f"no agent line in the transcript; events {events}"
    assert "speech_started" in events
    assert page.locator('#transcript [data-role="caller"]').count() >= 1
    # The caller's line turns into their words once Voxtral has transcribed them.
    page.wait_for_selector('#transcript [data-role="caller"].transcribed', timeout=30_000)
    said = [e for e in page.evaluate("window.voiceAgent.events") if e["type"] == "transcript"]
    shown = page.locator('#transcript [data-role="caller"].transcribed .bubble').last.inner_text()
    assert said and " ".join(shown.split()) == (" ".join(said[-1]["text"].split()) or "(no words heard)")
    assert page.evaluate("window.__micPeak") > 10, "the microphone meter never moved"
    assert state(page) == "in-call"
    expect(status).to_have_attribute("data-kind", "live")

    # Give the turn a moment to finish so the screenshot shows its latency.
    try:
        page.wait_for_selector("#transcript .tag.latency", timeout=10_000)
        expect(page.locator("#latency-value")).to_have_text(re.compile(r"^\d+ ms$"))
    except PlaywrightError:
        pass  # still speaking: latency is not required
    shot = tmp_path / "in-call.png"
    page.screenshot(path=str(shot))
    if os.environ.get("VOICE_AGENT_WEB_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["VOICE_AGENT_WEB_SCREENSHOT"])

    hang_up.click()
    page.wait_for_function("window.voiceAgent.state === 'ended'", timeout=5_000)
    expect(page.get_by_role("button", name="Call", exact=True)).to_be_enabled()
    expect(voice).to_be_enabled()
    assert page.evaluate("window.voiceAgent.pc.connectionState") == "closed"
    expect(page.locator("#status-text")).to_contain_text("Call ended")
    deadline = time.monotonic() + 10
    while server.health()["active_calls"] != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.health()["active_calls"] == 0
    assert page.errors == []
    print(f"browser call test: {time.monotonic() - started:.1f} s, agent said {agent_lines[:2]}")


def test_errors_show_on_the_status_line(server, page):
    # The server cannot be reached: the status line says so.
    page.route("**/health", lambda route: route.abort())
    page.goto(server.url + "/")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-kind", "error", timeout=10_000)
    expect(page.locator("#status-text")).to_contain_text("Can't reach")
    assert state(page) == "error"

    # It comes back: ready again.
    page.unroute("**/health")
    expect(status).to_have_attribute("data-kind", "ready", timeout=10_000)
    assert state(page) == "idle"

    # The call limit: the 503's JSON reason is shown and no call is left behind.
    reason = "the agent is busy: 8 calls in progress, the limit"
    page.route("**/offer", lambda route: route.fulfill(
        status=503, content_type="application/json", body=json.dumps({"error": reason})))
    page.get_by_role("button", name="Call", exact=True).click()
    page.wait_for_function("window.voiceAgent.state === 'error'", timeout=10_000)
    expect(status).to_have_attribute("data-kind", "error")
    expect(page.locator("#status-text")).to_contain_text(reason)
    expect(page.get_by_role("button", name="Call", exact=True)).to_be_enabled()
    assert page.evaluate("window.voiceAgent.pc.connectionState") == "closed"
    assert server.health()["active_calls"] == 0
    assert page.errors == []
