"""A loopback SIP phone for benchmarks: UDP signaling and an RtpSession of our own sending
continuous PCMU, as desk phones and softphones do. The SIP counterpart of loopback.Caller."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from signaling.sip.message import SipMessage, parse_message
from signaling.sip.rtp import SAMPLES, RtpSession
from signaling.sip.sdp import Codec, codec_from_answer, make_offer, parse_sdp

LOUD = 300  # RMS above which a played 20 ms counts as the agent speaking (tiny profile: far above)


class _Signaling(asyncio.DatagramProtocol):
    def __init__(self, replies: asyncio.Queue) -> None:
        self.replies = replies

    def datagram_received(self, data: bytes, addr) -> None:
        self.replies.put_nowait(parse_message(data))


class LoopbackPhone:
    """Calls the agent at host:port, says queued audio, and records what it hears."""

    def __init__(self, host: str, port: int, call_id: str = "bench-sip-call") -> None:
        self.agent = (host, port)
        self.call_id = call_id
        self.queue: list[np.ndarray] = []  # the phone's outgoing 20 ms frames
        self.heard: list[tuple[float, float]] = []  # (time, RMS) of each 20 ms the phone plays
        self.speech_end = 0.0  # when the last queued frame went out
        self.codec: Codec | None = None
        self._replies: asyncio.Queue = asyncio.Queue()
        self._sip: asyncio.DatagramTransport | None = None
        self._to_tag = ""
        self._cseq = 1
        self.rtp = RtpSession("PCMU", 0, None, ("127.0.0.1", 9), self._take_frame, 8000, self._play)

    def _take_frame(self) -> np.ndarray | None:
        if not self.queue:
            return None
        frame = self.queue.pop(0)
        if not self.queue:
            self.speech_end = time.monotonic()
        return frame

    def _play(self, samples: np.ndarray) -> None:
        self.heard.append((time.monotonic(), float(np.sqrt(np.mean(samples.astype(float) ** 2)))))

    def _request(self, method: str, body: bytes = b"") -> bytes:
        headers = [("Via", f"SIP/2.0/UDP 127.0.0.1:{self._port};branch=z9hG4bK{method}{self._cseq};rport"),
                   ("Max-Forwards", "70"), ("From", "<sip:bench@127.0.0.1>;tag=bench"),
                   ("To", "<sip:agent@127.0.0.1>" + (f";tag={self._to_tag}" if self._to_tag else "")),
                   ("Call-ID", self.call_id), ("CSeq", f"{self._cseq} {method}")]
        if body:
            headers.append(("Content-Type", "application/sdp"))
        return SipMessage(method=method, uri=f"sip:agent@{self.agent[0]}:{self.agent[1]}", headers=headers,
                          body=body).to_bytes()

    async def dial(self, timeout: float = 10.0) -> None:
        """INVITE, wait for the 200 OK, ACK. RuntimeError if the agent refuses."""
        loop = asyncio.get_running_loop()
        self._sip, _ = await loop.create_datagram_endpoint(lambda: _Signaling(self._replies),
                                                           local_addr=("127.0.0.1", 0))
        self._port = self._sip.get_extra_info("sockname")[1]
        rtp_port = await self.rtp.start("127.0.0.1")
        self._sip.sendto(self._request("INVITE", make_offer("127.0.0.1", rtp_port, 1).encode()), self.agent)
        while (ok := await asyncio.wait_for(self._replies.get(), timeout)).status < 200:
            pass
        if ok.status >= 300:
            raise RuntimeError(f"call refused: SIP {ok.status} {ok.reason}")
        self.codec = codec_from_answer(parse_sdp(ok.body.decode()))
        # A phone sends to where the answer says from the start (the agent waits for its
        # packets before it sends any); the agent's first packet then names its SSRC.
        self.rtp.remote = (self.codec.remote_ip, self.codec.remote_port)
        self._to_tag = ok.to_tag
        self._sip.sendto(self._request("ACK"), self.agent)
        self.rtp.confirm()

    def say(self, audio_8k: np.ndarray, pause_s: float = 0.5) -> None:
        audio = np.concatenate([np.zeros(int(8000 * pause_s), np.int16), audio_8k])
        whole = len(audio) // SAMPLES * SAMPLES
        self.queue.extend(np.split(audio[:whole], whole // SAMPLES))
        self.speech_end = 0.0

    def loud_since(self, t: float) -> list[float]:
        return [when for when, rms in self.heard if when >= t and rms > LOUD]

    async def hang_up(self) -> None:
        """BYE (answered or not within a second), then close the sockets."""
        try:
            if self._to_tag:
                assert self._sip is not None  # dial() got as far as the answer
                self._cseq += 1
                self._sip.sendto(self._request("BYE"), self.agent)
                await asyncio.wait_for(self._replies.get(), 1.0)
        except TimeoutError:
            pass
        finally:
            await self.rtp.close()
            if self._sip:
                self._sip.close()
