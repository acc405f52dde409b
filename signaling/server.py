"""The HTTP side of `voice-agent serve` (aiohttp): the web client, WebRTC signaling,
health and Prometheus metrics.

    GET  /               the web client (web/index.html; its files under /static/)
    POST /offer          {"sdp", "type": "offer", "voice"?} -> {"sdp", "type": "answer", "call_id"}
    DELETE /calls/{id}   hang up
    GET  /health         JSON: model status, active calls, voices
    GET  /metrics        Prometheus text

Every error is a JSON body {"error": reason} with a 4xx/5xx status; one bad request
never disturbs the calls in progress.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from aiortc import RTCSessionDescription
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agent.config import Settings
from agent.models import UnifiedModelManager
from agent.session import TurnFinished

from .webrtc import WebRTCCall

log = logging.getLogger(__name__)
WEB = Path(__file__).resolve().parent.parent / "web"
LAG_INTERVAL_S = 0.1

MODELS = web.AppKey("models", UnifiedModelManager)
SETTINGS = web.AppKey("settings", Settings)
CALLS = web.AppKey("calls", dict)

LAG_MONITOR = web.AppKey("lag_monitor", asyncio.Task)
LOADER = web.AppKey("loader", asyncio.Task)


def error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter("voice_agent_calls", "Calls answered", registry=r)
        self.rejected = Counter("voice_agent_calls_rejected", "Offers refused", ["reason"], registry=r)
        self.active = Gauge("voice_agent_calls_active", "Calls in progress", registry=r)
        self.turns = Counter("voice_agent_turns", "Turns answered, by outcome", ["outcome"], registry=r)
        self.latency = Histogram("voice_agent_turn_latency_seconds",
                                 "From the end of the caller's speech to each stage of the reply", ["stage"],
                                 buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0), registry=r)
        self.loop_lag = Histogram("voice_agent_event_loop_lag_seconds", "How late the event loop wakes up",
                                  buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5), registry=r)
        self.gpu_memory = Gauge("voice_agent_gpu_memory_mib", "GPU memory (MiB)", ["kind"], registry=r)
        self.models_ready = Gauge("voice_agent_models_ready", "1 when the models are loaded", registry=r)


METRICS = web.AppKey("metrics", Metrics)


def create_app(models: UnifiedModelManager, settings: Settings) -> web.Application:
    """The aiohttp application; the models are loaded by the caller (or being loaded)."""
    app = web.Application(client_max_size=settings.server.max_body_kb * 1024, middlewares=[json_errors])
    app[MODELS] = models
    app[SETTINGS] = settings
    app[CALLS] = {}
    app[METRICS] = Metrics()
    app.router.add_get("/", index)
    app.router.add_static("/static/", WEB, show_index=False)
    app.router.add_post("/offer", offer)
    app.router.add_delete("/calls/{call_id}", hang_up)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(start_lag_monitor)
    app.on_shutdown.append(close_all_calls)
    return app


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413) as JSON too; anything unexpected is a 500."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error(e.status, e.reason)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error(500, "internal error")


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(WEB / "index.html")


async def offer(request: web.Request) -> web.Response:
    models: UnifiedModelManager = request.app[MODELS]
    settings: Settings = request.app[SETTINGS]
    calls: dict[str, WebRTCCall] = request.app[CALLS]
    m: Metrics = request.app[METRICS]
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge:
        m.rejected.labels("too_large").inc()
        return error(413, f"request body over {settings.server.max_body_kb} KiB")
    except (ValueError, UnicodeDecodeError):
        m.rejected.labels("bad_request").inc()
        return error(400, "the body is not JSON")
    problem = _check_offer(body, settings)
    if problem:
        m.rejected.labels("bad_request").inc()
        return error(400, problem)
    if not models.ready:
        m.rejected.labels("not_ready").inc()
        return error(503, "the models are still loading; try again shortly")
    if len(calls) >= settings.server.max_calls:
        m.rejected.labels("call_limit").inc()
        return error(503, f"the agent is busy: {settings.server.max_calls} calls in progress, the limit")
    call = WebRTCCall(models, settings, body.get("voice") or None, on_event=_count_turns(m),
                      on_closed=lambda c: _forget(request.app, c))
    calls[call.id] = call  # counts against the limit while it is negotiated
    try:
        answer = await call.answer(RTCSessionDescription(sdp=body["sdp"], type="offer"))
    except Exception as e:  # aiortc raises ValueError and others on SDP it cannot use
        log.info("offer refused: %s", e)
        await call.close()
        m.rejected.labels("bad_sdp").inc()
        return error(400, f"cannot use this SDP offer: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
    m.calls.inc()
    m.active.set(len(calls))
    log.info("call %s answered (%d active)", call.id, len(calls))
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "call_id": call.id})


def _check_offer(body: Any, settings: Settings) -> str | None:
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if not isinstance(body.get("sdp"), str) or not body["sdp"].strip():
        return "missing field: sdp (a string)"
    if body.get("type") != "offer":
        return 'field type must be "offer"'
    voice = body.get("voice")
    if voice not in (None, "") and (not isinstance(voice, str) or voice not in settings.tts.voices):
        return f"unknown voice {voice!r}; choose from: {', '.join(settings.tts.voices)}"
    return None


def _count_turns(m: Metrics):
    def on_event(call: WebRTCCall, event: Any) -> None:
        if isinstance(event, TurnFinished):
            record = event.turn
            m.turns.labels("interrupted" if record.interrupted else "answered").inc()
            for stage, ms in record.latency_ms().items():
                if ms is not None and stage != "pipeline_overhead":
                    m.latency.labels(stage).observe(ms / 1000)
    return on_event


def _forget(app: web.Application, call: WebRTCCall) -> None:
    app[CALLS].pop(call.id, None)
    app[METRICS].active.set(len(app[CALLS]))


async def hang_up(request: web.Request) -> web.Response:
    call = request.app[CALLS].get(request.match_info["call_id"])
    if call is None:
        return error(404, "no such call")
    await call.close()
    return web.json_response({"call_id": call.id, "state": "ended"})


async def health(request: web.Request) -> web.Response:
    models: UnifiedModelManager = request.app[MODELS]
    settings: Settings = request.app[SETTINGS]
    return web.json_response({
        "status": "ready" if models.ready else "loading",
        "models": models.loaded,
        "active_calls": len(request.app[CALLS]),
        "max_calls": settings.server.max_calls,
        "voices": list(settings.tts.voices),
        "default_voice": settings.session.voice or settings.tts.default_voice,
    })


async def metrics(request: web.Request) -> web.Response:
    m: Metrics = request.app[METRICS]
    models: UnifiedModelManager = request.app[MODELS]
    m.models_ready.set(1 if models.ready else 0)
    m.active.set(len(request.app[CALLS]))
    for kind, value in models.memory.stats().items():
        m.gpu_memory.labels(kind.removesuffix("_mib")).set(value)
    return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_lag_monitor(app: web.Application) -> None:
    async def watch() -> None:
        while True:
            due = time.monotonic() + LAG_INTERVAL_S
            await asyncio.sleep(LAG_INTERVAL_S)
            app[METRICS].loop_lag.observe(max(0.0, time.monotonic() - due))

    app[LAG_MONITOR] = asyncio.ensure_future(watch())


async def close_all_calls(app: web.Application) -> None:
    app[LAG_MONITOR].cancel()
    await asyncio.gather(*(call.close() for call in list(app[CALLS].values())), return_exceptions=True)


def serve(settings: Settings, host: str, port: int, sip_port: int = 0) -> None:
    """Answer calls until interrupted (Ctrl-C). The page and /health answer at once;
    the models load in the background meanwhile (/health says "loading", /offer 503).
    If they cannot be loaded, the server stops and the error is raised. With a SIP port,
    phone calls are answered there too (UDP)."""
    from .sip import SipServer

    models = UnifiedModelManager(settings)
    app = create_app(models, settings)
    failure: list[BaseException] = []
    sip = SipServer(models, settings, host, sip_port) if sip_port else None

    async def start_sip(app: web.Application) -> None:
        await sip.start()

    async def stop_sip(app: web.Application) -> None:
        await sip.close()

    if sip is not None:
        app.on_startup.append(start_sip)
        app.on_shutdown.append(stop_sip)

    async def load_models(app: web.Application) -> None:
        async def load() -> None:
            try:
                await asyncio.to_thread(models.load)
                log.info("voice agent ready: open http://%s:%d/ in a browser", host, port)
            except Exception as e:  # noqa: BLE001 - reported after the server stops
                failure.append(e)
                os.kill(os.getpid(), signal.SIGINT)  # run_app's own graceful shutdown

        app[LOADER] = asyncio.ensure_future(load())

    app.on_startup.append(load_models)
    log.info("listening on http://%s:%d/ while the models load", host, port)
    try:
        web.run_app(app, host=host, port=port, print=None)
    finally:
        models.unload()
    if failure:
        raise failure[0]
