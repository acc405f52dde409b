"""A browser call over WebRTC (aiortc): the peer connection around one CallSession.

In: the remote audio track is drained all the time (aiortc's queue is unbounded) and
each frame goes to the session, which resamples it with PyAV. Out: SessionAudioTrack
hands aiortc one 20 ms frame per recv(), paced by the wall clock. Events go to the page
as JSON on the "events" data channel.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import logging
import time
import uuid
from collections import deque
from typing import Any, Callable

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from agent.config import Settings
from agent.models import UnifiedModelManager
from agent.session import (OUT_RATE, AgentInterrupted, AgentReplyText, CallerSpeechStarted,
                           CallerSpeechStopped, CallSession, OutboundAudio, TurnFailed, TurnFinished)

log = logging.getLogger(__name__)
RESET_AFTER_S = 0.1  # a recv() this late means the sender paused: restart the clock, don't burst


class SessionAudioTrack(MediaStreamTrack):
    """The agent's voice as an aiortc audio track: 20 ms frames at the session's rate.

    aiortc takes the RTP clock from the frames' pts, so pacing is only when recv()
    returns: at start + pts / rate. Silence goes out when there is nothing to say. The
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
        self._start: float | None = None
        self._pts = 0
        self.sent_at: deque[float] = deque(maxlen=10_000)  # when each frame left (pacing bench)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = self.clock()
        due = None if self._start is None else self._start + self._pts / self.rate
        if due is None or now - due > RESET_AFTER_S:
            self._start = now - self._pts / self.rate
            due = now
        if due > now:
            await asyncio.sleep(due - now)
        self.sent_at.append(self.clock())
        frame = self.outbound.get_nowait()
        samples = frame.samples if frame is not None else np.zeros(self.samples, dtype=np.int16)
        out = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        out.sample_rate = self.rate
        out.pts = self._pts
        out.time_base = fractions.Fraction(1, self.rate)
        self._pts += self.samples
        return out


def event_json(event: Any) -> str | None:
    """A session event as the JSON message the page gets (None for events it does not need)."""
    if isinstance(event, CallerSpeechStarted):
        msg = {"type": "speech_started", "t": round(event.t, 3)}
    elif isinstance(event, CallerSpeechStopped):
        msg = {"type": "speech_stopped", "t": round(event.t, 3), "duration_s": round(event.duration_s, 3)}
    elif isinstance(event, AgentReplyText):
        msg = {"type": "reply_text", "turn": event.turn, "text": event.text}
    elif isinstance(event, AgentInterrupted):
        msg = {"type": "interrupted", "turn": event.turn, "heard": event.played_text}
    elif isinstance(event, TurnFinished):
        msg = {"type": "turn", "turn": event.turn.index, "reply": event.turn.played_text,
               "latency_ms": event.turn.latency_ms()}
    elif isinstance(event, TurnFailed):
        msg = {"type": "turn_failed", "turn": event.turn, "error": event.error}
    else:
        return None
    return json.dumps(msg)


class WebRTCCall:
    """One browser call. answer() negotiates; close() hangs up and frees everything."""

    def __init__(self, models: UnifiedModelManager, settings: Settings, voice: str | None,
                 on_event: Callable[["WebRTCCall", Any], None] | None = None,
                 on_closed: Callable[["WebRTCCall"], None] | None = None) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.models = models
        self.settings = settings
        self.voice = voice
        self.on_event = on_event
        self.on_closed = on_closed
        self.pc = RTCPeerConnection()
        self.session: CallSession | None = None
        self.track: SessionAudioTrack | None = None
        self.channel = None
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    async def answer(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        self.session = CallSession(self.models, self.settings, voice=self.voice)
        self.track = SessionAudioTrack(self.session.outbound)
        pc = self.pc

        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            self.channel = channel

        @pc.on("track")
        def on_track(track) -> None:
            if track.kind == "audio":
                self._tasks.append(asyncio.ensure_future(self._drain(track)))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("call %s: connection %s", self.id, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self.close()

        await pc.setRemoteDescription(offer)
        if not any(t.kind == "audio" for t in pc.getTransceivers()):
            raise ValueError("the offer has no audio")
        pc.addTrack(self.track)  # takes the offer's audio transceiver: sendrecv
        await pc.setLocalDescription(await pc.createAnswer())  # gathers ICE fully
        self._tasks.append(asyncio.ensure_future(self._forward_events()))
        return pc.localDescription

    async def _drain(self, track) -> None:
        """Keep reading the caller's audio; the track's queue grows without bound otherwise."""
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                break
            samples = frame.to_ndarray()
            if frame.format.is_planar:
                samples = samples.T
            self.session.push_audio(samples.reshape(-1), frame.sample_rate, len(frame.layout.channels))
        log.info("call %s: the caller's audio ended", self.id)
        await self.close()

    async def _forward_events(self) -> None:
        while True:
            event = await self.session.events.get()
            if self.on_event is not None:
                self.on_event(self, event)
            message = event_json(event)
            if message is not None and self.channel is not None and self.channel.readyState == "open":
                self.channel.send(message)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        if self.track is not None:
            self.track.stop()
        await self.pc.close()
        if self.on_closed is not None:
            self.on_closed(self)
        log.info("call %s: closed", self.id)
