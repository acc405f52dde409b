"""RTP for phone calls: jitter buffer, DTMF, and a G.711 stream over loopback UDP."""

import asyncio
import fractions
import struct
import time

import av
import numpy as np
from aiortc.codecs.g711 import PcmuDecoder, PcmuEncoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtp import RtpPacket

from signaling.rtp import LOST, SAMPLES, JitterBuffer, RtpSession, parse_dtmf


def test_jitter_buffer_reorders_drops_late_and_marks_loss():
    jb = JitterBuffer(depth=2)
    assert jb.pop() is None
    for seq in (11, 10):  # out of order
        jb.put(seq, bytes([seq]))
    jb.put(13, b"\x0d")  # 12 is lost
    assert [jb.pop(), jb.pop(), jb.pop(), jb.pop()] == [b"\x0a", b"\x0b", LOST, b"\x0d"]
    jb.put(12, b"\x0c")  # too late now
    jb.put(13, b"\x0d")  # duplicate
    assert jb.pop() is None and jb.late == 2 and jb.lost == 1


def test_jitter_buffer_survives_sequence_wrap():
    jb = JitterBuffer(depth=3)
    for seq in (65534, 0, 65535, 1, 2):
        jb.put(seq, struct.pack("!H", seq))
    got = [struct.unpack("!H", jb.pop())[0] for _ in range(5)]
    assert got == [65534, 65535, 0, 1, 2]


def test_dtmf_payload():
    assert parse_dtmf(bytes([5, 0x0A, 0x00, 0xA0])) == ("5", False, 160)
    assert parse_dtmf(bytes([11, 0x8A, 0x03, 0x20])) == ("#", True, 800)
    assert parse_dtmf(b"\x01") is None and parse_dtmf(bytes([99, 0, 0, 0])) is None


def pcmu_packets(audio: np.ndarray, seq0: int, ts0: int, ssrc: int) -> list[bytes]:
    enc = PcmuEncoder()
    out = []
    for i in range(len(audio) // SAMPLES):
        frame = av.AudioFrame.from_ndarray(audio[i * SAMPLES:(i + 1) * SAMPLES].reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 8000, 0, fractions.Fraction(1, 8000)
        payload = enc.encode(frame)[0][0]
        out.append(RtpPacket(0, sequence_number=(seq0 + i) % 65536, timestamp=ts0 + i * SAMPLES, ssrc=ssrc,
                             payload=payload).serialize())
    return out


class Phone(asyncio.DatagramProtocol):
    """The far end: a plain UDP socket that records what it gets."""

    def __init__(self) -> None:
        self.packets: list[tuple[float, RtpPacket]] = []

    def datagram_received(self, data, addr) -> None:
        self.packets.append((time.monotonic(), RtpPacket.parse(data)))


async def test_g711_both_ways_with_reordering_dtmf_and_symmetric_rtp():
    loop = asyncio.get_running_loop()
    transport, phone = await loop.create_datagram_endpoint(Phone, local_addr=("127.0.0.1", 0))
    phone_addr = transport.get_extra_info("sockname")
    heard, digits = [], []
    agent_audio = [(np.sin(np.arange(480) * 2 * np.pi * 440 / 24000) * 8000).astype(np.int16) for _ in range(25)]
    # The SDP said to send to a wrong port: symmetric RTP must correct it from the packets.
    session = RtpSession("PCMU", 0, 101, ("127.0.0.1", 9), lambda: agent_audio.pop(0) if agent_audio else None,
                         24000, heard.append, digits.append)
    port = await session.start("127.0.0.1")
    try:
        tone = (np.sin(np.arange(8000) * 2 * np.pi * 300 / 8000) * 10000).astype(np.int16)  # 1 s
        packets = pcmu_packets(tone, seq0=65530, ts0=1000, ssrc=1234)
        packets[5], packets[6] = packets[6], packets[5]  # reordered on the way
        garbage = [b"\x80\x00", b"\x80", b"not rtp at all", bytes(11),
                   RtpPacket(96, sequence_number=1, timestamp=1, ssrc=99, payload=b"xx").serialize()]
        dtmf = [RtpPacket(101, sequence_number=1, timestamp=5000, ssrc=1234,
                          payload=bytes([5, 0x8A if end else 0x0A, 0, 160])).serialize() for end in (False, False, True)]
        for i, data in enumerate(packets):
            transport.sendto(data, ("127.0.0.1", port))
            if i < len(garbage):
                transport.sendto(garbage[i], ("127.0.0.1", port))
            if i == 20:
                for d in dtmf:
                    transport.sendto(d, ("127.0.0.1", port))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
    finally:
        await session.close()
        transport.close()
    # The caller's audio arrived whole and in order.
    received = np.concatenate(heard)
    assert len(received) >= len(tone) - 2 * SAMPLES
    # Once the stream stops, the gap is heard as silence (as from a phone that suppresses silence).
    assert len(received) > len(tone) + 2 * SAMPLES and not received[len(tone) + 2 * SAMPLES:].any()
    n = min(len(received), len(tone)) - 400
    best = max(np.corrcoef(received[k:k + n].astype(float), tone[:n].astype(float))[0, 1] for k in range(0, 3))
    assert best > 0.99 and session.jitter.lost == 0
    assert digits == ["5"] and session.dropped == len(garbage)
    # What we sent: to the phone's real address, 20 ms packets with a proper header.
    got = [p for _, p in phone.packets]
    assert len(got) >= 40 and session.remote == phone_addr
    assert {p.ssrc for p in got} == {session.ssrc} and {p.payload_type for p in got} == {0}
    assert all((b.sequence_number - a.sequence_number) % 65536 == 1 for a, b in zip(got, got[1:]))
    assert all((b.timestamp - a.timestamp) % 2**32 == SAMPLES for a, b in zip(got, got[1:]))
    gaps = np.diff([t for t, _ in phone.packets])
    assert 0.015 < float(np.median(gaps)) < 0.025
    # The agent's tone is in the packets, then silence.
    dec = PcmuDecoder()
    sent = np.concatenate([dec.decode(JitterFrame(p.payload, 0))[0].to_ndarray().reshape(-1) for p in got])
    assert np.abs(sent[:SAMPLES * 10]).max() > 4000 and np.abs(sent[-SAMPLES * 5:]).max() < 50
