"""Provider media streams over a WebSocket, in Twilio Media Streams' published message
format (which Telnyx and others copied): the provider carries the phone call and relays
its audio to `GET /media-stream` as JSON text messages.

    provider                                      agent
    connected ─►
    start {streamSid, callSid, mediaFormat} ─►    a CallSession (echo guard on: a phone line)
    media {payload: base64 mu-law 8 kHz} ─►       push_audio()
                                             ◄─   media {payload}: the agent's audio, 20 ms a
                                                  message, paced in real time, each followed by
                                             ◄─   mark {name}
    mark {name} ─►                                the audio before it has been played
    dtmf {digit} ─►                               push_dtmf()
                                             ◄─   clear, at a barge-in: drop what is buffered
    stop ─►                                       the call ends (closing the socket ends it too)

The agent keeps at most AHEAD_S of its audio unplayed at the provider (the marks tell what
was played), so what the session counts as heard is what the caller heard, to within that,
and a barge-in's `clear` has little to drop. A provider that echoes no marks is paced in
real time alone (said once in the log).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fractions
import json
import logging
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import av
import numpy as np
from aiohttp import WSMsgType, web
from aiortc.codecs.g711 import PcmuDecoder, PcmuEncoder
from aiortc.jitterbuffer import JitterFrame

from agent.audio import Resampler
from agent.call.events import AgentInterrupted
from agent.call.factory import SessionFactory
from agent.call.session import CallSession
from agent.config import Settings
from agent.rates import OUT_RATE
from signaling.pacing import PACKET_S, PacedClock
from signaling.slots import CallSlots

log = logging.getLogger(__name__)

RATE = 8000
AHEAD_S = 0.2  # most agent audio sent but not yet played (marks unanswered)
MARKS_LATE_S = 2.0  # marks this late: the provider does not echo them
MAX_MESSAGE_BYTES = 64 * 1024  # a media message is about 300 bytes
# WebSocket close codes (RFC 6455 7.4.1).
NORMAL, UNSUPPORTED, BAD_DATA, POLICY, TRY_AGAIN = 1000, 1003, 1007, 1008, 1013


class StreamError(ValueError):
    """A message that breaks the protocol; str() is the one-line close reason."""


class MediaStreamCall:
    """One provider media stream: one phone call."""

    def __init__(self, ws: web.WebSocketResponse, sessions: SessionFactory, settings: Settings, slots: CallSlots,
                 address: str | None, on_closed: Callable[[MediaStreamCall], None] | None = None) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.ws = ws
        self.sessions = sessions
        self.settings = settings
        self.slots = slots
        self.address = address
        self.on_closed = on_closed
        self.stream_sid: str | None = None
        self.start: dict[str, Any] = {}
        self.session: CallSession | None = None
        self.end_reason: str | None = None
        self.ended_by: str | None = None
        self.marks_sent = 0
        self.marks_played = 0
        self.clears = 0
        self.media_in = 0
        self.media_out = 0
        self._marks_echoed = True  # until a mark is seen to be late
        self._decoder = PcmuDecoder()
        self._encoder = PcmuEncoder()
        self._to_8k = Resampler(RATE)
        self._pending = np.zeros(0, dtype=np.int16)
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._unplayed: deque[tuple[int, float]] = deque()  # (mark, when it was sent) not yet echoed
        self._cleanup: asyncio.Future | None = None

    @property
    def slot(self) -> str:
        return f"media-stream:{self.id}"

    async def run(self) -> None:
        """Serve the stream until it stops or closes; never raises (bad input closes it)."""
        try:
            await asyncio.wait_for(self._until_start(), self.settings.server.connect_timeout_s)
        except TimeoutError:
            await self.close(f"no start message in {self.settings.server.connect_timeout_s:.0f} s", "network", POLICY)
            return
        except StreamError as e:
            await self.close(str(e), "error", BAD_DATA)
            return
        if self._closed:
            return
        try:
            async for message in self.ws:
                if message.type != WSMsgType.TEXT:
                    raise StreamError("only JSON text messages are expected")
                if self._handle(_parse(message.data)) == "stop":
                    await self.close("the provider stopped the stream", "caller")
                    return
        except StreamError as e:
            await self.close(str(e), "error", BAD_DATA)
            return
        await self.close("the provider closed the stream", "caller")

    async def _until_start(self) -> None:
        async for message in self.ws:
            if message.type != WSMsgType.TEXT:
                raise StreamError("only JSON text messages are expected")
            data = _parse(message.data)
            event = data.get("event")
            if event == "connected":
                continue
            if event != "start":
                raise StreamError(f"expected a start message first, got {str(event)[:40]!r}")
            await self._started(data)
            return
        await self.close("the provider closed the stream before its start", "caller")

    async def _started(self, data: dict[str, Any]) -> None:
        start = data.get("start")
        if not isinstance(start, dict):
            raise StreamError("start: no start object")
        fmt = start.get("mediaFormat") or {}
        if (not isinstance(fmt, dict) or fmt.get("encoding") != "audio/x-mulaw" or fmt.get("sampleRate") != RATE
                or fmt.get("channels", 1) != 1):
            raise StreamError(f"start: only audio/x-mulaw at 8000 Hz, mono, is supported, got {str(fmt)[:80]}")
        sid = data.get("streamSid") or start.get("streamSid")
        if not isinstance(sid, str) or not sid:
            raise StreamError("start: no streamSid")
        self.stream_sid, self.start = sid, start
        if not self.slots.take(self.slot, "media-stream"):
            await self.close(f"the agent is busy: {self.slots.limit} calls in progress", "server", TRY_AGAIN)
            return
        self.session = self.sessions.new_session(self.settings, echo_guard=True, call_id=self.id)
        log.info("media stream %s: call %s started", self.id, start.get("callSid"))
        self._spawn(self._send_audio(), "audio sender")
        self._spawn(self._watch_events(), "event watcher")
        self.session.greet()

    def _handle(self, data: dict[str, Any]) -> str | None:
        assert self.session is not None  # started
        event = data.get("event")
        if event == "media":
            media = data.get("media")
            if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
                raise StreamError("media: no payload")
            if media.get("track", "inbound") not in ("inbound", "inbound_track"):
                return None  # the agent's own audio, where the provider sends both tracks
            try:
                payload = base64.b64decode(media["payload"], validate=True)
            except (binascii.Error, ValueError):
                raise StreamError("media: the payload is not base64") from None
            if payload:
                self.media_in += 1
                self.session.push_audio(self._decode(payload), RATE)
        elif event == "mark":
            name = (data.get("mark") or {}).get("name") if isinstance(data.get("mark"), dict) else None
            if isinstance(name, str) and name.isdigit():
                self._played(min(int(name), self.marks_sent))
        elif event == "dtmf":
            digit = (data.get("dtmf") or {}).get("digit") if isinstance(data.get("dtmf"), dict) else None
            action = self.session.push_dtmf(digit) if isinstance(digit, str) and len(digit) == 1 else None
            if action == "hangup":
                self._spawn(self.close(f"the caller pressed the hang-up key {digit}", "caller"), "hang-up")
            elif action == "transfer":  # a provider transfers through its own API (not built here)
                log.warning("media stream %s: transfers are not built for media streams", self.id)
                self.session.transferred(self.settings.session.transfer_to, False, "not built for media streams")
        elif event == "stop":
            return "stop"
        return None  # "connected" again, or an event this agent does not use

    def _decode(self, payload: bytes) -> np.ndarray:
        frames = self._decoder.decode(JitterFrame(payload, 0))
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])  # type: ignore[attr-defined]

    def _encode(self, samples: np.ndarray) -> bytes:
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, 0, fractions.Fraction(1, RATE)
        payloads, _ = self._encoder.encode(frame)
        return b"".join(payloads)

    async def _send_audio(self) -> None:
        """The agent's audio, 20 ms a message in real time, while the provider has played
        all but AHEAD_S of it."""
        assert self.session is not None and self.stream_sid is not None
        loop = asyncio.get_running_loop()
        pace, ahead = PacedClock(PACKET_S), max(1, round(AHEAD_S / PACKET_S))
        samples = int(RATE * PACKET_S)
        while True:
            await pace.wait()
            if self._marks_echoed and self._unplayed and loop.time() - self._unplayed[0][1] > MARKS_LATE_S:
                self._marks_echoed = False
                log.warning("media stream %s: the provider echoes no marks; pacing in real time only", self.id)
            if self._marks_echoed and len(self._unplayed) >= ahead:
                continue  # the provider still holds enough of ours
            frame = self.session.outbound.get_nowait()
            if frame is None and not len(self._pending):
                continue  # nothing to say: the provider plays silence meanwhile
            if frame is not None:
                self._pending = np.concatenate([self._pending, self._to_8k.push(frame.samples, OUT_RATE)])
            chunk, self._pending = self._pending[:samples], self._pending[samples:]
            await self._send({"event": "media", "streamSid": self.stream_sid,
                              "media": {"payload": base64.b64encode(self._encode(
                                  np.pad(chunk, (0, samples - len(chunk))))).decode()}})
            self.media_out += 1
            self.marks_sent += 1
            self._unplayed.append((self.marks_sent, loop.time()))
            await self._send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": str(self.marks_sent)}})

    async def _watch_events(self) -> None:
        """A barge-in clears what the provider holds; the agent hanging up ends the stream."""
        assert self.session is not None
        ended = asyncio.ensure_future(self.session.ended.wait())
        event: asyncio.Future | None = None
        try:
            while True:
                event = asyncio.ensure_future(self.session.events.get())
                await asyncio.wait({event, ended}, return_when=asyncio.FIRST_COMPLETED)
                if ended.done():
                    event.cancel()
                    self._spawn(self.close(f"agent hung up: {self.session.end_reason}", "agent"), "hang-up")
                    return
                if isinstance(event.result(), AgentInterrupted):
                    self.clears += 1
                    self._pending = np.zeros(0, dtype=np.int16)
                    self._played(self.marks_sent)  # dropped is as good as played
                    await self._send({"event": "clear", "streamSid": self.stream_sid})
        finally:
            ended.cancel()
            if event is not None:
                event.cancel()

    def _played(self, mark: int) -> None:
        self.marks_played = max(self.marks_played, mark)
        while self._unplayed and self._unplayed[0][0] <= self.marks_played:
            self._unplayed.popleft()

    async def _send(self, message: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_str(json.dumps(message))

    def _spawn(self, coro: Any, what: str) -> None:
        """A task of the call: a failure is logged once and ends the call."""
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)

        def done(t: asyncio.Task) -> None:
            if t.cancelled() or t.exception() is None:
                return
            log.error("media stream %s: the %s failed; ending the call", self.id, what, exc_info=t.exception())
            self._tasks.append(asyncio.ensure_future(self.close("task_failed", "error", 1011)))

        task.add_done_callback(done)

    async def close(self, reason: str = "hangup", ended_by: str = "server", code: int = NORMAL) -> None:
        """End the call and the stream (a reason the provider sees). Never raises; the
        clean-up goes on in a task of its own if the caller is cancelled meanwhile (aiohttp
        cancels a handler whose peer went away)."""
        if self._closed:
            return
        self._closed = True
        self.end_reason, self.ended_by = reason, ended_by
        self._cleanup = asyncio.ensure_future(self._close(asyncio.current_task(), reason, ended_by, code))
        await asyncio.shield(self._cleanup)

    async def _close(self, closer: asyncio.Task | None, reason: str, ended_by: str, code: int) -> None:
        try:
            others = [t for t in self._tasks if t is not closer]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            if self.session is not None:
                await self.session.close()
                party = {"call_sid": self.start.get("callSid"), "stream_sid": self.stream_sid,
                         "account_sid": self.start.get("accountSid"), "address": self.address,
                         "custom": self.start.get("customParameters") or {}}
                self.sessions.finish(self.session, "media-stream", party, ended_by, reason)
        except Exception:
            log.exception("media stream %s: closing its session failed", self.id)
        finally:  # the slot must come back whatever happened
            self.slots.release(self.slot)
            if self.on_closed is not None:
                try:
                    self.on_closed(self)
                except Exception:
                    log.exception("media stream %s: on_closed failed", self.id)
            log.info("media stream %s: closed (%s)", self.id, reason)
        if not self.ws.closed:
            try:
                await self.ws.close(code=code, message=reason[:120].encode())
            except Exception as e:  # noqa: BLE001 - the peer may be gone already
                log.debug("media stream %s: closing the socket raised %s", self.id, e)


def _parse(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise StreamError("a message is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        raise StreamError("a message is not a JSON object with an event")
    return data
