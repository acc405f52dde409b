"""`voice-agent bench webrtc`: outbound pacing, reply latency and call capacity over
loopback WebRTC, with real aiortc peers."""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp
import numpy as np
from aiohttp import web

from agent.config import Settings
from agent.models import UnifiedModelManager

from .loopback import Caller
from .server import CALLS, create_app

PACING_LIMIT_MS = 5.0


def interval_errors_ms(sent_at, since: float) -> list[float]:
    """|interval - 20 ms| between consecutive frames sent after `since`."""
    times = np.array([t for t in sent_at if t >= since])
    return list(np.abs(np.diff(times) - 0.02) * 1000) if len(times) > 1 else []


def pct(values, q) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


async def bench_webrtc(models: UnifiedModelManager, settings: Settings, speech: list[np.ndarray],
                       turns: int = 4, level_s: float = 4.0, max_level: int = 64) -> dict:
    settings = settings.replace("server", max_calls=max_level + 1)
    runner = web.AppRunner(create_app(models, settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    app = runner.app
    result: dict = {}
    try:
        async with aiohttp.ClientSession() as http:
            # 1. End of caller speech -> first reply audio heard, and pacing during speech.
            caller = Caller(base)
            await caller.dial(http)
            latencies = []
            started = time.monotonic()
            for i in range(turns):
                caller.mic.say(speech[i % len(speech)], pause_s=0.5)
                await caller.wait_for(lambda: caller.mic.speech_end is not None
                                      and caller.loud_since(caller.mic.speech_end), timeout=60)
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
            levels = []
            n = 1
            while n <= max_level:
                before = set(app[CALLS])
                load = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "signaling.loopback", base, str(n), str(level_s + 2.0))
                deadline = time.monotonic() + 30
                while len(set(app[CALLS]) - before) < n and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                calls = [app[CALLS][i] for i in set(app[CALLS]) - before]
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


async def bench_sip(models: UnifiedModelManager, settings: Settings, speech_8k: list[np.ndarray],
                    turns: int = 4) -> dict:
    """One SIP call over loopback: a phone (an RtpSession of our own, sending continuous
    PCMU as phones do) asks `turns` questions. Reports end of caller speech -> first voiced
    reply RTP packet, and the agent's RTP send pacing."""
    from .rtp import RtpSession
    from .sdp import codec_from_answer, make_offer, parse_sdp
    from .sip import SipServer
    from .sip_message import SipMessage, parse_message

    server = SipServer(models, settings, "127.0.0.1", 0)
    await server.start()
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue = asyncio.Queue()

    class PhoneSignaling(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr) -> None:
            replies.put_nowait(parse_message(data))

    sip_transport, _ = await loop.create_datagram_endpoint(PhoneSignaling, local_addr=("127.0.0.1", 0))
    sip_port = sip_transport.get_extra_info("sockname")[1]
    queue: list[np.ndarray] = []  # the phone's outgoing 20 ms frames
    heard: list[tuple[float, float]] = []  # (time, RMS) of each 20 ms the phone plays
    speech_end = [0.0]

    def take_frame():
        if not queue:
            return None
        frame = queue.pop(0)
        if not queue:
            speech_end[0] = time.monotonic()
        return frame

    phone = RtpSession("PCMU", 0, None, ("127.0.0.1", 9), take_frame, 8000,
                       lambda s: heard.append((time.monotonic(), float(np.sqrt(np.mean(s.astype(float) ** 2))))))
    rtp_port = await phone.start("127.0.0.1")
    body = make_offer("127.0.0.1", rtp_port, 1).encode()

    def request(method: str, cseq: int, to_tag: str = "", with_body: bool = False) -> bytes:
        headers = [("Via", f"SIP/2.0/UDP 127.0.0.1:{sip_port};branch=z9hG4bK{method}{cseq};rport"),
                   ("Max-Forwards", "70"), ("From", "<sip:bench@127.0.0.1>;tag=bench"),
                   ("To", "<sip:agent@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")),
                   ("Call-ID", "bench-sip-call"), ("CSeq", f"{cseq} {method}")]
        if with_body:
            headers.append(("Content-Type", "application/sdp"))
        return SipMessage(method=method, uri=f"sip:agent@127.0.0.1:{server.port}", headers=headers,
                          body=body if with_body else b"").to_bytes()

    result: dict = {}
    try:
        sip_transport.sendto(request("INVITE", 1, with_body=True), ("127.0.0.1", server.port))
        while (ok := await asyncio.wait_for(replies.get(), 10)).status < 200:
            pass
        codec = codec_from_answer(parse_sdp(ok.body.decode()))
        phone.remote = (codec.remote_ip, codec.remote_port)
        sip_transport.sendto(request("ACK", 1, to_tag=ok.to_tag), ("127.0.0.1", server.port))
        started = time.monotonic()
        latencies = []
        for i in range(turns):
            audio = np.concatenate([np.zeros(4000, np.int16), speech_8k[i % len(speech_8k)]])
            queue.extend(np.split(audio[:len(audio) // 160 * 160], len(audio) // 160))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                if not queue and speech_end[0]:
                    loud = [t for t, rms in heard if t > speech_end[0] and rms > 300]
                    if loud:
                        latencies.append((loud[0] - speech_end[0]) * 1000)
                        break
            while any(rms > 300 for t, rms in heard if t > time.monotonic() - 1.0):
                await asyncio.sleep(0.1)  # let the reply finish
        call = server.calls["bench-sip-call"]
        errors = interval_errors_ms(call.rtp.sent_at, started + 1.0)
        sip_transport.sendto(request("BYE", 2, to_tag=ok.to_tag), ("127.0.0.1", server.port))
        await asyncio.sleep(0.2)
        result = {
            "reply_latency_ms": {"p50": pct(latencies, 50), "p95": pct(latencies, 95),
                                 "turns": [round(x, 1) for x in latencies]},
            "rtp_pacing_interval_error_ms": {"p50": pct(errors, 50), "p99": pct(errors, 99), "packets": len(errors)},
            "codec": codec.name,
        }
    finally:
        await phone.close()
        sip_transport.close()
        await server.close()
    return result
