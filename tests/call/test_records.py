"""What is kept of each call: caller transcripts (Voxtral's transcription mode on the tiny
profile's real model), call records, recordings (agent/call/records.py, recording.py).
The WebRTC and SIP records, and a server killed mid-call, are in
tests/signaling/test_call_records.py."""

import asyncio
import json
import wave

import numpy as np
import pytest
import soundfile

from agent.call.events import CallerTranscript, TurnFinished
from agent.call.factory import SessionFactory
from agent.call.recording import CallRecording
from agent.call.records import CallRecords
from agent.rates import OUT_RATE
from signaling.headless import run_call

session_loop = pytest.mark.asyncio(loop_scope="session")  # the models fixture's loop


def records_settings(settings, tmp_path, **changes):
    return settings.replace("records", **{"path": str(tmp_path / "calls.jsonl"), "audio": True,
                                          "audio_dir": str(tmp_path / "recordings"), **changes})


def caller_24k(speech_16k):
    from agent.audio import Resampler
    return Resampler(OUT_RATE).push(speech_16k, 16000)


async def headless(models, settings, audio, seed=7):
    sessions = SessionFactory(models, CallRecords(settings.records))
    sessions.records.check()
    events = []
    real_new = sessions.new_session

    def new_session(*args, **kwargs):  # keep the session's events as the call goes
        session = real_new(*args, **kwargs)
        real_emit = session._emit
        session._emit = lambda event: (events.append(event), real_emit(event))
        return session

    sessions.new_session = new_session
    result = await run_call(sessions, audio, caller_24k(audio), settings, seed=seed, party={"input": "test"})
    return sessions, result, events


def two_questions(speech):
    gap = np.zeros(16000 * 2, np.int16)
    return np.concatenate([speech[0], gap, speech[1], gap])


@session_loop
async def test_every_answered_turn_gets_the_callers_transcript_after_its_reply_started(models, tiny_settings,
                                                                                     speech, tmp_path):
    settings = records_settings(tiny_settings, tmp_path)
    started = []
    real = models.transcribe

    async def timed(audio, *args):  # the real model; only when it was asked is noted
        started.append(asyncio.get_running_loop().time())
        return await real(audio, *args)

    models.transcribe = timed
    try:
        _, result, events = await headless(models, settings, two_questions(speech))
    finally:
        del models.transcribe
    turns = result.turns
    assert len(turns) == 2 and len(started) == 2
    for turn in turns:
        # Written by the real transcription mode (random weights: gibberish, but text).
        assert isinstance(turn.transcript, str) and turn.transcript
        assert turn.to_dict()["transcript"] == turn.transcript
    transcripts = [e for e in events if isinstance(e, CallerTranscript)]
    assert [(e.turn, e.text) for e in transcripts] == [(t.index, t.transcript) for t in turns]
    # Never before the reply's first audio was queued: the turn's TurnFinished or its first
    # reply audio came first (events are in order).
    kinds = [(type(e).__name__, getattr(e, "turn", None)) for e in events]
    for turn in turns:
        first_reply = next(i for i, (k, n) in enumerate(kinds) if k == "AgentReplyText" and n == turn.index)
        assert kinds.index(("CallerTranscript", turn.index)) > first_reply


@session_loop
async def test_no_transcripts_when_records_transcribe_is_off(models, tiny_settings, speech, tmp_path):
    settings = records_settings(tiny_settings, tmp_path, transcribe=False)
    _, result, events = await headless(models, settings, speech[0])
    assert result.turns and all(t.transcript is None for t in result.turns)
    assert not any(isinstance(e, CallerTranscript) for e in events)
    assert any(isinstance(e, TurnFinished) for e in events)


@session_loop
async def test_a_headless_call_leaves_a_record_line_and_a_recording_as_long_as_the_call(models, tiny_settings,
                                                                                       speech, tmp_path):
    settings = records_settings(tiny_settings, tmp_path)
    sessions, result, _ = await headless(models, settings, two_questions(speech))
    (line,) = (tmp_path / "calls.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record == sessions.records.get(result.record.id).to_dict() == result.record.to_dict()
    assert record["transport"] == "headless" and record["party"] == {"input": "test"}
    assert record["ended_by"] == "caller" and record["end_reason"] == "the recording ended"
    assert record["started_at"].endswith("Z") and record["duration_s"] > 0
    assert [t["index"] for t in record["turns"]] == [1, 2]
    assert all(t["transcript"] and t["reply"] for t in record["turns"])
    # The recording: named in the record, under records.audio_dir, stereo at 24 kHz, as
    # long as the call, the caller on the left and the agent on the right.
    path = tmp_path / "recordings" / f"{record['id']}.wav"
    assert record["audio"] == str(path.resolve())
    audio, rate = soundfile.read(path, dtype="int16")
    assert rate == OUT_RATE and audio.ndim == 2 and audio.shape[1] == 2
    assert len(audio) / rate == pytest.approx(record["duration_s"], abs=0.1)
    last = record["turns"][-1]
    assert len(audio) / rate >= last["agent_end"] - 0.05
    for turn in record["turns"]:
        a, b = int(turn["agent_start"] * rate), int(turn["agent_end"] * rate)
        assert np.abs(audio[a:b, 1]).mean() > 100, "the agent's reply is on the right"
        assert np.abs(audio[int(turn["start"] * rate):int(turn["end"] * rate), 0]).mean() > 100
    # On the call's timeline: the agent is first heard when the first reply started.
    first_sound = np.flatnonzero(audio[:, 1])[0] / rate
    assert first_sound == pytest.approx(record["turns"][0]["agent_start"], abs=0.03)


def test_the_recording_is_on_disk_with_a_valid_header_as_the_call_goes(tmp_path):
    path = tmp_path / "call.wav"
    rec = CallRecording(path, rate=8000, flush_s=0.5)
    tone = (np.sin(np.arange(160) / 3) * 8000).astype(np.int16)
    for i in range(100):  # 2 s: the caller all along, the agent from 1 s on
        rec.caller(tone)
        if i >= 50:
            rec.agent(tone * 0 + 1000)
    # Not closed (a crash now): what is on disk reads as a WAV of at least 1.5 s.
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 2 and w.getframerate() == 8000
        on_disk = w.getnframes()
        frames = np.frombuffer(w.readframes(on_disk), np.int16).reshape(-1, 2)
    assert 1.5 <= on_disk / 8000 <= 2.0
    assert (frames[:, 0] != 0).any() and (frames[:8000, 1] == 0).all()
    rec.close()
    audio, _ = soundfile.read(path, dtype="int16")
    assert len(audio) == 100 * 160 + 160  # the agent's last frame is placed after the caller's
    # An agent frame goes where the caller's audio had got to, never over the previous one.
    assert (audio[51 * 160:52 * 160, 1] == 1000).all() and (audio[:51 * 160, 1] == 0).all()


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "..", "x" * 65, "a\x00b", "/etc/passwd", "c:\\x", "a b"])
def test_a_call_id_can_never_name_a_file_outside_the_recordings(tiny_settings, tmp_path, bad):
    records = CallRecords(records_settings(tiny_settings, tmp_path).records)
    with pytest.raises(ValueError):
        records.recording_path(bad)
    assert records.recording_path("a1_B-2") == (tmp_path / "recordings" / "a1_B-2.wav").resolve()


def test_records_keep_the_newest_and_a_failed_write_loses_no_record(tiny_settings, tmp_path):
    from agent.call.records import CallRecord

    settings = tiny_settings.replace("records", keep=3, path=str(tmp_path / "no" / "such" / "dir" / "c.jsonl"))
    records = CallRecords(settings.records)  # check() not run: the folder is missing
    for i in range(5):
        records.add(CallRecord(str(i), "headless", {}, 0.0, 1.0, "caller", "test"))
    assert [r.id for r in records.recent()] == ["4", "3", "2"] and records.get("0") is None
    assert records.recent(1)[0].id == "4" and records.failures == 5 and records.written == 0


def test_an_unwritable_records_folder_stops_the_start_with_one_line(tmp_path):
    import os
    import subprocess
    import sys

    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {**os.environ, "VOICE_AGENT_RECORDS__PATH": str(blocker / "calls.jsonl")}
    env.pop("VOICE_AGENT_PROFILE", None)
    p = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--profile", "tiny", "--input",
                        "tests/fixtures/question1.wav"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("voice-agent: error: records.path: cannot make"), p.stderr
