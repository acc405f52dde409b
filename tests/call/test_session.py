"""The call session on the tiny profile: turns, barge-in, history, failures, headless runs."""

import asyncio
import json
import subprocess
import sys
import threading
import wave

import numpy as np
import pytest

from agent.call.events import AgentInterrupted
from agent.call.factory import SessionFactory
from agent.call.outbound import OutboundAudio
from agent.call.session import CallSession
from signaling.headless import VirtualClock, run_call

FRAME = 320  # 20 ms at 16 kHz


def silence(s):
    return np.zeros(int(16000 * s), dtype=np.int16)


async def test_outbound_frames_backpressure_and_clear():
    played = []
    out = OutboundAudio(frame_samples=480, max_frames=3, on_played=played.append)
    assert await out.put(np.ones(1000, dtype=np.int16), 1, 0) == 2  # 40 samples carried over
    put = asyncio.create_task(out.put(np.ones(1000, dtype=np.int16), 1, 1))
    await asyncio.sleep(0.05)
    assert not put.done() and len(out) == 3  # full: TTS waits
    assert out.get_nowait().segment == 0
    await asyncio.wait_for(put, 1)
    out.finish()
    sizes = [len(f.samples) for f in [out.get_nowait() for _ in range(len(out))]]
    assert sizes == [480] * 4 and len(played) == 5
    await out.put(np.ones(1200, dtype=np.int16), 2, 0)
    assert out.clear() == 2 and out.get_nowait() is None
    out.finish()  # the carried samples were dropped too
    assert len(out) == 0


async def test_two_utterances_get_two_answers(models, tiny_settings, speech):
    caller = np.concatenate([silence(0.5), speech[0], silence(6.0), speech[1], silence(4.0)])
    result = await run_call(SessionFactory(models), caller, np.zeros(0, np.int16), tiny_settings, seed=1)
    assert len(result.turns) == 2
    agent = result.recording[:, 1].astype(np.float64)
    for turn in result.turns:
        assert turn.error is None and not turn.interrupted and turn.reply_text
        assert turn.agent_start is not None and turn.agent_start > turn.end
        lat = turn.latency_ms()
        assert 0 < lat["vad"] <= lat["first_token"] <= lat["first_tts_audio"] <= lat["first_frame_queued"]
        # The agent's audio is on the right channel after the caller stopped, not before.
        seg = agent[int(turn.agent_start * 24000):int(turn.agent_end * 24000)]
        assert np.sqrt(np.mean(seg**2)) > 100
    first, second = result.turns
    quiet = agent[int(second.start * 24000):int((second.end) * 24000)]
    assert first.agent_end <= second.start and np.abs(quiet).max() == 0  # never while the caller speaks
    assert len(result.recording) >= len(caller) * 1.5 - 1


async def converse(models, settings, first, second, cut_after_frames):
    """Caller says `first`, waits until `cut_after_frames` of the answer were played, then says `second`."""
    clock = VirtualClock()
    session = CallSession(models, settings, clock=clock, seed=3)
    feed = list(np.split(first, np.arange(FRAME, len(first), FRAME)))
    agent, t, spoke_again, events = [], 0.0, None, []
    played_of_first = 0
    while t < 60:
        if feed:
            chunk = feed.pop(0)
        else:
            chunk = np.zeros(FRAME, np.int16)
            if spoke_again is None and played_of_first >= cut_after_frames:
                spoke_again = len(agent)
                feed = list(np.split(second, np.arange(FRAME, len(second), FRAME)))
            elif spoke_again is not None and not session.agent_busy and len(session.turns) >= 2:
                break
        await (clock.sleep_until(t) if session.agent_busy else asyncio.sleep(0))
        clock.skip_to(t)
        session.push_audio(np.pad(chunk, (0, FRAME - len(chunk))), 16000)
        frame = session.outbound.get_nowait()
        if frame is not None and frame.turn == 1:
            played_of_first += 1
        agent.append(frame)
        await asyncio.sleep(0)
        t += 0.02
    while not session.events.empty():
        events.append(session.events.get_nowait())
    await session.close()
    return session, agent, spoke_again, events


async def test_barge_in_cuts_the_reply(models, tiny_settings, speech):
    settings = tiny_settings.replace("voxtral", max_new_tokens=24)
    session, agent, spoke_again, events = await converse(models, settings, speech[0], speech[1], cut_after_frames=10)
    first = session.turns[0]
    assert first.interrupted
    interrupt = next(e for e in events if isinstance(e, AgentInterrupted))
    assert interrupt.turn == 1
    # From the frame after the caller's speech was detected, none of turn 1's audio plays.
    detected = spoke_again + 1 + int(0.3 / 0.02)  # start window (200 ms) plus margin
    assert all(f is None or f.turn != 1 for f in agent[detected:])
    # The transcript keeps only what was heard.
    generated = " ".join(s.text for s in first.segments).split()
    heard = first.played_text.split()
    assert heard == generated[:len(heard)] and len(heard) < len(generated)
    # The second utterance is answered.
    assert len(session.turns) == 2 and session.turns[1].reply_text


async def test_history_stays_bounded(models, tiny_settings, speech):
    settings = tiny_settings.replace("session", max_history_turns=2)
    real = models.voxtral.reply_prompt
    seen = []

    threads, encoded = set(), []

    def recording_history(audio, history, *args, **kwargs):
        seen.append([(t.role, t.text) for t in history])
        threads.add(threading.current_thread().name)
        encoded.append([t.audio.encodes for t in history if t.role == "user"])
        return real(audio, history, *args, **kwargs)

    models.voxtral.reply_prompt = recording_history
    try:
        gap = silence(6.0)  # longer than a tiny reply takes to play on a slow CPU (idle time is skipped)
        caller = np.concatenate([silence(0.5), speech[0], gap, speech[1], gap, speech[0], gap, speech[1], gap])
        result = await run_call(SessionFactory(models), caller, np.zeros(0, np.int16), settings, seed=4)
    finally:
        models.voxtral.reply_prompt = real
    assert len(result.turns) == 4 and not any(t.interrupted for t in result.turns)
    assert [len(h) for h in seen] == [0, 2, 4, 4]  # user + assistant per remembered turn
    # Each remembered turn comes with its encoding from its own reply: never encoded again.
    assert encoded == [[], [1], [1, 1], [1, 1]]
    # The prompts were built off the device thread (and off the event loop).
    assert "device" not in threads and threading.current_thread().name not in threads
    # The last context holds turns 2 and 3, with the replies as played.
    assert [text for role, text in seen[3] if role == "assistant"] == [
        result.turns[1].played_text, result.turns[2].played_text]


async def test_a_failing_turn_does_not_end_the_call(models, tiny_settings, speech):
    real = models.voxtral.reply_prompt
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected model failure")
        return real(*args, **kwargs)

    models.voxtral.reply_prompt = flaky
    try:
        caller = np.concatenate([silence(0.5), speech[0], silence(6.0), speech[1], silence(4.0)])
        result = await run_call(SessionFactory(models), caller, np.zeros(0, np.int16), tiny_settings, seed=2)
    finally:
        models.voxtral.reply_prompt = real
    assert len(result.turns) == 2
    assert "injected model failure" in result.turns[0].error
    assert result.turns[1].error is None and result.turns[1].reply_text and result.turns[1].agent_start


async def test_silence_and_noise_give_no_turns(models, tiny_settings):
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(16000 * 4) * 4000).astype(np.int16)
    for caller in (silence(4.0), noise):
        result = await run_call(SessionFactory(models), caller, np.zeros(0, np.int16), tiny_settings)
        assert result.turns == [] and np.abs(result.recording[:, 1]).max() == 0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, timeout=600)


def test_voice_agent_run_end_to_end(tmp_path, speech):
    # A stereo 44.1 kHz file: any rate and channel count is accepted.
    import av

    path = tmp_path / "call.wav"
    caller = np.concatenate([silence(0.5), speech[0], silence(4.0)])
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=44100, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.repeat(caller, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = 16000
        resampler = av.AudioResampler(format="s16", layout="stereo", rate=44100)
        for f in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(f):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    out = tmp_path / "out.wav"
    p = run_cli("run", "--input", str(path), "-o", str(out), "--profile", "tiny", "--json", "--seed", "1")
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    report = json.loads(p.stdout)
    assert len(report["turns"]) == 1
    turn = report["turns"][0]
    assert turn["start"] < turn["end"] < turn["agent_start"] and turn["reply"]
    for stage in ("vad", "first_token", "first_tts_audio", "first_frame_queued"):
        assert turn["latency_ms"][stage] > 0
    assert "p50" in report["latency_ms"]["first_frame_queued"]
    with wave.open(str(out)) as w:
        assert (w.getnchannels(), w.getframerate()) == (2, 24000)
        rec = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, 2)
    assert np.abs(rec[:, 0]).max() > 1000  # the caller, left
    assert np.abs(rec[int(turn["agent_start"] * 24000):, 1]).max() > 100  # the agent, right


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00\x00\x00WAVEfmt junk" * 5, b"not audio at all"])
def test_voice_agent_run_rejects_corrupt_files(tmp_path, content):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    p = run_cli("run", "--input", str(path), "--profile", "tiny")
    err = p.stderr.decode()
    assert p.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_voice_agent_run_on_silence_gives_zero_turns(tmp_path):
    path = tmp_path / "quiet.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(np.zeros(8000 * 3, np.int16).tobytes())
    p = run_cli("run", "--input", str(path), "--profile", "tiny", "--json")
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert json.loads(p.stdout)["turns"] == []
