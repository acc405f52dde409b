"""Call records and recordings of a real `voice-agent serve` process, and what is left of
them when it is killed mid-call (kill -9: no clean-up runs). The records' fields after a
WebRTC call are checked in test_webrtc.py, after a SIP call in e2e/test_sipp.py."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import soundfile

from signaling.webrtc.loopback import Caller

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(http: aiohttp.ClientSession, url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]  # noqa: ASYNC240 (only when it failed)
        assert time.monotonic() < deadline, "the models did not load in 240 s"
        try:
            async with http.get(url + "/health") as r:
                if (await r.json())["status"] == "ready":
                    return
        except (aiohttp.ClientError, ValueError):
            pass
        await asyncio.sleep(0.5)


async def test_a_server_killed_mid_call_leaves_whole_record_lines_and_a_readable_recording(tmp_path, speech):
    port = free_port()
    records, recordings, log = tmp_path / "calls.jsonl", tmp_path / "recordings", tmp_path / "stderr.log"
    env = {**os.environ, "VOICE_AGENT_RECORDS__PATH": str(records), "VOICE_AGENT_RECORDS__AUDIO": "true",
           "VOICE_AGENT_RECORDS__AUDIO_DIR": str(recordings)}
    env.pop("VOICE_AGENT_PROFILE", None)
    with open(log, "wb") as err:
        # Popen, not asyncio's: the test kills it with SIGKILL and reads nothing from it.
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--profile", "tiny",  # noqa: ASYNC220
                                 "--host", "127.0.0.1",
                                 "--port", str(port), "--sip-port", "0"],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, url, proc, log)
            # A first call, finished: one record line, one whole recording.
            first = Caller(url)
            first.mic.say(speech[0], pause_s=0.5)
            await first.dial(http)
            await first.wait_for(lambda: any(m["type"] == "turn" for m in first.messages), 90)
            async with http.delete(f"{url}/calls/{first.call_id}") as r:
                assert r.status == 200
            await first.close()
            # A second call, cut by kill -9 while the caller is still talking.
            second = Caller(url)
            second.mic.say(np.concatenate([speech[1]] * 3))
            await second.dial(http)
            await second.wait_for(lambda: any(m["type"] == "speech_started" for m in second.messages), 60)
            await asyncio.sleep(2.5)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            await second.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    lines = records.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [first.call_id]  # whole lines only, the finished call's
    record = json.loads(lines[0])
    assert record["audio"] == str((recordings / f"{first.call_id}.wav").resolve())
    audio, rate = soundfile.read(record["audio"], dtype="int16")
    assert audio.shape[1] == 2 and len(audio) / rate == pytest.approx(record["duration_s"], abs=1.0)
    # The killed call's recording reads as a WAV, and holds all but its last second or so.
    cut, rate = soundfile.read(recordings / f"{second.call_id}.wav", dtype="int16")
    assert cut.shape[1] == 2 and rate == 24000
    assert len(cut) / rate >= 2.5 - 1.0
    assert np.abs(cut[:, 0]).max() > 1000  # the caller's voice was on the left
