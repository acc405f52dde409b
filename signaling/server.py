"""The HTTP side of `voice-agent serve` (aiohttp): the web client, WebRTC signaling,
health and Prometheus metrics.

    GET  /               the web client (web/index.html; its files under /static/)
    POST /offer          {"sdp", "type": "offer", "voice"?} -> {"sdp", "type": "answer", "call_id"}
    DELETE /calls/{id}   hang up
    GET  /health         JSON: model status, calls by transport, free call slots, voices
    GET  /metrics        Prometheus text

Every error is a JSON body {"error": reason} with a 4xx/5xx status, those aiohttp makes
itself for requests it cannot parse included (JsonErrorRunner); one bad request never
disturbs the calls in progress. `server.max_calls` is one limit for the process: WebRTC
and SIP calls hold slots of the same CallSlots.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import mimetypes
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiortc import RTCSessionDescription
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from agent.call.events import TurnFinished
from agent.call.factory import SessionFactory
from agent.config import Settings
from agent.errors import VoiceAgentError
from agent.process import MemoryTrimmer
from signaling.mediastream import MAX_MESSAGE_BYTES, MediaStreamCall
from signaling.sip.client import local_address_for
from signaling.sip.endpoint import SipEndpoint, SipServer
from signaling.sip.register import Registration, parse_registrar
from signaling.slots import CallSlots
from signaling.webrtc.call import BadOffer, WebRTCCall

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler

log = logging.getLogger(__name__)
WEB = Path(__file__).resolve().parent.parent / "web"
LAG_INTERVAL_S = 0.1
TRANSPORTS = ("webrtc", "sip", "media-stream")

SESSIONS = web.AppKey("sessions", SessionFactory)
SETTINGS = web.AppKey("settings", Settings)
CALLS = web.AppKey("calls", dict)
SLOTS = web.AppKey("slots", CallSlots)
SIP = web.AppKey("sip", SipEndpoint)  # the SipServer of `serve --sip-port`: its counters, its calls

LAG_MONITOR = web.AppKey("lag_monitor", asyncio.Task)
LOADER = web.AppKey("loader", asyncio.Task)
DRAINING = web.AppKey("draining", asyncio.Event)  # set on SIGTERM: no new calls


def error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own. `sip` gives the SIP
    endpoint (or None) whose `counts` are read at each scrape."""

    def __init__(self, sip: Callable[[], Any] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter("voice_agent_calls", "WebRTC calls answered", registry=r)
        self.rejected = Counter("voice_agent_calls_rejected", "Offers refused", ["reason"], registry=r)
        self.ended = Counter("voice_agent_calls_ended", "WebRTC calls ended, by why (hangup, connect_timeout, "
                             "media_timeout, connection_failed, task_failed, ...)", ["reason"], registry=r)
        self.active = Gauge("voice_agent_calls_active", "Calls in progress, by transport", ["transport"], registry=r)
        self.free_slots = Gauge("voice_agent_call_slots_free", "Calls that can still start (server.max_calls)",
                                registry=r)
        self.turns = Counter("voice_agent_turns", "Turns answered, by outcome", ["outcome"], registry=r)
        self.latency = Histogram("voice_agent_turn_latency_seconds",
                                 "From the end of the caller's speech to each stage of the reply", ["stage"],
                                 buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0), registry=r)
        self.loop_lag = Histogram("voice_agent_event_loop_lag_seconds", "How late the event loop wakes up",
                                  buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5), registry=r)
        self.gpu_memory = Gauge("voice_agent_gpu_memory_mib", "GPU memory (MiB)", ["kind"], registry=r)
        self.models_ready = Gauge("voice_agent_models_ready", "1 when the models are loaded", registry=r)
        self.ready = Gauge("voice_agent_ready", "1 while a new call would be taken (GET /ready)", registry=r)
        self.engine_free = Gauge("voice_agent_engine_free_slots", "Free slots of the batched engines", ["engine"],
                                 registry=r)
        self.sip_registered = Gauge("voice_agent_sip_registered", "1 while the SIP registration (sip.register) holds",
                                    registry=r)
        r.register(_SipCounts(sip))

    def count_slots(self, slots: CallSlots) -> None:
        held = slots.by_transport()
        for transport in TRANSPORTS:
            self.active.labels(transport).set(held.get(transport, 0))
        self.free_slots.set(slots.free)


class _SipCounts:
    """The SIP endpoint's own counters (SipEndpoint.counts, a Counter), read at each scrape."""

    def __init__(self, sip: Callable[[], Any]) -> None:
        self.sip = sip

    def collect(self):
        family = CounterMetricFamily("voice_agent_sip_events", "SIP endpoint events, by kind", labels=["event"])
        for event, n in sorted((getattr(self.sip(), "counts", None) or {}).items()):
            family.add_metric([str(event)], n)
        yield family


METRICS = web.AppKey("metrics", Metrics)
REGISTRATION = web.AppKey("registration", Registration)


def registration_for(sip: SipEndpoint, settings: Settings, host: str) -> Registration:
    """sip.register's Registration of `sip`'s contact (ValueError, one line, for a bad one)."""
    aor, registrar = parse_registrar(settings.sip.register)
    return Registration(sip, aor, registrar, settings.sip.register_expires, sip.advertise)


def sip_address(host: str, settings: Settings) -> str | None:
    """The address SIP puts in Via, Contact and SDP when it listens on a wildcard (0.0.0.0
    or ::), where peers cannot be told "0.0.0.0": the one the route to the registrar
    leaves from (sip.register), else the default route's. None: `host` itself."""
    if host not in ("0.0.0.0", "::", ""):
        return None
    target = parse_registrar(settings.sip.register)[1] if settings.sip.register else ("192.0.2.1", 5060)
    try:
        return local_address_for(target)  # no packet is sent (TEST-NET-1 for the default route)
    except VoiceAgentError:
        log.warning("SIP: no route to %s; advertising 127.0.0.1 (peers elsewhere cannot reach it)", target[0])
        return "127.0.0.1"


def create_app(sessions: SessionFactory, settings: Settings) -> web.Application:
    """The aiohttp application; its models are loaded by the caller (or being loaded).
    Its CallSlots (app[SLOTS]) are the process's: give them to the SipServer too."""
    app = web.Application(client_max_size=settings.server.max_body_kb * 1024, middlewares=[json_errors])
    app[SESSIONS] = sessions
    app[SETTINGS] = settings
    app[CALLS] = {}
    # Each call that ends hands its freed heap pages back (agent/process.py MemoryTrimmer).
    app[SLOTS] = CallSlots(settings.server.max_calls, on_release=MemoryTrimmer().soon)
    app[METRICS] = Metrics(lambda: app.get(SIP))
    app[DRAINING] = asyncio.Event()
    app.router.add_get("/", index)
    app.router.add_get("/static/{name:.*}", static_file)
    app.router.add_post("/offer", offer)
    app.router.add_get("/media-stream", media_stream)
    app.router.add_get("/calls", list_calls)
    app.router.add_get("/calls/{call_id}", get_call)
    app.router.add_delete("/calls/{call_id}", hang_up)
    app.router.add_post("/calls/{call_id}/transfer", transfer)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(start_lag_monitor)
    app.on_shutdown.append(close_all_calls)
    return app


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
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


class _JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, with its own error answers (a request line, header
    or body framing it cannot parse, an unknown method or Content-Encoding) as JSON."""

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response is under way: only the connection can go
            raise ConnectionError("the response has started; cannot send an error")
        reason = "internal error" if status >= 500 else _first_line(message or (str(exc) if exc else "bad request"))
        log.info("HTTP %d to %s: %s", status, request.remote, reason)
        response = error(status, reason)
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """An AppRunner whose connections answer even unparsable requests with JSON errors."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # the same server, only its connections' class differs
        return server


def _first_line(text: str, limit: int = 200) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[0] if lines else "bad request").rstrip(":")[:limit]


async def index(request: web.Request) -> web.Response:
    return _file_response(WEB / "index.html")


async def static_file(request: web.Request) -> web.Response:
    path = web_file(request.match_info["name"])
    if path is None:
        return error(404, "no such file")
    return _file_response(path)


def web_file(name: str) -> Path | None:
    """The file of web/ that `name` (the path after /static/, as aiohttp decoded it) names,
    or None. Only plain relative names of regular files inside web/ qualify: no empty, dot
    or dot-dot segments, no backslashes, no absolute paths, nothing that resolves (through
    a link) outside web/."""
    if not name or any(c in name for c in "\\\x00") or name.startswith("/"):
        return None
    if any(not part or part.startswith(".") for part in name.split("/")):
        return None
    path = (WEB / name).resolve()
    return path if path.is_relative_to(WEB) and path.is_file() else None


def _file_response(path: Path) -> web.Response:
    """The whole file in one response: web/'s files are small, and a FileResponse's own
    errors (a file gone meanwhile, a bad Range) would not be JSON."""
    try:
        body = path.read_bytes()
    except OSError:
        return error(404, "no such file")
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "no-cache"})


async def read_json_body(request: web.Request, max_body_kb: int) -> tuple[Any, web.Response | None]:
    """(the body as JSON, None), or (None, the 4xx to answer): too large, undecodable
    (Content-Encoding, framing), an unknown charset, not text, not JSON, nested too deep."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return None, error(413, f"request body over {max_body_kb} KiB")
    except (RequestPayloadError, HttpProcessingError) as e:
        cause = e.__cause__ if isinstance(e.__cause__, HttpProcessingError) else e
        detail = cause.message if isinstance(cause, HttpProcessingError) else str(cause)
        response = error(400, f"cannot read the body: {_first_line(detail or type(cause).__name__)}")
        response.force_close()  # the rest of the body cannot be parsed: this connection is done
        request.content.feed_eof()  # and aiohttp need not try to drain it after the answer
        return None, response
    charset = request.charset or "utf-8"
    try:
        codecs.lookup(charset)
        text = raw.decode(charset)
    except LookupError:  # unknown, or not a text encoding (rot13, zlib...)
        return None, error(415, f"unknown charset {charset[:40]!r}")
    except UnicodeError:
        return None, error(400, f"the body is not {charset[:40]} text")
    try:
        return json.loads(text), None
    except RecursionError:
        return None, error(400, "the body is JSON nested too deeply")
    except ValueError:
        return None, error(400, "the body is not JSON")


async def offer(request: web.Request) -> web.Response:
    sessions: SessionFactory = request.app[SESSIONS]
    settings: Settings = request.app[SETTINGS]
    slots: CallSlots = request.app[SLOTS]
    m: Metrics = request.app[METRICS]
    body, refusal = await read_json_body(request, settings.server.max_body_kb)
    if refusal is not None:
        m.rejected.labels("too_large" if refusal.status == 413 else "bad_request").inc()
        return refusal
    problem = _check_offer(body, settings)
    if problem:
        m.rejected.labels("bad_request").inc()
        return error(400, problem)
    if not sessions.ready:
        m.rejected.labels("not_ready").inc()
        return error(503, "the models are still loading; try again shortly")
    if request.app[DRAINING].is_set():
        m.rejected.labels("draining").inc()
        return error(503, "the agent is shutting down; call another instance")
    if not slots.free:
        m.rejected.labels("call_limit").inc()
        return error(503, f"the agent is busy: {slots.limit} calls in progress, the limit")
    call = WebRTCCall(sessions, settings, body.get("voice") or None, on_event=_count_turns(m),
                      on_closed=lambda c: _forget(request.app, c),
                      party={"address": request.remote, "user_agent": request.headers.get("User-Agent", "")})
    slots.take(_slot(call), "webrtc")  # held while it is negotiated; no await since the check
    request.app[CALLS][call.id] = call
    answered = False
    try:
        answer = await call.answer(RTCSessionDescription(sdp=body["sdp"], type="offer"))
        answered = True
    except Exception as e:  # noqa: BLE001 - BadOffer, or what aiortc raises on SDP it cannot use
        if not isinstance(e, BadOffer):
            log.warning("offer refused by an unexpected %s", type(e).__name__, exc_info=e)
        log.info("offer refused: %s", e)
        m.rejected.labels("bad_sdp").inc()
        return error(400, f"cannot use this SDP offer: {_first_line(str(e) or type(e).__name__)}")
    finally:
        if not answered:  # whatever happened (a cancelled request too), its slot is freed
            await call.close()  # never raises; its on_closed frees the slot
    m.calls.inc()
    m.count_slots(slots)
    log.info("call %s answered (%d calls in progress)", call.id, slots.count())
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


def _slot(call: WebRTCCall) -> str:
    return f"webrtc:{call.id}"  # SIP's slots are keyed "sip:...": ids never collide


def _forget(app: web.Application, call: WebRTCCall) -> None:
    """The call is over: out of the list, its slot free (idempotent)."""
    if app[CALLS].pop(call.id, None) is not None:
        app[METRICS].ended.labels(call.end_reason or "unknown").inc()
    app[SLOTS].release(_slot(call))
    app[METRICS].count_slots(app[SLOTS])


async def media_stream(request: web.Request) -> web.StreamResponse:
    """A provider's media stream (signaling/mediastream.py): one phone call a WebSocket."""
    sessions: SessionFactory = request.app[SESSIONS]
    slots: CallSlots = request.app[SLOTS]
    unready = unavailable(request.app)
    if unready is not None:
        return error(503, unready)
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES)
    if not ws.can_prepare(request).ok:
        return error(400, "GET /media-stream takes a WebSocket: a provider's media stream (Twilio's format)")
    await ws.prepare(request)
    calls = request.app[CALLS]

    def closed(call: MediaStreamCall) -> None:
        calls.pop(call.id, None)
        request.app[METRICS].ended.labels(f"media-stream:{call.ended_by}").inc()  # few values, unlike reasons
        request.app[METRICS].count_slots(slots)

    call = MediaStreamCall(ws, sessions, request.app[SETTINGS], slots, request.remote, on_closed=closed)
    calls[call.id] = call
    await call.run()
    return ws


async def list_calls(request: web.Request) -> web.Response:
    """The records of the newest finished calls, newest first (?limit=N, default 20)."""
    records = request.app[SESSIONS].records
    raw = request.query.get("limit", "20")
    try:
        limit = int(raw)
    except ValueError:
        return error(400, f"limit must be a whole number, got {raw[:20]!r}")
    if not 1 <= limit <= 10_000:
        return error(400, f"limit must be between 1 and 10000, got {limit}")
    return web.json_response({"calls": [r.to_dict() for r in records.recent(limit)]})


async def get_call(request: web.Request) -> web.Response:
    call_id = request.match_info["call_id"]
    record = request.app[SESSIONS].records.get(call_id)
    if record is None:
        state = "in progress: its record is kept when it ends" if call_id in request.app[CALLS] else "no such call"
        return error(404, f"{state} ({call_id[:64]!r}; the newest records.keep calls are kept)")
    return web.json_response(record.to_dict())


async def hang_up(request: web.Request) -> web.Response:
    call = request.app[CALLS].get(request.match_info["call_id"])
    if call is None:
        return error(404, "no such call")
    await call.close()
    return web.json_response({"call_id": call.id, "state": "ended"})


async def transfer(request: web.Request) -> web.Response:
    """Hand a phone call on: {"to": "sip:..."} (session.transfer_to without one). 202 once
    the REFER is under way; the outcome comes as the session's CallTransferred event and in
    the call's record."""
    call_id = request.match_info["call_id"]
    body, refusal = await read_json_body(request, request.app[SETTINGS].server.max_body_kb)
    if refusal is not None:
        return refusal
    if not isinstance(body, dict):
        return error(400, "the body must be a JSON object")
    target = body.get("to") or request.app[SETTINGS].session.transfer_to
    if not isinstance(target, str) or not target.startswith("sip:") or any(c in target for c in "<>\r\n \""):
        return error(400, f"field to must be a sip: URI, got {str(target)[:80]!r}")
    sip = request.app.get(SIP)
    call = next((c for c in (sip.calls.values() if sip is not None else ())
                 if c.session is not None and c.session.call_id == call_id), None)
    if call is None:
        if call_id in request.app[CALLS]:
            return error(409, "only phone calls (SIP) can be transferred")
        return error(404, "no such call")
    if call.transfer is not None or not call.confirmed or call.ended:
        return error(409, "the call cannot be transferred now (not answered, ending, or a transfer under way)")
    assert sip is not None  # the call was found among its calls
    task = asyncio.ensure_future(sip.transfer(call, target))
    call.tasks.append(task)
    return web.json_response({"call_id": call_id, "to": target, "state": "transferring"}, status=202)


def unavailable(app: web.Application) -> str | None:
    """Why this process takes no new call now (None: it does): the models are loading, it
    is draining, or every call slot is taken. /ready, /offer, INVITE and OPTIONS agree."""
    if not app[SESSIONS].ready:
        return "the models are still loading; try again shortly"
    if app[DRAINING].is_set():
        return "the agent is shutting down; call another instance"
    slots = app[SLOTS]
    if not slots.free:
        return f"the agent is busy: {slots.limit} calls in progress, the limit"
    return None


async def ready(request: web.Request) -> web.Response:
    """Readiness for load balancers: 200 while a new call would be taken, else 503; with
    the free call slots and the engines' free speech and reply slots. (/health stays
    liveness: 200 while the process runs.)"""
    reason = unavailable(request.app)
    sessions: SessionFactory = request.app[SESSIONS]
    body: dict[str, Any] = {"ready": reason is None, "free_slots": request.app[SLOTS].free,
            "engine_free_slots": sessions.free_engine_slots() if sessions.ready else None}
    if reason is not None:
        body["reason"] = reason
    return web.json_response(body, status=200 if reason is None else 503)


async def health(request: web.Request) -> web.Response:
    sessions: SessionFactory = request.app[SESSIONS]
    settings: Settings = request.app[SETTINGS]
    slots: CallSlots = request.app[SLOTS]
    held = slots.by_transport()
    return web.json_response({
        "status": "ready" if sessions.ready else "loading",
        "models": sessions.loaded,
        "active_calls": slots.count(),
        "calls_by_transport": {t: held.get(t, 0) for t in TRANSPORTS},
        "free_slots": slots.free,
        "max_calls": slots.limit,
        "sip_registration": _registration_state(request.app),
        "voices": list(settings.tts.voices),
        "default_voice": settings.session.voice or settings.tts.default_voice,
    })


def _registration_state(app: web.Application) -> dict[str, Any] | None:
    registration = app.get(REGISTRATION)
    if registration is None:
        return None
    return {"aor": str(registration.aor), "state": registration.state, "expires_s": registration.granted}


async def metrics(request: web.Request) -> web.Response:
    m: Metrics = request.app[METRICS]
    sessions: SessionFactory = request.app[SESSIONS]
    m.models_ready.set(1 if sessions.ready else 0)
    m.ready.set(1 if unavailable(request.app) is None else 0)
    if sessions.ready:
        for engine, free in sessions.free_engine_slots().items():
            if free is not None:
                m.engine_free.labels(engine).set(free)
    registration = request.app.get(REGISTRATION)
    if registration is not None:
        m.sip_registered.set(1 if registration.state == "registered" else 0)
    m.count_slots(request.app[SLOTS])
    for kind, value in sessions.memory_stats().items():
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
    await asyncio.gather(*(call.close("shutdown") for call in list(app[CALLS].values())))


async def run_server(app: web.Application, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve `app` on host:port until `stop` is set or SIGINT/SIGTERM, then drain (see
    drain()) and shut down gracefully (calls hung up, SIP closed)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = JsonErrorRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("listening on http://%s:%d/ while the models load", host, port)
        await stop.wait()
        stop.clear()
        await drain(app, stop)
    finally:
        await runner.cleanup()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def drain(app: web.Application, stop: asyncio.Event) -> None:
    """Take no new call (503 to /offer, /ready, INVITE and OPTIONS) and let the calls in
    progress end by themselves, for up to server.drain_s or until `stop` is set again."""
    app[DRAINING].set()
    sip = app.get(SIP)
    if isinstance(sip, SipServer):
        sip.draining = True
    slots, limit = app[SLOTS], app[SETTINGS].server.drain_s
    if not slots.count() or not limit:
        return
    log.info("draining: %d calls in progress may go on for up to %.0f s (signal again to end them now)",
             slots.count(), limit)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while slots.count() and (left := deadline - loop.time()) > 0 and not stop.is_set():
        with contextlib.suppress(TimeoutError):  # a second signal, or time to look at the calls again
            await asyncio.wait_for(stop.wait(), min(0.2, left))
    if slots.count():
        log.info("drained for %.0f s: ending the %d calls left", limit - max(0.0, deadline - loop.time()),
                 slots.count())


def serve(sessions: SessionFactory, load: Callable[[], None], settings: Settings, host: str, port: int,
          sip_port: int = 0) -> None:
    """Answer calls until interrupted (Ctrl-C, SIGTERM). The page and /health answer at
    once; `load` (the models) runs in a worker thread meanwhile (/health says "loading",
    /offer 503). If it fails, the server stops and the error is raised. With a SIP port,
    phone calls are answered there too (UDP), within the same call limit."""
    app = create_app(sessions, settings)
    failure: list[BaseException] = []
    stop = asyncio.Event()
    sip = (SipServer(sessions, settings, host, sip_port, advertise=sip_address(host, settings), slots=app[SLOTS])
           if sip_port else None)

    async def start_sip(app: web.Application) -> None:
        assert sip is not None  # registered only with a SIP port
        await sip.start()
        if settings.sip.register:
            app[REGISTRATION] = registration = registration_for(sip, settings, host)
            registration.start()  # beside the start: a registrar that never answers holds nothing up

    async def stop_sip(app: web.Application) -> None:
        assert sip is not None  # registered only with a SIP port
        if REGISTRATION in app:
            await app[REGISTRATION].stop()
        await sip.close()

    if sip is not None:
        app[SIP] = sip
        app.on_startup.append(start_sip)
        app.on_shutdown.append(stop_sip)

    async def load_models(app: web.Application) -> None:
        async def in_background() -> None:
            try:
                await asyncio.to_thread(load)
                log.info("voice agent ready: open http://%s:%d/ in a browser", host, port)
            except Exception as e:  # noqa: BLE001 - reported after the server stops
                failure.append(e)
                stop.set()

        app[LOADER] = asyncio.ensure_future(in_background())

    app.on_startup.append(load_models)
    asyncio.run(run_server(app, host, port, stop))
    if failure:
        raise failure[0]
