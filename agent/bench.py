"""Benchmarks (`voice-agent bench ...`). Each compares its variants side by side in one run."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import torch

from .snac_codec import (FRAME_S, FRAME_SAMPLES, SAMPLE_RATE, StreamingSNACDecoder, decode_frames,
                         rel_l2)


class SimulatedClock:
    """Time as a serial pipeline would see it: each frame costs its generation time
    (at `token_rate`), and decoding adds the time it really took. No waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def bench_snac(snac, seconds: float = 10.0, token_rate: float = 150.0, max_frames_per_window: int = 16,
               seed: int = 0) -> dict:
    """Both streaming decoder modes on the same random codes (>= `seconds` of audio)."""
    n_frames = int(np.ceil(seconds / FRAME_S))
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 4096, size=(n_frames, 7)).tolist()
    t0 = time.perf_counter()
    reference = decode_frames(snac, frames)
    one_shot_s = time.perf_counter() - t0
    result: dict = {
        "audio_s": round(n_frames * FRAME_S, 3),
        "frames": n_frames,
        "token_rate": token_rate,
        "device": str(next(snac.parameters()).device),
        "torch": torch.__version__,
        "one_shot_ms_per_audio_s": round(one_shot_s * 1000 / (n_frames * FRAME_S), 2),
    }
    for mode in ("baseline", "default"):
        clock = SimulatedClock()
        decoder = StreamingSNACDecoder(snac, mode, max_frames_per_window, clock=clock)
        # Place each chunk on the stream's timeline: baseline chunks are frames n-3.
        out = np.zeros(len(reference), dtype=np.float32)
        chunk_frames = []
        for i, frame in enumerate(frames):
            clock.now += 7 / token_rate
            before_s, start = decoder.decode_s, decoder.emitted
            audio = decoder.push(frame)
            clock.now += decoder.decode_s - before_s
            if audio is not None:
                first = i - 2 if mode == "baseline" else start
                out[first * FRAME_SAMPLES:first * FRAME_SAMPLES + len(audio)] = audio
                chunk_frames.append(len(audio) // FRAME_SAMPLES)
        start = decoder.emitted
        audio = decoder.flush()
        if audio is not None:
            out[start * FRAME_SAMPLES:start * FRAME_SAMPLES + len(audio)] = audio
            chunk_frames.append(len(audio) // FRAME_SAMPLES)
        emitted_s = decoder.emitted_samples / SAMPLE_RATE
        result[mode] = {
            "ms_per_audio_s": round(decoder.decode_s * 1000 / emitted_s, 2),
            "first_audio_after_tokens": decoder.first_audio_after_tokens,
            "rel_l2_err": float(f"{rel_l2(out, reference):.3g}"),
            "lost_audio_ms": round((n_frames * FRAME_S - emitted_s) * 1000, 1),
            "windows": decoder.windows,
            "mean_frames_per_window": round(sum(chunk_frames) / max(1, len(chunk_frames)), 2),
        }
    result["default_vs_baseline_cost"] = round(
        result["default"]["ms_per_audio_s"] / result["baseline"]["ms_per_audio_s"], 3)
    return result


FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def bench_pipeline(settings, input_path: str | None = None) -> dict:
    """A headless call on the given profile; per turn, the pipeline's own time from the VAD
    decision to the first audio frame queued, minus the time the models ran in between."""
    from .audio import read_audio
    from .headless import run_call
    from .models import UnifiedModelManager
    from .monitor import summarize_turns
    from .session import OUT_RATE
    from .vad import RATE as IN_RATE

    if input_path is None:
        gap = np.zeros(int(IN_RATE * 4.0), dtype=np.int16)
        parts = [read_audio(FIXTURES / name, IN_RATE) for name in ("question1.wav", "question2.wav")]
        caller = np.concatenate([gap[:IN_RATE], parts[0], gap, parts[1], gap])
        caller_24k = np.zeros(0, dtype=np.int16)
    else:
        caller, caller_24k = read_audio(input_path, IN_RATE), read_audio(input_path, OUT_RATE)
    models = UnifiedModelManager(settings)
    try:
        models.load()
        result = asyncio.run(run_call(models, caller, caller_24k, settings, seed=0))
    finally:
        models.unload()
    latencies = [t.latency_ms() for t in result.turns]
    return {"profile": settings.profile, "device": str(models.device), "torch": torch.__version__,
            "turns": len(result.turns), "latency_ms": summarize_turns(latencies),
            "per_turn_ms": latencies}
