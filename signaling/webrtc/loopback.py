"""A loopback WebRTC caller (aiortc), as the web client behaves: for tests and benchmarks.

It sends a microphone track that plays queued audio in real time, opens the "events"
data channel, and records what it hears (wall time and RMS of every frame).
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

CALLER_RATE = 16000  # the loopback caller's microphone
LOUD = 300  # RMS above which a received frame counts as the agent speaking (tiny profile: far above)


class Microphone(MediaStreamTrack):
    """The caller: plays queued audio in real time, 20 ms frames, then silence."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.queue = np.zeros(0, dtype=np.int16)
        self.pts = 0
        self.start = None
        self.speech_end = None  # wall time the last queued sample went out

    def say(self, audio: np.ndarray, pause_s: float = 0.0) -> None:
        self.queue = np.concatenate([self.queue, np.zeros(int(CALLER_RATE * pause_s), np.int16), audio])
        self.speech_end = None

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        self.start = self.start or time.monotonic()
        due = self.start + self.pts / CALLER_RATE
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        chunk, self.queue = self.queue[:320], self.queue[320:]
        if len(chunk) and not len(self.queue):
            self.speech_end = time.monotonic()
        frame = av.AudioFrame.from_ndarray(np.pad(chunk, (0, 320 - len(chunk))).reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = CALLER_RATE, self.pts, fractions.Fraction(1, CALLER_RATE)
        self.pts += 320
        return frame


class Caller:
    """An aiortc peer calling the server as the web client does."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.pc = RTCPeerConnection()
        self.mic = Microphone()
        self.heard: list[tuple[float, float]] = []  # (wall time, RMS) of each received frame
        self.messages: list[dict] = []
        self.call_id = None
        self.channel = self.pc.createDataChannel("events")
        self.channel.on("message", lambda m: self.messages.append(json.loads(m)))
        self.pc.addTrack(self.mic)
        self._listeners: list[asyncio.Task] = []
        self.pc.on("track", lambda track: self._listeners.append(asyncio.ensure_future(self._listen(track))))

    async def close(self) -> None:
        """Hang up (DTLS close, no DELETE) and stop listening."""
        await self.pc.close()
        for task in self._listeners:
            task.cancel()
        await asyncio.gather(*self._listeners, return_exceptions=True)

    async def _listen(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            x = frame.to_ndarray().astype(np.float64)
            self.heard.append((time.monotonic(), float(np.sqrt(np.mean(x**2)))))

    async def dial(self, http: aiohttp.ClientSession, voice=None) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        if voice:
            body["voice"] = voice
        async with http.post(self.base_url + "/offer", json=body) as r:
            answer = await r.json()
            if r.status != 200:
                raise RuntimeError(f"offer refused: HTTP {r.status}: {answer.get('error')}")
        self.call_id = answer["call_id"]
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))

    def loud_since(self, t: float) -> list[float]:
        """Wall times of received frames louder than LOUD, from `t` on."""
        return [when for when, rms in self.heard if when >= t and rms > LOUD]

    async def wait_for(self, test, timeout: float = 40.0) -> None:
        """Wait until test() is true; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not test():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.05)


async def hold_calls(base_url: str, n: int, seconds: float) -> None:
    """Dial `n` silent calls, keep them up for `seconds`, hang up (bench load generator)."""
    async with aiohttp.ClientSession() as http:
        callers = [Caller(base_url) for _ in range(n)]
        await asyncio.gather(*(c.dial(http) for c in callers))
        await asyncio.sleep(seconds)
        await asyncio.gather(*(c.close() for c in callers))


if __name__ == "__main__":  # python -m signaling.webrtc.loopback URL CALLS SECONDS
    import sys

    asyncio.run(hold_calls(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
