"""Benchmarks (`voice-agent bench ...`). Each compares its variants side by side in one run."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agent.engine.batching import StepProfile
from agent.models.snac import FRAME_S, FRAME_SAMPLES, StreamingSNACDecoder, decode_frames, rel_l2
from agent.rates import IN_RATE, OUT_RATE

if TYPE_CHECKING:
    from agent.config import Settings


class SimulatedClock:
    """Time as a serial pipeline would see it: each frame costs its generation time
    (at `token_rate`), and decoding adds the time it really took. No waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def bench_snac(snac: Any, seconds: float = 10.0, token_rate: float = 150.0, max_frames_per_window: int = 16,
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
        emitted_s = decoder.emitted_samples / OUT_RATE
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


# -- the speech engine (voice-agent bench tts | streams) -----------------------------------

REAL_TIME_TOKENS_PER_S = OUT_RATE / FRAME_SAMPLES * 7  # 82.0: one frame per 85.3 ms
BENCH_TEXT = "Thanks for calling! How can I help you today? I can check an order, or book a visit."


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


class _TokenTimes:
    """A transformers streamer that notes when each generate step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:  # the first call carries the prompt
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def _snac_first_window_s(snac) -> float:
    """One decode of 4 frames: what the reference server runs before its first audio."""
    frames = np.random.default_rng(0).integers(0, 4096, size=(4, 7)).tolist()
    decode_frames(snac, frames)  # warm-up
    t0 = time.perf_counter()
    decode_frames(snac, frames)
    return time.perf_counter() - t0


@torch.inference_mode()
def _generate(orpheus, prompts: list[list[int]], tokens: int, params, snac_first_s: float) -> dict:
    """transformers' plain generate (dynamic cache, its own sampling processors), a batch of
    prompts left-padded together; first audio as the reference server gets it (28 tokens,
    then one SNAC window)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=orpheus.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=orpheus.device)
    timer = _TokenTimes()
    t0 = time.perf_counter()
    orpheus.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=params.temperature,
                           top_p=params.top_p, repetition_penalty=params.repetition_penalty,
                           max_new_tokens=tokens, min_new_tokens=tokens, streamer=timer, pad_token_id=0)
    times = timer.times
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    first_audio = (times[27] - t0 + snac_first_s) * 1000 if len(times) >= 28 else None
    return {"streams": len(prompts), "tokens_per_s_per_stream": round(rate, 1),
            "ttfa_ms": None if first_audio is None else round(first_audio, 1)}


async def _speak(tts, text: str, seed: int, stop_after_first_audio: bool = False):
    """One request through the TTS service; returns its RequestMetrics."""
    m = tts.monitor.start(tts.settings.tts.default_voice, text)
    agen = tts.synthesize(text, seed=seed, metrics=m)
    try:
        async for _ in agen:
            if stop_after_first_audio:
                break
    finally:
        await agen.aclose()
    m.end = m.end or time.perf_counter()
    return m


def _decode_rate(m) -> float:
    span = (m.end or 0.0) - (m.first_token or 0.0)
    return (m.tokens - 1) / span if m.first_token and span > 0 and m.tokens > 1 else 0.0


def _load_speech(settings, tokens: int, streams: int):
    """Orpheus and SNAC, with the engine sized for `streams` streams of `tokens` audio
    tokens (and a prompt of up to 256)."""
    from agent.models.manager import UnifiedModelManager

    settings = settings.replace("orpheus", max_tokens=tokens).replace(
        "engine", max_streams=streams, max_seq_len=-(-(tokens + 256) // 256) * 256)
    models = UnifiedModelManager(settings)
    models.load(listen=False)
    return settings, models


def _generate_inputs(tts):
    """What the generate baseline needs: sampling (max_tokens is the bench's --tokens),
    the bench sentence's prompt, and the reference server's first SNAC window time."""
    prompt = tts.orpheus.prompt_ids(tts.settings.tts.default_voice, BENCH_TEXT)
    return tts.sampling_params(), prompt, _snac_first_window_s(tts.snac)


def _environment(models) -> dict:
    import transformers

    device = models.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"profile": models.settings.profile, "device": str(device), "device_name": name,
            "dtype": str(models.dtype).removeprefix("torch."), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda_graphs": bool(
                models.tts.batcher is not None and models.tts.batcher.graphs is not None)}


def bench_tts(settings: Settings, runs: int = 5, tokens: int = 700) -> dict:
    """One stream, side by side: transformers' generate, the single-stream path, and the
    batched engine: decode tokens/s and time to first audio (text in -> first audio out).
    The engine gets one slot, long enough for `tokens` after the prompt."""
    from agent.models.tts import TTSServiceDirect

    settings, models = _load_speech(settings, tokens, streams=1)
    try:
        tts = models.tts
        single = TTSServiceDirect(tts.orpheus, tts.snac, settings, device_thread=models.device_thread)
        params, prompt, snac_first_s = _generate_inputs(tts)
        result: dict = {**_environment(models), "tokens": tokens, "runs": runs,
                        "text_tokens": len(prompt), "real_time_tokens_per_s": round(REAL_TIME_TOKENS_PER_S, 1)}
        gen = [_generate(tts.orpheus, [prompt], tokens, params, snac_first_s) for _ in range(runs + 1)][1:]
        result["generate"] = {
            "tokens_per_s": _pct([g["tokens_per_s_per_stream"] for g in gen], 50),
            "ttfa_ms_p50": _pct([g["ttfa_ms"] for g in gen if g["ttfa_ms"] is not None], 50),
            "ttfa_ms_p95": _pct([g["ttfa_ms"] for g in gen if g["ttfa_ms"] is not None], 95)}

        async def variant(service) -> dict:
            ms = [await _speak(service, BENCH_TEXT.split("!")[0] + "!", seed=i) for i in range(runs + 1)][1:]
            return {"tokens_per_s": _pct([_decode_rate(m) for m in ms], 50),
                    "ttfa_ms_p50": _pct([m.ttfa_ms for m in ms], 50), "ttfa_ms_p95": _pct([m.ttfa_ms for m in ms], 95),
                    "ttft_ms_p50": _pct([m.ttft_ms for m in ms], 50), "tokens_each": ms[-1].tokens}

        result["single"] = asyncio.run(variant(single))
        if tts.batcher is not None:
            profile = tts.batcher.profile = StepProfile()
            result["engine"] = asyncio.run(variant(tts))
            result["engine"]["steps"] = profile.summary()
            result["engine_vs_generate_tokens_per_s"] = round(
                result["engine"]["tokens_per_s"] / max(result["generate"]["tokens_per_s"], 1e-9), 2)
        return result
    finally:
        models.unload()


async def _loop_lag(samples: list[float], period: float = 0.01) -> None:
    """Record how late the event loop wakes a 10 ms timer (it must never wait on the GPU)."""
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(period)
        samples.append((loop.time() - t - period) * 1000)


async def _engine_level(tts, n: int, probes: int) -> dict:
    """n streams speaking at once; then `probes` new replies, one after another, each
    measured to its first audio while the n streams go on. `steps`: where the engine's
    steps spent their time (StepProfile)."""
    profile = tts.batcher.profile = StepProfile()
    lag: list[float] = []
    ticker = asyncio.create_task(_loop_lag(lag))
    load = [asyncio.create_task(_speak(tts, BENCH_TEXT, seed=i)) for i in range(n)]
    try:
        while not any(t.done() for t in load) and sum(1 for s in tts.batcher.active if s.decoder.emitted) < n:
            await asyncio.sleep(0.005)
        probe_ms = []
        for i in range(probes):
            if all(t.done() for t in load):
                break
            probe_ms.append((await _speak(tts, "Sure, one moment.", seed=1000 + i, stop_after_first_audio=True)).ttfa_ms)
        ms = await asyncio.gather(*load)
    finally:
        ticker.cancel()
    rates = [_decode_rate(m) for m in ms]
    return {"streams": n, "min_tokens_per_s": round(min(rates), 1), "p50_tokens_per_s": _pct(rates, 50),
            "burst_ttfa_ms_p50": _pct([m.ttfa_ms for m in ms], 50), "burst_ttfa_ms_p95": _pct([m.ttfa_ms for m in ms], 95),
            "probe_ttfa_ms_p50": _pct(probe_ms, 50), "probe_ttfa_ms_p95": _pct(probe_ms, 95),
            "loop_lag_ms_p99": _pct(lag, 99), "loop_lag_ms_max": round(max(lag), 2) if lag else None,
            "real_time": min(rates) >= REAL_TIME_TOKENS_PER_S, "steps": profile.summary()}


STREAM_LEVELS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)


def bench_streams(settings: Settings, levels: Sequence[int] | None = None, tokens: int = 700, probes: int = 5) -> dict:
    """Concurrent streams, side by side: transformers' generate with all prompts in one
    batch, and the engine with n streams plus new replies arriving meanwhile. Stops at the
    first level where a stream falls below real time (82 tokens/s).

    The engine is sized for the run: a slot for each stream of the largest level and one
    for the new replies, each long enough for `tokens` after the prompt."""
    levels = sorted(set(levels or STREAM_LEVELS))
    settings, models = _load_speech(settings, tokens, streams=levels[-1] + 1)
    try:
        tts = models.tts
        params, prompt, snac_first_s = _generate_inputs(tts)
        result: dict = {**_environment(models), "tokens": tokens, "probes": probes,
                        "real_time_tokens_per_s": round(REAL_TIME_TOKENS_PER_S, 1), "generate": [], "engine": []}
        _generate(tts.orpheus, [prompt], 14, params, snac_first_s)  # warm-up
        for n in levels:
            g = _generate(tts.orpheus, [prompt] * n, tokens, params, snac_first_s)
            g["real_time"] = g["tokens_per_s_per_stream"] >= REAL_TIME_TOKENS_PER_S
            result["generate"].append(g)
            if not g["real_time"]:
                break
        asyncio.run(_engine_level(tts, 1, 1))  # warm-up
        for n in levels:
            level = asyncio.run(_engine_level(tts, n, probes))
            result["engine"].append(level)
            if not level["real_time"]:
                break
        for name in ("generate", "engine"):
            ok = [lv["streams"] for lv in result[name] if lv["real_time"]]
            result[f"{name}_real_time_streams"] = max(ok, default=0)
        return result
    finally:
        models.unload()


REPLY_LEVELS = (1, 2, 4, 8)


def bench_replies(settings: Settings, levels: Sequence[int] | None = None, tokens: int = 32, history: int = 0) -> dict:
    """Voxtral replies to n callers at once, side by side: the single path (each reply its
    own forward passes, interleaved on the device thread) and the reply engine (one decode
    step for all): tokens/s per reply (min, p50), all replies together, and time to the
    first token. The callers' audio is a 2 s tone: with random weights only the compute
    matters. Replies run to `tokens` unless the model ends them sooner. `history` > 0 adds
    one reply after that many remembered turns, side by side: each turn's audio extracted
    and encoded again on the device thread (as before TurnAudio) and kept from the turn's
    own reply, with the prompt built in a worker thread (as a session does)."""
    from agent.models.manager import UnifiedModelManager
    from agent.models.voxtral import ChatTurn, ReplyParams, TurnAudio

    levels = sorted(set(levels or REPLY_LEVELS))
    settings = settings.replace("engine", reply_slots=levels[-1])
    models = UnifiedModelManager(settings)
    models.load()
    voxtral = models.voxtral
    assert voxtral is not None  # load() with listen=True loads it
    t = np.arange(2 * IN_RATE) / IN_RATE
    audio = (0.3 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)
    params = ReplyParams(settings.voxtral.temperature, settings.voxtral.top_p, tokens)

    async def reply(seed: int, batched: bool) -> tuple[int, float, float]:
        """(tokens, seconds from the first token to the last, seconds to the first token)"""
        device = models.device_thread
        t0 = time.perf_counter()
        if batched:
            prompt = await asyncio.to_thread(voxtral.reply_prompt, audio, [], "")
            stream = await device.run(models.open_reply, prompt, params, seed, asyncio.get_running_loop())
        else:
            stream = await device.run(lambda: voxtral.reply_stream(audio, [], "", params, seed, device_thread=device))
        times = []
        try:
            while await stream.next_piece() is not None:
                times.append(time.perf_counter())
        finally:
            stream.close()
        return len(times), (times[-1] - times[0]) if len(times) > 1 else 0.0, (times[0] - t0) if times else 0.0

    async def level(n: int, batched: bool) -> dict:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(reply(1 + i, batched) for i in range(n)))
        wall = time.perf_counter() - t0
        rates = [(k - 1) / span for k, span, _ in results if k > 1 and span > 0]
        return {"replies": n, "min_tokens_per_s": round(min(rates), 1) if rates else None,
                "p50_tokens_per_s": _pct(rates, 50), "all_tokens_per_s": round(sum(k for k, _, _ in results) / wall, 1),
                "first_token_ms_p50": _pct([f * 1000 for _, _, f in results], 50)}

    async def after_history(turns: list, cached: bool, seed: int) -> tuple[float, float]:
        """(ms to the first token, ms of device-thread work for the whole reply: opening it,
        the prefill with its encoding, the decode steps) of one reply."""
        device, loop = models.device_thread, asyncio.get_running_loop()
        busy, t0 = device.busy_s, time.perf_counter()
        if cached:
            prompt = await asyncio.to_thread(voxtral.reply_prompt, audio, turns, "")
            stream = await device.run(models.open_reply, prompt, params, seed, loop)
        else:
            fresh = [ChatTurn(t.role, t.audio.samples if t.audio is not None else None, t.text) for t in turns]
            stream = await device.run(
                lambda: models.open_reply(voxtral.reply_prompt(audio, fresh, ""), params, seed, loop))
        try:
            await stream.next_piece()
            first = time.perf_counter() - t0
            while await stream.next_piece() is not None:
                pass
        finally:
            stream.close()
        await device.run(int)  # after the last step, whose time is counted as it ends
        return first * 1000, (device.busy_s - busy) * 1000

    async def history_side_by_side(n: int, runs: int = 3) -> dict:
        turns = []
        for i in range(n):  # each remembered turn was encoded once, by its own reply
            heard = TurnAudio(np.roll(audio, 1000 * (i + 1)))
            await asyncio.to_thread(voxtral.reply_prompt, heard, [], "")
            await models.device_thread.run(voxtral.encode, heard)
            turns += [ChatTurn("user", audio=heard), ChatTurn("assistant", text="Sure, I can help with that.")]
        times: dict[str, list] = {"uncached": [], "cached": []}
        await after_history(turns, True, 0)  # warm-up
        for r in range(runs):  # alternated, so a change in the machine's load hits both
            for name in times:
                times[name].append(await after_history(turns, name == "cached", r))
        out: dict = {"turns": n, "runs": runs}
        for name, pairs in times.items():
            out[name] = {"first_token_ms_p50": _pct([f for f, _ in pairs], 50),
                         "device_ms_p50": _pct([b for _, b in pairs], 50)}
        out["first_token_uncached_vs_cached"] = round(
            out["uncached"]["first_token_ms_p50"] / max(out["cached"]["first_token_ms_p50"], 1e-9), 2)
        out["device_uncached_vs_cached"] = round(
            out["uncached"]["device_ms_p50"] / max(out["cached"]["device_ms_p50"], 1e-9), 2)
        return out

    try:
        result: dict = {**_environment(models), "tokens": tokens, "single": [], "engine": []}
        asyncio.run(level(1, True))  # warm-up
        asyncio.run(level(1, False))
        for n in levels:
            result["single"].append(asyncio.run(level(n, False)))
            result["engine"].append(asyncio.run(level(n, True)))
        result["engine_vs_single_all_tokens_per_s"] = [
            round(e["all_tokens_per_s"] / max(s["all_tokens_per_s"], 1e-9), 2)
            for s, e in zip(result["single"], result["engine"])]
        if history:
            result["history"] = asyncio.run(history_side_by_side(history))
        return result
    finally:
        models.unload()


# -- turn-taking (voice-agent bench turns) ---------------------------------------------

TURN_FIXTURES = FIXTURES / "turns"
TURN_TAIL_S = 3.0  # silence after each recording: longer than any wait for the end of a turn
MISSED_END_S = 1.0  # a finished sentence still undecided this long after it ended is a missed end
# The detector settings compared: (name, [vad] changes, [turn] changes).
TURN_VARIANTS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("webrtc + timer", {"engine": "webrtc"}, {"engine": "silence"}),
    ("silero + timer", {"engine": "silero"}, {"engine": "silence"}),
    ("silero + smart turn", {"engine": "silero"}, {"engine": "smart_turn", "preemptive": False}),
    # The same decisions; the reply is started at each pause (only the reply times differ).
    ("silero + smart turn + preemptive", {"engine": "silero"}, {"engine": "smart_turn", "preemptive": True}),
]


@dataclass(frozen=True)
class TurnRecording:
    """One caller turn from tests/fixtures/turns (see make_turns.py there)."""
    file: str
    kind: str  # "complete" or "paused" (an unfinished phrase, a pause, the rest)
    text: str
    voice: str
    speech_end_s: float
    pause_s: tuple[float, float] | None
    audio: np.ndarray  # 16 kHz int16, TURN_TAIL_S of silence added


def load_turn_recordings(directory: Path = TURN_FIXTURES) -> list[TurnRecording]:
    from agent.audio import read_audio

    entries = json.loads((directory / "turns.json").read_text())
    tail = np.zeros(int(TURN_TAIL_S * IN_RATE), dtype=np.int16)
    return [TurnRecording(e["file"], e["kind"], e["text"], e["voice"], e["speech_end_s"],
                          tuple(e["pause_s"]) if e["pause_s"] else None,
                          np.concatenate([read_audio(directory / e["file"], IN_RATE), tail])) for e in entries]


def turn_variant(settings: Settings, vad: dict[str, Any], turn: dict[str, Any]) -> Settings:
    return settings.replace("vad", **vad).replace("turn", **turn)


class _TimedDetector:
    """A speech detector whose CPU time is counted."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.cpu_s = 0.0
        self.frames = 0

    def is_speech(self, frame: np.ndarray) -> bool:
        t = time.process_time()
        voiced = self.inner.is_speech(frame)
        self.cpu_s += time.process_time() - t
        self.frames += 1
        return voiced


def decide_turn(settings: Settings, recording: TurnRecording, silero: Any, smart_turn: Any) -> dict[str, Any]:
    """One recording through the segmenter as a session runs it, in stream time. The
    end-of-turn model runs in this thread and its wall time is charged to the stream: its
    answer applies only once that much more audio has arrived, and only if the caller
    has not spoken again meanwhile (as in CallSession, where it runs while audio flows)."""
    from agent.call.vad import SileroDetector, SpeechPaused, SpeechResumed, Utterance, VADSegmenter, WebRtcDetector

    v, turn = settings.vad, settings.turn
    inner = SileroDetector(silero.stream(), v.threshold) if v.engine == "silero" else WebRtcDetector(v)
    detector = _TimedDetector(inner)
    model = smart_turn if turn.engine == "smart_turn" else None
    vad = VADSegmenter(v, detector, end_ms=turn.max_silence_ms if model else None,
                       pause_ms=turn.min_silence_ms if model else None)
    step = IN_RATE * v.frame_ms // 1000
    model_cpu = model_wall = 0.0
    pending: tuple[int, float, float] | None = None  # (pause, probability, stream time it is known)
    decided: list[float] = []
    for i in range(0, len(recording.audio) - step + 1, step):
        events: list[Any] = vad.push(recording.audio[i:i + step])
        if pending is not None and vad.now >= pending[2]:
            pause, prob, _ = pending
            pending = None
            if vad.pause == pause and prob >= turn.threshold:
                events.append(vad.end_utterance())
        for event in events:
            if isinstance(event, SpeechPaused) and model is not None:
                cpu, wall = time.process_time(), time.perf_counter()
                prob = model.probability(event.audio)
                model_cpu += time.process_time() - cpu
                wall = time.perf_counter() - wall
                model_wall += wall
                pending = (event.pause, prob, vad.now + wall)
            elif isinstance(event, SpeechResumed):
                pending = None
            elif isinstance(event, Utterance):
                decided.append(event.decided_at)
    return {"decided_at": decided, "detector_cpu_s": detector.cpu_s, "frames": detector.frames,
            "model_cpu_s": model_cpu, "model_wall_s": model_wall, "stream_s": len(recording.audio) / IN_RATE}


def bench_turns(settings: Settings, recordings: list[TurnRecording] | None = None) -> dict:
    """End of speech to turn decided on finished sentences, cut-offs in mid-sentence
    pauses, missed ends and CPU, for each detector setting in TURN_VARIANTS, on the same
    recordings in one run."""
    import onnxruntime

    from agent.models.silero import SileroVAD
    from agent.models.smart_turn import SmartTurn

    recordings = recordings if recordings is not None else load_turn_recordings()
    silero, smart_turn = SileroVAD(), SmartTurn(settings.turn.model, workers=1)
    variants: dict[str, dict[str, Any]] = {}
    try:
        for name, vad, turn in TURN_VARIANTS:
            s = turn_variant(settings, vad, turn)
            latencies, cut_offs, missed, paused_latencies = [], [], [], []
            totals = {"detector_cpu_s": 0.0, "frames": 0, "model_cpu_s": 0.0, "model_wall_s": 0.0, "stream_s": 0.0}
            for rec in recordings:
                run = decide_turn(s, rec, silero, smart_turn)
                for key in totals:
                    totals[key] += run[key]
                first = run["decided_at"][0] if run["decided_at"] else None
                if rec.kind == "complete":
                    if first is None or first - rec.speech_end_s > MISSED_END_S:
                        missed.append(rec.file)
                    if first is not None:
                        latencies.append((first - rec.speech_end_s) * 1000)
                elif first is not None and first < rec.speech_end_s:
                    cut_offs.append(rec.file)  # decided before the sentence was over
                else:
                    ends = [t for t in run["decided_at"] if t >= rec.speech_end_s]
                    if ends:
                        paused_latencies.append((ends[0] - rec.speech_end_s) * 1000)
            complete = sum(r.kind == "complete" for r in recordings)
            variants[name] = {
                "settings": {"vad": vad, "turn": turn},
                "complete": {"recordings": complete, "end_to_decided_ms": {"p50": _pct(latencies, 50), "p95": _pct(latencies, 95)},
                             "missed_ends": len(missed), "missed": missed},
                "paused": {"recordings": len(recordings) - complete, "cut_offs": len(cut_offs), "cut": cut_offs,
                           "end_to_decided_ms_p50": _pct(paused_latencies, 50)},
                "cpu": {"vad_ms_per_20ms_frame": round(totals["detector_cpu_s"] / max(1, totals["frames"]) * 1000, 4),
                        "model_ms_per_call_s": round(totals["model_cpu_s"] / totals["stream_s"] * 1000, 3),
                        "percent_of_a_core_per_call": round(
                            (totals["detector_cpu_s"] + totals["model_cpu_s"]) / totals["stream_s"] * 100, 3)},
            }
    finally:
        smart_turn.close()
    return {"recordings": len(recordings), "onnxruntime": onnxruntime.__version__, "vad_end_ms": settings.vad.end_ms,
            "turn": dataclasses.asdict(settings.turn), "variants": variants}
