"""The call benchmarks: `voice-agent bench pipeline` (a headless call's own overhead per
turn), `bench webrtc` (outbound pacing, reply latency and calls at once over loopback
WebRTC, with real aiortc peers) and `bench sip` (one loopback phone call)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, cast

import aiohttp
import numpy as np
from aiohttp import web

from agent.call.factory import SessionFactory
from agent.config import Settings
from signaling.server import CALLS, create_app
from signaling.webrtc.loopback import Caller

PACING_LIMIT_MS = 5.0


def interval_errors_ms(sent_at: Iterable[float], since: float) -> list[float]:
    """|interval - 20 ms| between consecutive frames sent after `since`."""
    times = np.array([t for t in sent_at if t >= since])
    return list(np.abs(np.diff(times) - 0.02) * 1000) if len(times) > 1 else []


def pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


async def bench_webrtc(sessions: SessionFactory, settings: Settings, speech: list[np.ndarray],
                       turns: int = 4, level_s: float = 4.0, max_level: int = 64) -> dict:
    settings = settings.replace("server", max_calls=max_level + 1)
    runner = web.AppRunner(create_app(sessions, settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = cast(asyncio.Server, site._server).sockets[0].getsockname()[1]  # start() made it: loop.create_server
    base = f"http://127.0.0.1:{port}"
    app = runner.app
    result: dict = {}
    try:
        async with aiohttp.ClientSession() as http:
            # 1. End of caller speech -> first reply audio heard, and pacing during speech.
            caller = Caller(base)
            await caller.dial(http)
            latencies: list[float] = []
            started = time.monotonic()
            for i in range(turns):
                caller.mic.say(speech[i % len(speech)], pause_s=0.5)
                await caller.wait_for(lambda: caller.mic.speech_end is not None
                                      and caller.loud_since(caller.mic.speech_end), timeout=60)
                assert caller.mic.speech_end is not None  # waited for
                latencies.append((caller.loud_since(caller.mic.speech_end)[0] - caller.mic.speech_end) * 1000)
                # Let the reply finish before the next question (no barge-in here).
                await caller.wait_for(lambda: not caller.loud_since(time.monotonic() - 1.0), timeout=60)
            track = app[CALLS][caller.call_id].track
            errors = interval_errors_ms(track.sent_at, started + 1.0)
            await caller.pc.close()
            result["reply_latency_ms"] = {"p50": pct(latencies, 50), "p95": pct(latencies, 95),
                                          "turns": [round(x, 1) for x in latencies]}
            result["pacing_interval_error_ms"] = {"p50": pct(errors, 50), "p99": pct(errors, 99),
                                                  "frames": len(errors)}
            await asyncio.sleep(1.0)
            # 2. How many calls at once keep pacing within PACING_LIMIT_MS at p99. The callers
            # run in another process, as real ones would, and stay silent: this measures the
            # media path (Opus, SRTP, pacing), not speech generation.
            levels: list[dict[str, Any]] = []
            live = app[CALLS]  # call id -> WebRTCCall, the server's own (updated as calls come and go)
            n = 1
            while n <= max_level:
                before = set(live)
                load = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "signaling.webrtc.loopback", base, str(n), str(level_s + 2.0))
                deadline = time.monotonic() + 30
                while len(set(live) - before) < n and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                calls = [live[i] for i in set(live) - before]
                t0 = time.monotonic()
                await asyncio.sleep(level_s)
                errs = [e for call in calls for e in interval_errors_ms(call.track.sent_at, t0 + 0.5)]
                await load.wait()
                p99 = pct(errs, 99)
                levels.append({"calls": len(calls), "p50_ms": pct(errs, 50), "p99_ms": p99})
                await asyncio.sleep(1.0)
                if len(calls) < n or p99 is None or p99 > PACING_LIMIT_MS:
                    break
                n *= 2
            passing = [lv["calls"] for lv in levels if lv["p99_ms"] is not None and lv["p99_ms"] <= PACING_LIMIT_MS]
            result["capacity"] = {"max_calls_under_5ms_p99": max(passing) if passing else 0, "levels": levels,
                                  "note": "silent callers in another process: the media path, no speech generation"}
    finally:
        await runner.cleanup()
    return result


async def bench_sip(sessions: SessionFactory, settings: Settings, speech_8k: list[np.ndarray],
                    turns: int = 4) -> dict:
    """One SIP call over loopback: a phone (LoopbackPhone, sending continuous PCMU as
    phones do) asks `turns` questions. Reports end of caller speech -> first voiced reply
    RTP packet, and the agent's RTP send pacing."""
    from signaling.sip.endpoint import SipServer
    from signaling.sip.phone import LoopbackPhone

    server = SipServer(sessions, settings, "127.0.0.1", 0)
    await server.start()
    phone = LoopbackPhone("127.0.0.1", server.port)
    result: dict = {}
    try:
        await phone.dial()
        started = time.monotonic()
        latencies = []
        for i in range(turns):
            phone.say(speech_8k[i % len(speech_8k)])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                if not phone.queue and phone.speech_end and (loud := phone.loud_since(phone.speech_end)):
                    latencies.append((loud[0] - phone.speech_end) * 1000)
                    break
            while phone.loud_since(time.monotonic() - 1.0):
                await asyncio.sleep(0.1)  # let the reply finish
        call = server.calls[phone.call_id]
        assert call.rtp is not None and phone.codec is not None  # the call was answered: media running
        errors = interval_errors_ms(call.rtp.sent_at, started + 1.0)
        result = {
            "reply_latency_ms": {"p50": pct(latencies, 50), "p95": pct(latencies, 95),
                                 "turns": [round(x, 1) for x in latencies]},
            "rtp_pacing_interval_error_ms": {"p50": pct(errors, 50), "p99": pct(errors, 99), "packets": len(errors)},
            "codec": phone.codec.name,
        }
    finally:
        await phone.hang_up()
        await server.close()
    return result


def bench_pipeline(sessions: SessionFactory, settings: Settings, caller: np.ndarray, caller_24k: np.ndarray) -> dict:
    """A headless call (`caller` at 16 kHz; `caller_24k`, for the recording, may be empty);
    per turn, the pipeline's own time from the VAD decision to the first audio frame
    queued, minus the time the models ran in between."""
    import torch

    from agent.call.events import summarize_turns

    from .headless import run_call

    # The overhead is wall time minus device time from the decision to the first frame, so
    # nothing else may run on the device then: the silence timer ends each turn once (the
    # end-of-turn model may end one at "Hello," and the caller's going on withdraws it, its
    # reply's last steps straddling the next decision), replies start at the decision (a
    # preemptive one's model time straddles it), and no caller transcript runs beside them.
    settings = (settings.replace("turn", engine="silence", preemptive=False)
                .replace("records", transcribe=False))
    result = asyncio.run(run_call(sessions, caller, caller_24k, settings, seed=0))
    latencies = [t.latency_ms() for t in result.turns]
    return {"profile": settings.profile, "device": sessions.device, "torch": torch.__version__,
            "turns": len(result.turns), "latency_ms": summarize_turns(latencies),
            "per_turn_ms": latencies}


def bench_turn_replies(sessions: SessionFactory, settings: Settings, variants: Sequence[tuple[str, Settings]],
                       recordings: Sequence[Any]) -> dict:
    """End of the caller's speech to the first reply audio the caller hears, per detector
    setting: each recording played as a headless call (real time while the models think
    and the end-of-turn model decides)."""
    from .headless import run_call

    async def one(s: Settings, rec: Any, seed: int) -> float | None:
        result = await run_call(sessions, rec.audio, np.zeros(0, np.int16), s, seed=seed)
        heard = [t.agent_start for t in result.turns if t.agent_start is not None]
        return (heard[0] - rec.speech_end_s) * 1000 if heard else None

    out: dict[str, Any] = {}
    for name, s in variants:
        values: list[float] = []
        for i, rec in enumerate(recordings):
            latency = asyncio.run(one(s, rec, i))
            if latency is not None:
                values.append(latency)
        out[name] = {"end_to_first_audio_ms": {"p50": pct(values, 50), "p95": pct(values, 95)},
                     "answered": len(values), "recordings": len(recordings)}
    return out
