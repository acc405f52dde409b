"""A real softphone calls the agent: baresip dials it, speaks a question from a WAV file
(module aufile) and records what it hears (module sndfile), with no sound card and no
registration. Skips where baresip (Debian package baresip-core) is missing."""

import asyncio
import os
import shutil
import signal
import socket
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from support import FIXTURES

from agent.audio import read_audio
from agent.call.factory import SessionFactory
from signaling.sip.endpoint import SipServer

pytestmark = pytest.mark.asyncio(loop_scope="session")
FRAME = 160  # 20 ms at 8 kHz
VOICED_RMS = 300.0  # a 20 ms frame louder than this carries speech; G.711 silence is ~0


def baresip_modules() -> Path | None:
    """The folder holding the modules this test needs, or None."""
    for folder in ("/usr/lib/baresip/modules", "/usr/local/lib/baresip/modules",
                   "/usr/lib/x86_64-linux-gnu/baresip/modules", "/usr/lib/aarch64-linux-gnu/baresip/modules"):
        if all((Path(folder) / f"{name}.so").exists() for name in ("g711", "aufile", "sndfile", "menu", "alsa")):
            return Path(folder)
    return None


MODULES = baresip_modules() if shutil.which("baresip") else None


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (baresip listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def write_wav(path: Path, samples: np.ndarray, rate: int = 8000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())


def frame_rms(path: Path) -> np.ndarray:
    """RMS of each 20 ms frame of an 8 kHz mono 16-bit WAV file."""
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2), path
        audio = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
    frames = audio[:len(audio) // FRAME * FRAME].reshape(-1, FRAME)
    return np.sqrt((frames ** 2).mean(axis=1))


def baresip_config(folder: Path, sip_port: int, source: Path, records: Path) -> None:
    folder.mkdir()
    (folder / "config").write_text(
        f"poll_method epoll\n"
        f"sip_listen 127.0.0.1:{sip_port}\n"
        f"audio_source aufile,{source}\n"
        f"audio_player alsa,null\n"  # ALSA's null device: no sound card needed
        f"audio_alert alsa,null\n"
        f"module_path {MODULES}\n"
        f"module g711.so\nmodule aufile.so\nmodule alsa.so\nmodule sndfile.so\n"
        f"module_tmp account.so\nmodule_app menu.so\n"
        f"snd_path {records}\n")
    # An account with no registration (regint=0), G.711 only.
    (folder / "accounts").write_text("<sip:caller@127.0.0.1>;regint=0;audio_codecs=PCMU,PCMA;ptime=20\n")


async def wait_for(condition, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(step)
    return condition()


async def stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM lets baresip hang up (BYE) and close its WAV files; SIGKILL if it hangs."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest.mark.skipif(MODULES is None, reason="baresip with modules aufile, sndfile, g711, alsa and menu "
                                           "(Debian package baresip-core) is not installed")
async def test_baresip_asks_and_records_the_answer(models, tiny_settings, tmp_path):
    server = SipServer(SessionFactory(models), tiny_settings, "127.0.0.1", 0)
    await server.start()
    speech = read_audio(FIXTURES / "question1.wav", 8000)
    source = tmp_path / "question.wav"  # aufile needs the codec's rate: 8 kHz mono S16LE
    # 0.5 s of silence, the question, then silence while the agent answers; baresip hangs up
    # at the end of the file at the latest (the test hangs up as soon as the answer is over).
    write_wav(source, np.concatenate([np.zeros(4000, np.int16), speech, np.zeros(20 * 8000, np.int16)]))
    records = tmp_path / "records"
    records.mkdir()
    config = tmp_path / "baresip"
    baresip_config(config, free_port(), source, records)
    log_path = tmp_path / "baresip.log"
    process = None
    try:
        with open(log_path, "wb") as log:
            process = await asyncio.create_subprocess_exec(
                "baresip", "-4", "-n", "127.0.0.1", "-f", str(config), "-t", "40",
                "-e", f"/dial sip:agent@127.0.0.1:{server.port}",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "HOME": str(tmp_path)})

        def log_tail() -> str:
            return log_path.read_text(errors="replace").replace("\r", "\n")[-3000:]

        def the_call():
            calls = list(server.calls.values()) + list(server.ended)
            return calls[0] if calls else None

        assert await wait_for(lambda: the_call() is not None and the_call().answered, 10), \
            f"baresip's call was not answered\n{log_tail()}"
        call = the_call()
        # The agent heard the question, answered it, and finished speaking.
        assert await wait_for(lambda: call.session.turns and call.session.turns[0].played_text is not None
                              or call.ended, 25), f"no finished turn\n{log_tail()}"
        loud = -1
        while call.rtp.loud_sent != loud and not call.ended:  # until the voice stops going out
            loud = call.rtp.loud_sent
            await asyncio.sleep(0.6)
        assert not call.ended, f"the call ended before the answer was over\n{log_tail()}"
        await stop(process)  # baresip hangs up
        assert await wait_for(lambda: call.ended, 5), f"no BYE from baresip\n{log_tail()}"
        assert not server.calls

        turn = call.session.turns[0]
        assert turn.error is None and not turn.interrupted, turn
        assert 2.0 < turn.end - turn.start < 4.5, (turn.start, turn.end)  # the question, in one piece
        assert turn.agent_start is not None and call.rtp.loud_sent > 10

        # What baresip sent (enc) and heard (dec); both recordings start when the media starts.
        (sent_path,) = records.glob("dump-*-enc.wav")
        (heard_path,) = records.glob("dump-*-dec.wav")
        sent, heard = frame_rms(sent_path), frame_rms(heard_path)
        question_end = np.nonzero(sent > VOICED_RMS)[0].max() + 1
        assert 3.0 < question_end * 0.02 < 5.0, question_end  # 0.5 s + the question (~3.5 s)
        before, after = heard[:question_end], heard[question_end:]
        voiced = after > VOICED_RMS
        reply_rms = float(np.sqrt((after[voiced] ** 2).mean())) if voiced.any() else 0.0
        silence_rms = float(np.sqrt((before ** 2).mean()))
        print(f"baresip heard: {voiced.sum()} voiced frames after the question (agent sent "
              f"{call.rtp.loud_sent} loud packets), reply RMS {reply_rms:.0f}, "
              f"RMS while the caller spoke {silence_rms:.1f}")
        assert voiced.sum() >= max(25, 0.8 * call.rtp.loud_sent), (voiced.sum(), call.rtp.loud_sent)
        assert reply_rms > 10 * max(silence_rms, 10.0), (reply_rms, silence_rms)
        assert not (before > VOICED_RMS).any()  # the agent kept quiet while it was asked
    finally:
        if process is not None:
            await stop(process)
        await server.close()
