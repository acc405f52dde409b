"""A browser call over WebRTC (aiortc): the peer connection around one CallSession.

In: the remote audio track is drained all the time (aiortc's queue is unbounded) and
each frame goes to the session, which resamples it with PyAV. Out: SessionAudioTrack
hands aiortc one 20 ms frame per recv(), paced by the wall clock. Events go to the page
as JSON on the "events" data channel.
"""

from __future__ import annotations

import asyncio
import contextvars
import fractions
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription, sdp
from aiortc.codecs import CODECS
from aiortc.exceptions import InvalidStateError, OperationError
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcpeerconnection import find_common_codecs

from agent.call.events import (
    AgentHungUp,
    AgentInterrupted,
    AgentPaused,
    AgentReplyText,
    AgentResumed,
    CallerSpeechStarted,
    CallerSpeechStopped,
    CallerTranscript,
    TurnFailed,
    TurnFinished,
    event_message,
)
from agent.call.factory import SessionFactory
from agent.call.outbound import OutboundAudio
from agent.call.session import CallSession
from agent.config import Settings
from agent.rates import OUT_RATE
from signaling.pacing import PacedClock

log = logging.getLogger(__name__)


class SessionAudioTrack(MediaStreamTrack):
    """The agent's voice as an aiortc audio track: 20 ms frames at the session's rate.

    aiortc takes the RTP clock from the frames' pts, so pacing is only when recv()
    returns (signaling/pacing.py). Silence goes out when there is nothing to say. The
    frame is taken from the queue after the wait, so a barge-in that clears the queue
    meanwhile is heard at the very next frame; pts keep counting through it."""

    kind = "audio"

    def __init__(self, outbound: OutboundAudio, rate: int = OUT_RATE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.outbound = outbound
        self.rate = rate
        self.samples = outbound.frame_samples
        self.clock = clock
        self.pace = PacedClock(self.samples / rate, clock)
        self._pts = 0
        self.sent_at: deque[float] = deque(maxlen=10_000)  # when each frame left (pacing bench)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self.pace.wait()
        self.sent_at.append(self.clock())
        frame = self.outbound.get_nowait()
        samples = frame.samples if frame is not None else np.zeros(self.samples, dtype=np.int16)
        out = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        out.sample_rate = self.rate
        out.pts = self._pts
        out.time_base = fractions.Fraction(1, self.rate)
        self._pts += self.samples
        return out


PAGE_EVENTS = (CallerSpeechStarted, CallerSpeechStopped, CallerTranscript, AgentReplyText, AgentInterrupted, AgentPaused,
               AgentResumed, TurnFinished, TurnFailed, AgentHungUp)
HANGUP_NOTICE_S = 0.2  # time for the page's "hangup" message to go out before the call closes


def event_json(event: Any) -> str | None:
    """A session event as the JSON message the page gets (None for events it does not need)."""
    return json.dumps(event_message(event)) if isinstance(event, PAGE_EVENTS) else None


class BadOffer(ValueError):
    """The SDP offer cannot be used; str() is a one-line reason for the caller."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def check_offer(text: str) -> sdp.SessionDescription:
    """Parse an SDP offer and refuse, with BadOffer, what aiortc would choke on half-way
    (it builds transceivers before it notices, and then cannot close them)."""
    try:
        offer = sdp.SessionDescription.parse(text)
    except Exception as e:  # noqa: BLE001 - aiortc's parser raises anything on bad text
        raise BadOffer(f"unparsable SDP ({_one_line(e)})") from e
    if not any(m.kind == "audio" for m in offer.media):
        raise BadOffer("the offer has no audio")
    mids = [m.rtp.muxId for m in offer.media]
    if not all(mids) or len(set(mids)) != len(mids):
        raise BadOffer("every m-line needs an a=mid of its own")
    for m in offer.media:
        if m.kind not in ("audio", "video", "application"):
            raise BadOffer(f"unknown media kind {m.kind!r}")
        if m.ice is None or not m.ice.usernameFragment or not m.ice.password:
            raise BadOffer(f"m-line {m.rtp.muxId}: ICE username fragment or password is missing")
        if m.dtls is None or not m.dtls.fingerprints or m.dtls.role is None:
            raise BadOffer(f"m-line {m.rtp.muxId}: DTLS fingerprint or setup is missing")
        if m.kind == "application" and m.sctp_port is None and m.profile != "DTLS/SCTP":
            raise BadOffer(f"m-line {m.rtp.muxId}: no a=sctp-port")
        if m.kind == "audio":
            if m.direction not in sdp.DIRECTIONS:
                raise BadOffer(f"m-line {m.rtp.muxId}: no direction (sendrecv, ...)")
            if not m.rtcp_mux:
                raise BadOffer(f"m-line {m.rtp.muxId}: RTCP mux is not enabled")
            if not find_common_codecs(CODECS["audio"], m.rtp.codecs):
                raise BadOffer(f"m-line {m.rtp.muxId}: no audio codec in common (Opus, G.722, PCMU, PCMA)")
    for group in offer.group:
        if group.semantic == "BUNDLE" and not set(group.items) <= set(mids):
            raise BadOffer("a=group:BUNDLE names an m-line that is not there")
    return offer


def answer_as_dtls_server(offer: sdp.SessionDescription, answer: str) -> str:
    """Answer a=setup:passive where the offer let us choose (actpass): the agent is then
    the DTLS server. As a client aiortc offers only ECDSA cipher suites, which a server
    with an RSA certificate (GStreamer's webrtcbin, OpenSSL) refuses: "no shared cipher"."""
    head, *sections = answer.split("\r\nm=")
    for i, media in enumerate(offer.media[:len(sections)]):
        if media.dtls is not None and media.dtls.role == "auto":
            sections[i] = sections[i].replace("a=setup:active", "a=setup:passive")
    return "\r\nm=".join([head, *sections])


# The reason a DTLS handshake failed is only in aiortc's debug log. The connect task
# that runs the handshake is started from answer(), so it inherits this context
# variable: the filter below files each failure with its own call.
_dtls_failures: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("dtls_failures", default=None)


class _DtlsFailureFilter(logging.Filter):
    """Keeps aiortc's "handshake failed" lines for the call; passes on only what the
    logger let through before it was opened to DEBUG for this."""

    def __init__(self, floor: int) -> None:
        super().__init__()
        self.floor = floor

    def filter(self, record: logging.LogRecord) -> bool:
        sink = _dtls_failures.get()
        if sink is not None and "handshake failed" in str(record.msg):
            sink.append(record.getMessage())
        return record.levelno >= self.floor


def _watch_dtls_failures() -> None:
    logger = logging.getLogger("aiortc.rtcdtlstransport")
    if not any(isinstance(f, _DtlsFailureFilter) for f in logger.filters):
        logger.addFilter(_DtlsFailureFilter(logger.getEffectiveLevel()))
        logger.setLevel(logging.DEBUG)


class WebRTCCall:
    """One browser call. answer() negotiates; close() hangs up and frees everything.

    A call ends by itself when its peer does not connect within server.connect_timeout_s,
    when no audio comes from a connected peer for server.media_timeout_s (a killed
    client sends no DTLS close; ICE consent would take 30 s to notice), when the
    connection fails or closes, and when one of its tasks fails. `end_reason` says which
    (set before on_closed): "hangup", "shutdown", "bad_offer", "connect_timeout",
    "media_timeout", "connection_failed", "connection_closed", "audio_ended", "task_failed",
    "agent hung up: ...". A call that got past its offer leaves a call record (`party`:
    who offered it)."""

    def __init__(self, sessions: SessionFactory, settings: Settings, voice: str | None,
                 on_event: Callable[[WebRTCCall, Any], None] | None = None,
                 on_closed: Callable[[WebRTCCall], None] | None = None,
                 party: dict[str, Any] | None = None) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.party = party or {}
        self.sessions = sessions
        self.settings = settings
        self.voice = voice
        self.on_event = on_event
        self.on_closed = on_closed
        self.pc = RTCPeerConnection()
        self.session: CallSession | None = None
        self.track: SessionAudioTrack | None = None
        self.channel = None
        self.end_reason: str | None = None
        self.failure: str | None = None  # why ICE/DTLS failed, when they did
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._connected = asyncio.Event()
        self._peer_sends_audio = False
        self._last_audio = time.monotonic()
        self._dtls_failures: list[str] = []
        self._closing: asyncio.Future | None = None

    async def answer(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        """The SDP answer. BadOffer (the call closed) when the offer cannot be used."""
        try:
            parsed = check_offer(offer.sdp)  # before any aiortc object is touched
        except BadOffer:
            await self.close("bad_offer")
            raise
        self.session = self.sessions.new_session(self.settings, voice=self.voice, call_id=self.id)
        self._spawn(self._end_when_the_session_does(self.session), "session end")
        self.track = SessionAudioTrack(self.session.outbound)
        self._peer_sends_audio = any(m.kind == "audio" and m.direction in ("sendrecv", "sendonly")
                                     for m in parsed.media)
        self._listen(self.pc)
        _watch_dtls_failures()
        token = _dtls_failures.set(self._dtls_failures)
        try:
            await self._negotiate(offer, parsed)
        except BadOffer:
            await self.close("bad_offer")
            raise
        except (AttributeError, ValueError, IndexError, KeyError, TypeError, AssertionError,
                InvalidStateError, OperationError) as e:  # what aiortc raises on SDP it cannot use
            await self.close("bad_offer")
            raise BadOffer(f"cannot use this SDP offer ({_one_line(e)})") from e
        finally:
            _dtls_failures.reset(token)
        self._spawn(self._forward_events(), "event forwarder")
        self._spawn(self._watch(), "connection watchdog")
        return self.pc.localDescription

    async def _negotiate(self, offer: RTCSessionDescription, parsed: sdp.SessionDescription) -> None:
        pc = self.pc
        await pc.setRemoteDescription(offer)
        if not any(t.kind == "audio" for t in pc.getTransceivers()):
            raise BadOffer("the offer has no audio")
        assert self.track is not None  # answer() made it
        pc.addTrack(self.track)  # takes the offer's audio transceiver: sendrecv
        answer = await pc.createAnswer()
        await pc.setLocalDescription(RTCSessionDescription(answer_as_dtls_server(parsed, answer.sdp),
                                                           answer.type))  # gathers ICE fully

    def _listen(self, pc: RTCPeerConnection) -> None:
        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            self.channel = channel

        @pc.on("track")
        def on_track(track) -> None:
            if track.kind == "audio" and not self._closed:
                self._spawn(self._drain(track), "inbound audio")

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            if state == "connected":
                self._last_audio = time.monotonic()
                self._connected.set()
                if self.session is not None:
                    self.session.greet()
            if state == "failed":
                self.failure = self._failure_cause()
                log.warning("call %s: connection failed: %s", self.id, self.failure)
            else:
                log.info("call %s: connection %s", self.id, state)
            if state in ("failed", "closed"):
                await self.close(f"connection_{state}")

    def _failure_cause(self) -> str:
        """What failed, from the transports' states and aiortc's DTLS log."""
        parts = []
        transports = [t.receiver.transport for t in self.pc.getTransceivers()]
        if self.pc.sctp is not None:
            transports.append(self.pc.sctp.transport)
        for dtls in {id(t): t for t in transports if t is not None}.values():
            ice = dtls.transport
            parts.append(f"ICE {ice.state} ({len(ice.getRemoteCandidates())} remote candidates), "
                         f"DTLS {dtls.state} as {'server' if dtls._role == 'server' else 'client'}")
        parts.extend(dict.fromkeys(self._dtls_failures))  # aiortc's own words, once each
        return "; ".join(parts) or "unknown"

    async def _end_when_the_session_does(self, session: CallSession) -> None:
        """The agent hangs up (session.idle_hangup_s): close the call."""
        await session.ended.wait()
        await asyncio.sleep(HANGUP_NOTICE_S)  # the forwarder sends the page the hangup first
        await self.close(f"agent hung up: {session.end_reason}")

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Run one of the call's tasks: a failure is logged once and ends the call."""
        task = asyncio.ensure_future(coro)
        task.add_done_callback(lambda t: self._task_done(t, what))
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task, what: str) -> None:
        if task.cancelled() or task.exception() is None:  # exception() retrieves it: never "never retrieved"
            return
        log.error("call %s: the %s failed; ending the call", self.id, what, exc_info=task.exception())
        if not self._closed:
            self._closing = asyncio.ensure_future(self.close("task_failed"))  # close() never raises

    async def _watch(self) -> None:
        """End a call whose peer never connects, or goes silent once connected."""
        server = self.settings.server
        try:
            await asyncio.wait_for(self._connected.wait(), server.connect_timeout_s)
        except TimeoutError:
            log.warning("call %s: not connected within %.0f s (%s); closing", self.id,
                        server.connect_timeout_s, self._failure_cause())
            await self.close("connect_timeout")
            return
        if not self._peer_sends_audio:
            return
        check = min(1.0, server.media_timeout_s / 4)
        while True:
            await asyncio.sleep(check)
            silent = time.monotonic() - self._last_audio
            if silent > server.media_timeout_s:
                log.warning("call %s: no audio from the caller for %.1f s; closing", self.id, silent)
                await self.close("media_timeout")
                return

    async def _drain(self, track) -> None:
        """Keep reading the caller's audio; the track's queue grows without bound otherwise."""
        assert self.session is not None  # answer() made it before listening for tracks
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                break
            self._last_audio = time.monotonic()
            samples = frame.to_ndarray()
            if frame.format.is_planar:
                samples = samples.T
            self.session.push_audio(samples.reshape(-1), frame.sample_rate, len(frame.layout.channels))
        log.info("call %s: the caller's audio ended", self.id)
        await self.close("audio_ended")

    async def _forward_events(self) -> None:
        assert self.session is not None  # answer() made it before starting this
        while True:
            event = await self.session.events.get()
            if self.on_event is not None:
                self.on_event(self, event)
            message = event_json(event)
            if message is not None and self.channel is not None and self.channel.readyState == "open":
                self.channel.send(message)

    async def close(self, reason: str = "hangup") -> None:
        """Hang up and free everything. Never raises; on_closed runs exactly once."""
        if self._closed:
            return
        self._closed = True
        self.end_reason = reason
        try:
            current = asyncio.current_task()
            others = [t for t in self._tasks if t is not current]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            if self.session is not None:
                await _quietly(self.session.close(), f"call {self.id}: session close")
            if self.track is not None:
                self.track.stop()
            await _close_peer_connection(self.pc, self.id)
        finally:  # even when cancelled half-way: the slot must come back
            if self.session is not None and reason != "bad_offer":  # a refused offer was never a call
                try:
                    self.sessions.finish(self.session, "webrtc", self.party, _ended_by(reason), reason)
                except Exception:
                    log.exception("call %s: its record failed", self.id)
            self._tasks.clear()
            if self.on_closed is not None:
                try:
                    self.on_closed(self)
                except Exception:
                    log.exception("call %s: on_closed failed", self.id)
            log.info("call %s: closed (%s)", self.id, reason)


def _ended_by(reason: str) -> str:
    """Who ended the call, for its record (see WebRTCCall's end reasons)."""
    if reason.startswith("agent hung up"):
        return "agent"
    return {"hangup": "server", "shutdown": "server", "connection_closed": "caller", "audio_ended": "caller",
            "connect_timeout": "network", "media_timeout": "network", "connection_failed": "network",
            "task_failed": "error"}.get(reason, "error")


async def _quietly(awaitable: Awaitable[Any], what: str) -> None:
    try:
        await awaitable
    except Exception as e:  # noqa: BLE001 - teardown goes on whatever one part raises
        log.debug("%s raised %s", what, _one_line(e))


async def _close_peer_connection(pc: RTCPeerConnection, call_id: str) -> None:
    """pc.close(), and where aiortc raises half-way (a transceiver it made for a track but
    never gave a transport), stop each part it would have stopped, so no socket stays open."""
    try:
        await pc.close()
        return
    except Exception as e:  # noqa: BLE001
        log.debug("call %s: RTCPeerConnection.close raised %s; stopping its parts one by one",
                  call_id, _one_line(e))
    for t in pc.getTransceivers():
        await _quietly(t.sender.stop(), "sender stop")
        await _quietly(t.receiver.stop(), "receiver stop")
    dtls_transports = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        await _quietly(pc.sctp.stop(), "sctp stop")
        dtls_transports.append(pc.sctp.transport)
    for dtls in dtls_transports:
        if dtls is not None:
            await _quietly(dtls.stop(), "dtls stop")
            await _quietly(dtls.transport.stop(), "ice stop")
    pc.remove_all_listeners()
