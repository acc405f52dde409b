"""`voice-agent run` and hostile recordings: the decoded length is what counts (run.max_input_s),
and the call recording is written as the call goes. Memory is measured, not guessed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
import wave
from pathlib import Path

import numpy as np
import pytest

from agent.audio import WavWriter, read_audio
from agent.call.factory import SessionFactory
from agent.errors import InputError
from signaling.headless import run_call

# Runs the command in a child and prints its exit status and peak RSS (MiB) as JSON: the
# wrapper's RUSAGE_CHILDREN covers that one child only.
MEASURE = """
import json, resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, timeout=300)
print(json.dumps({"rc": p.returncode, "stderr": p.stderr.decode(errors="replace"),
                  "peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measure_cli(*args: str, env: dict[str, str] | None = None) -> dict:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("VOICE_AGENT_PROFILE", None)
    out = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "agent.cli", *args],
                         capture_output=True, timeout=400, env=full_env, check=True)
    return json.loads(out.stdout)


def write_pcm_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype(np.int16).tobytes())
    return path


def noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-3000, 3000, n).astype(np.int16)


def test_a_wav_claiming_1_hz_is_refused_in_little_memory(tmp_path):
    """The campaign's file: 8 KB of samples at a claimed 1 Hz is 4,000 s of audio. It made
    a 4,000 s call and a 1.9 GiB peak; now it exits 2 with one line, before any model loads."""
    absurd = write_pcm_wav(tmp_path / "absurd.wav", noise(4000), 1)
    assert absurd.stat().st_size < 8200
    result = measure_cli("run", "--input", str(absurd), "--profile", "tiny", "-o", str(tmp_path / "out.wav"))
    err = result["stderr"].strip()
    assert result["rc"] == 2, err[-2000:]
    assert len(err.splitlines()) == 1 and "run.max_input_s" in err and "Traceback" not in err
    assert result["peak_mib"] < 700, result["peak_mib"]  # imports alone take about 350 MiB
    assert not (tmp_path / "out.wav").exists()


def test_an_input_longer_than_the_limit_exits_2(tmp_path):
    long = write_pcm_wav(tmp_path / "long.wav", noise(8000 * 12), 8000)  # 12 s, honest header
    result = measure_cli("run", "--input", str(long), "--profile", "tiny", env={"VOICE_AGENT_RUN__MAX_INPUT_S": "10"})
    err = result["stderr"].strip()
    assert result["rc"] == 2 and len(err.splitlines()) == 1, err[-2000:]
    assert "longer than 10 s" in err and "run.max_input_s" in err


def test_decoding_stops_at_the_limit(tmp_path):
    """A 20-minute file with max_s=10: refused after about 10 s of decoding, not after
    decoding (and resampling to 16 kHz: 38 MB) the whole of it."""
    path = write_pcm_wav(tmp_path / "twenty_minutes.wav", np.zeros(8000 * 1200, dtype=np.int16), 8000)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="longer than 10 s"):
            read_audio(path, 16000, max_s=10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak  # 10 s at 16 kHz is 320 KB


def test_the_header_length_is_not_what_counts(tmp_path):
    """A header claiming a huge data chunk over 1 s of audio reads as the 1 s it holds."""
    path = write_pcm_wav(tmp_path / "liar.wav", noise(16000), 16000)
    data = bytearray(path.read_bytes())
    at = data.index(b"data") + 4
    data[at:at + 4] = (0x7FFFFFF0).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert len(read_audio(path, 16000, max_s=5)) == 16000


@pytest.mark.asyncio(loop_scope="session")
async def test_the_recording_is_written_as_the_call_goes(models, tiny_settings, tmp_path):
    """60 s of quiet caller: the recording (5.8 MB as int16 stereo) goes to the file 20 ms
    at a time; the call itself allocates almost nothing that lasts."""
    caller_16k = noise(16000 * 60, seed=1) // 100  # far below the VAD's speech level: no turns
    caller_24k = noise(24000 * 60, seed=2) // 100
    out = tmp_path / "call.wav"
    tracemalloc.start()
    try:
        with WavWriter(out, 24000, 2) as recording:
            result = await run_call(SessionFactory(models), caller_16k, caller_24k, tiny_settings, recording=recording)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.recording is None and result.turns == []
    assert peak < 2 * 2**20, peak
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 2, 2)
        written = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).reshape(-1, 2)
    assert len(written) >= len(caller_24k) and written.shape[0] % 480 == 0
    assert np.array_equal(written[:len(caller_24k), 0], caller_24k) and not written[len(caller_24k):, 0].any()
    assert not written[:, 1].any()  # the agent kept quiet


@pytest.mark.asyncio(loop_scope="session")
async def test_the_recording_in_memory_matches_the_written_one(models, tiny_settings, tmp_path):
    """Without a writer run_call returns the same timeline whole (for benches and tests)."""
    caller_16k, caller_24k = np.zeros(16000 * 3 + 5, np.int16), noise(24000 * 3 + 700, seed=3)
    whole = await run_call(SessionFactory(models), caller_16k, caller_24k, tiny_settings)
    with WavWriter(tmp_path / "c.wav", 24000, 2) as recording:
        await run_call(SessionFactory(models), caller_16k, caller_24k, tiny_settings, recording=recording)
    with wave.open(str(tmp_path / "c.wav")) as w:
        written = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).reshape(-1, 2)
    assert np.array_equal(whole.recording, written)
    assert len(written) == max(len(caller_24k), 480 * (-(-len(caller_16k) // 320) + 1))


@pytest.mark.asyncio(loop_scope="session")
async def test_a_recording_that_stops_as_the_caller_stops_is_answered(models, tiny_settings, speech):
    """A recorded question trimmed right after its last word (as people trim them) ends
    before the VAD's end-of-speech silence: the silence after the input ends that turn
    rather than the run ending with "no speech found"."""
    voiced = np.flatnonzero(np.abs(speech[0]) > 300)
    question = speech[0][:voiced[-1] + 1]  # the recording ends on the last voiced sample
    result = await run_call(SessionFactory(models), question, np.zeros(0, np.int16), tiny_settings, seed=5)
    assert len(result.turns) == 1
    assert result.turns[0].agent_start is not None and result.turns[0].agent_start > result.input_s - 0.05
