"""RTP for phone calls (RFC 3550 / 3551): G.711 at 8 kHz in 20 ms packets, and RFC 4733
telephone-events (DTMF). aiortc's RtpPacket and G.711 codecs do the byte work.

One RtpSession per call ticks every 20 ms, paced by the clock: it hands the caller's
next 20 ms (from a small reordering jitter buffer, with loss concealment) to the call,
and sends the agent's next 20 ms (silence when it has nothing to say) to where the
caller's packets come from (symmetric RTP, so callers behind NAT hear us).

Symmetric RTP is a latch, not a follow-the-last-packet rule: nothing is sent before the
call is confirmed (confirm(): the SIP ACK) and before the peer's own packets name an
address, so an INVITE alone never makes the agent send traffic anywhere. The first media
packet latches the peer (address and SSRC); after that a packet from any other source is
neither played nor followed, unless that source keeps sending on its own (LATCH_PACKETS in
a row with nothing from the latched one between, and, from another address, once the
latched one has been quiet for LATCH_QUIET_S): a peer that moved, or restarted its stream
with a new SSRC. A new SSRC, or a large jump in sequence numbers, resynchronises the
jitter buffer. A failure in the tick is logged once and reported to `on_failure`.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import cast

import av
import numpy as np
from aiortc.codecs.g711 import PcmaDecoder, PcmaEncoder, PcmuDecoder, PcmuEncoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtp import RtpPacket

from agent.audio import Resampler
from signaling.pacing import PACKET_S, PacedClock

log = logging.getLogger(__name__)

RATE = 8000
SAMPLES = int(RATE * PACKET_S)  # 160: one 20 ms packet
DTMF_EVENTS = "0123456789*#ABCD"
CODECS = {"PCMU": (PcmuEncoder, PcmuDecoder), "PCMA": (PcmaEncoder, PcmaDecoder)}
DTX_AFTER_TICKS = 3  # this many ticks with no packet, and the gap is heard as silence
LATCH_PACKETS = 5  # media packets in a row from a new source before it may take the stream over
LATCH_QUIET_S = 0.5  # ... and, from another address, only once the latched peer was quiet this long
LOST = object()  # what JitterBuffer.pop() gives for a packet that never came


class JitterBuffer:
    """Puts packets back in sequence order and gives out one payload per tick.

    It waits until `depth` packets are in before it starts, which absorbs that much
    network jitter. A packet still missing when a later one is due counts as lost
    (LOST); a late or duplicate packet is dropped. 16-bit sequence numbers wrap. A packet
    more than `capacity` away from the one due, either way, is no late or early packet
    but a stream that jumped (an SBC, a re-INVITE, a restarted sender): the buffer
    starts over from it."""

    def __init__(self, depth: int = 2, capacity: int = 50) -> None:
        self.depth = depth
        self.capacity = capacity
        self._packets: dict[int, bytes] = {}
        self._next: int | None = None  # extended sequence number due next
        self.lost = 0
        self.late = 0
        self.resyncs = 0

    def put(self, seq: int, payload: bytes) -> None:
        if self._next is None:
            if len(self._packets) < self.capacity:
                self._packets.setdefault(seq, payload)
            return
        ahead = (seq - self._next + 32768) % 65536 - 32768  # signed distance from the packet due
        if -self.capacity <= ahead < 0:  # behind what was already played: too late, or a duplicate
            self.late += 1
            return
        if not -self.capacity <= ahead < self.capacity:
            self.resync()
            self._packets[seq] = payload
            return
        self._packets[self._next + ahead] = payload

    def resync(self) -> None:
        """Forget the stream so far: the next packets start it again (after `depth` of them)."""
        self._packets.clear()
        self._next = None
        self.resyncs += 1

    @property
    def started(self) -> bool:
        return self._next is not None

    def pop(self) -> bytes | object | None:
        """The next payload, LOST for a gap, or None while there is nothing to play."""
        if self._next is None:
            if len(self._packets) < self.depth:
                return None
            # Unwrap the sequence numbers around the first one received, start at the earliest.
            ref = next(iter(self._packets))
            self._packets = {ref + (s - ref + 32768) % 65536 - 32768: p for s, p in self._packets.items()}
            self._next = min(self._packets)
        payload = self._packets.pop(self._next, None)
        if payload is None and not self._packets:
            return None  # underrun: wait for the next packet rather than skip ahead
        self._next += 1
        if payload is None:
            self.lost += 1
            return LOST
        return payload


def parse_dtmf(payload: bytes) -> tuple[str, bool, int] | None:
    """RFC 4733 event payload -> (digit, end of event, duration in timestamp units)."""
    if len(payload) < 4:
        return None
    event, flags, duration = struct.unpack("!BBH", payload[:4])
    if event >= len(DTMF_EVENTS):
        return None
    return DTMF_EVENTS[event], bool(flags & 0x80), duration


class RtpSession(asyncio.DatagramProtocol):
    """One call's RTP stream. `take_frame()` gives the agent's next 20 ms (int16 at
    `out_rate`, or None for silence); `on_audio(samples_8k)` gets the caller's; `on_dtmf`
    gets each digit once."""

    def __init__(self, codec: str, payload_type: int, dtmf_payload_type: int | None,
                 remote: tuple[str, int] | None, take_frame: Callable[[], np.ndarray | None], out_rate: int,
                 on_audio: Callable[[np.ndarray], None], on_dtmf: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, jitter_depth: int = 2, confirmed: bool = True,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        """`remote`: the address the SDP names (only informative: what is sent goes where the
        peer's packets come from). `confirmed`: the call is confirmed already; else nothing
        is sent before confirm()."""
        encoder, decoder = CODECS[codec]
        self.codec = codec
        self.encoder, self.decoder = encoder(), decoder()
        self.payload_type = payload_type
        self.dtmf_payload_type = dtmf_payload_type
        self.signalled = remote
        self.remote: tuple[str, int] | None = None  # the latched peer: where its packets come from
        self.peer_ssrc: int | None = None
        self.confirmed = confirmed
        self.on_failure = on_failure
        self.last_heard: float | None = None  # clock() of the latched peer's latest packet (any kind)
        self._candidate: tuple[tuple[str, int], int] | None = None  # a new source: (address, SSRC)
        self._candidate_packets = 0
        self.take_frame = take_frame
        self.on_audio = on_audio
        self.on_dtmf = on_dtmf
        self.clock = clock
        self.jitter = JitterBuffer(jitter_depth)
        self.to_8k = Resampler(RATE)
        self.out_rate = out_rate
        self._pending = np.zeros(0, dtype=np.int16)  # agent audio at 8 kHz not yet sent
        self._last_in = np.zeros(SAMPLES, dtype=np.int16)
        self._concealed = 0
        self._underruns = 0
        self.ssrc = random.getrandbits(32)
        self.seq = random.getrandbits(16)
        self.timestamp = random.getrandbits(32)
        self._dtmf_seen: set[int] = set()  # event timestamps already reported
        self.transport: asyncio.DatagramTransport | None = None
        self.sent_at: deque[float] = deque(maxlen=10_000)  # when each packet left (pacing bench)
        self.received = 0
        self.dropped = 0
        self.foreign = 0  # packets from sources other than the latched peer: not played
        self.relatched = 0
        self.decode_errors = 0
        self.failure: BaseException | None = None
        self.loud_sent = 0  # packets that carried the agent's voice, not silence
        self._task: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, host: str | None = None, port: int = 0, sock: socket.socket | None = None) -> int:
        """Bind the local RTP port (0: any), or take `sock`, bound already (an SDP offer
        names its port before the answer names the codec), and start ticking; returns the port."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            await loop.create_datagram_endpoint(lambda: self, sock=sock)
        else:
            # A None host is looked up by getaddrinfo like any other; typeshed wants a str.
            await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))  # type: ignore[arg-type]
        self._task = asyncio.ensure_future(self._tick())
        assert self.transport is not None  # connection_made ran inside create_datagram_endpoint
        return self.transport.get_extra_info("sockname")[1]

    def connection_made(self, transport) -> None:
        self.transport = transport

    def confirm(self) -> None:
        """The call is confirmed (the SIP ACK came): media may go out, to the latched peer."""
        self.confirmed = True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.transport is not None:
            self.transport.close()

    # -- receiving ------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            packet = RtpPacket.parse(data)
        except ValueError:
            self.dropped += 1
            return
        dtmf = self.dtmf_payload_type is not None and packet.payload_type == self.dtmf_payload_type
        media = packet.payload_type == self.payload_type or dtmf
        if not self._from_peer(addr, packet.ssrc, media):
            self.foreign += 1
            return
        self.last_heard = self.clock()  # comfort noise and the like count: the peer is there
        if packet.payload_type == self.payload_type and packet.payload:
            # (An empty payload must never reach the decoder: FFmpeg takes it for the end of
            # the stream, and every later packet then fails to decode.)
            self.jitter.put(packet.sequence_number, packet.payload)
        elif dtmf:
            self._dtmf(packet)
        else:
            self.dropped += 1
            return
        self.received += 1

    def _from_peer(self, addr: tuple[str, int], ssrc: int, media: bool) -> bool:
        """Whether a packet comes from the latched peer, latching it first if need be (see
        the module's docstring). Only media packets (the call's audio or DTMF payload type)
        latch or move the latch."""
        if self.remote == addr and self.peer_ssrc == ssrc:
            self._candidate, self._candidate_packets = None, 0
            return True
        if not media:
            return False
        if self.remote == addr and self.peer_ssrc is None:  # an address set beforehand (a test phone sends first)
            self.peer_ssrc = ssrc
            return True
        if self.remote is None:  # the call's first media packet
            self.remote, self.peer_ssrc = addr, ssrc
            return True
        if self._candidate != (addr, ssrc):
            self._candidate, self._candidate_packets = (addr, ssrc), 0
        self._candidate_packets += 1
        quiet = self.last_heard is None or self.clock() - self.last_heard >= LATCH_QUIET_S
        if self._candidate_packets < LATCH_PACKETS or (addr != self.remote and not quiet):
            return False
        log.info("RTP: the peer moved from %s (SSRC %08x) to %s (SSRC %08x)", self.remote, self.peer_ssrc, addr, ssrc)
        if ssrc != self.peer_ssrc:
            self.jitter.resync()  # a new stream: its sequence numbers have nothing to do with the old
        self.remote, self.peer_ssrc = addr, ssrc
        self._candidate, self._candidate_packets = None, 0
        self.relatched += 1
        return True

    def _dtmf(self, packet: RtpPacket) -> None:
        event = parse_dtmf(packet.payload)
        if event is None:
            return
        digit, _end, _duration = event
        # An event is sent many times with one timestamp (and its end 3 times): report once.
        if packet.timestamp in self._dtmf_seen:
            return
        self._dtmf_seen.add(packet.timestamp)
        if len(self._dtmf_seen) > 1000:
            self._dtmf_seen.clear()
        if self.on_dtmf is not None:
            self.on_dtmf(digit)

    def _next_caller_audio(self) -> np.ndarray | None:
        payload = self.jitter.pop()
        if payload is None:
            # Nothing to play. A packet or two late is jitter: wait. A longer gap is
            # silence: phones that suppress silence (DTX) just stop sending, and the VAD
            # must still hear the caller stop.
            self._underruns += 1
            if self.jitter.started and self._underruns > DTX_AFTER_TICKS:
                return np.zeros(SAMPLES, dtype=np.int16)
            return None
        self._underruns = 0
        if payload is LOST:
            # Conceal one lost packet with the last one at half level, then silence.
            self._concealed += 1
            return (self._last_in // 2) if self._concealed == 1 else np.zeros(SAMPLES, dtype=np.int16)
        self._concealed = 0
        try:
            frames = self.decoder.decode(JitterFrame(cast(bytes, payload), 0))  # neither None nor LOST
        except av.FFmpegError:  # never one bad payload for the rest of the call: a fresh decoder
            self.decode_errors += 1
            self.decoder = CODECS[self.codec][1]()
            return None
        # aiortc types decode() as list[av.Frame]; its G.711 decoders give av.AudioFrames.
        samples = (np.concatenate([f.to_ndarray().reshape(-1) for f in frames])  # type: ignore[attr-defined]
                   if frames else None)
        if samples is not None:
            self._last_in = samples
        return samples

    # -- sending --------------------------------------------------------------------

    def _next_packet(self) -> bytes:
        frame = self.take_frame()
        if frame is not None:
            self._pending = np.concatenate([self._pending, self.to_8k.push(frame, self.out_rate)])
        chunk, self._pending = self._pending[:SAMPLES], self._pending[SAMPLES:]
        samples = np.pad(chunk, (0, SAMPLES - len(chunk)))
        self.loud_sent += int(np.abs(samples).max() > 500)
        audio = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        audio.sample_rate, audio.pts, audio.time_base = RATE, 0, fractions.Fraction(1, RATE)
        payloads, _ = self.encoder.encode(audio)
        packet = RtpPacket(payload_type=self.payload_type, sequence_number=self.seq,
                           timestamp=self.timestamp, ssrc=self.ssrc, payload=payloads[0] if payloads else b"")
        self.seq = (self.seq + 1) % 65536
        self.timestamp = (self.timestamp + SAMPLES) % 2**32
        return packet.serialize()

    async def _tick(self) -> None:
        """The media loop; a failure in it is logged once and handed to on_failure."""
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.failure = e
            log.exception("RTP: the media loop failed")
            if self.on_failure is not None:
                self.on_failure(e)

    async def _run(self) -> None:
        pace = PacedClock(PACKET_S, self.clock)
        while True:
            await pace.wait()
            caller = self._next_caller_audio()
            if caller is not None:
                self.on_audio(caller)
            if self.transport is not None and self.remote is not None and self.confirmed:
                self.transport.sendto(self._next_packet(), self.remote)
                self.sent_at.append(self.clock())
