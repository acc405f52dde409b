"""A call from an independent WebRTC stack: GStreamer's webrtcbin (libnice, OpenSSL DTLS
with an RSA certificate), driven by tests/e2e/gst/webrtcbin_caller.py under Debian's
/usr/bin/python3 (python3-gi). It asks one spoken question and must hear the reply."""

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from support import FIXTURES

from agent.call.factory import SessionFactory
from signaling.server import create_app

pytestmark = pytest.mark.asyncio(loop_scope="session")
SYSTEM_PYTHON = "/usr/bin/python3"
CALLER = Path(__file__).parent / "gst" / "webrtcbin_caller.py"
QUESTION = FIXTURES / "question1.wav"
APT = ("gstreamer1.0-plugins-bad gstreamer1.0-nice gstreamer1.0-plugins-good gstreamer1.0-plugins-base "
       "python3-gi gir1.2-gst-plugins-bad-1.0 gir1.2-gstreamer-1.0")


def gst_missing() -> str | None:
    """Why webrtcbin cannot be driven here (None when it can)."""
    if not Path(SYSTEM_PYTHON).exists():
        return f"no {SYSTEM_PYTHON}"
    probe = subprocess.run([SYSTEM_PYTHON, str(CALLER), "--probe"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        last = (probe.stdout + probe.stderr).strip().splitlines()
        return f"GStreamer webrtcbin unavailable ({last[-1] if last else 'probe failed'}); apt-get install {APT}"
    return None


async def test_a_webrtcbin_caller_is_answered(models, tiny_settings, tmp_path):
    reason = gst_missing()
    if reason:
        pytest.skip(reason)
    server = TestServer(create_app(SessionFactory(models), tiny_settings), host="127.0.0.1")
    await server.start_server()
    try:
        caller = await asyncio.create_subprocess_exec(
            SYSTEM_PYTHON, str(CALLER), str(server.make_url("")).rstrip("/"), str(QUESTION),
            "--seconds", "75", "--record", str(tmp_path / "heard.wav"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(caller.communicate(), 120)
    finally:
        await server.close()
    assert caller.returncode == 0, err.decode()[-2000:]
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report["error"] is None and "connected" in report["states"], report  # ICE and DTLS both done
    assert report["loud_after_speech"] >= 25, report  # half a second of the agent's voice
    assert any(m["type"] == "turn" for m in report["messages"]), report  # the events channel works too
