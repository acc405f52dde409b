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

from signaling.sip.rtp import LOST, SAMPLES, JitterBuffer, RtpSession, parse_dtmf


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
    assert digits == ["5"] and session.dropped + session.foreign == len(garbage)
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


# -- hostile or odd input: the stream goes on, the latch holds ------------------------

LOUD = (np.sin(np.arange(480) * 2 * np.pi * 440 / 24000) * 8000).astype(np.int16)  # 20 ms at 24 kHz


class Peer(asyncio.DatagramProtocol):
    """A UDP socket on 127.0.0.1 that sends RTP and records what comes to it."""

    def __init__(self) -> None:
        self.packets: list[tuple[float, RtpPacket]] = []
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        self.packets.append((time.monotonic(), RtpPacket.parse(data)))

    @property
    def addr(self) -> tuple[str, int]:
        return self.transport.get_extra_info("sockname")[:2]

    def received_after(self, t: float) -> int:
        return sum(1 for at, _ in self.packets if at > t)

    async def play(self, packets: list[bytes], to: tuple[str, int]) -> None:
        for data in packets:
            self.transport.sendto(data, to)
            await asyncio.sleep(0.02)


async def peers(n: int) -> list[Peer]:
    loop = asyncio.get_running_loop()
    return [(await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0)))[1] for _ in range(n)]


async def agent_rtp(heard: list, **kwargs) -> tuple[RtpSession, tuple[str, int]]:
    """The agent's side: always something loud to say; the SDP names a port nobody uses."""
    session = RtpSession("PCMU", 0, 101, ("127.0.0.1", 9), lambda: LOUD, 24000, heard.append, **kwargs)
    return session, ("127.0.0.1", await session.start("127.0.0.1"))


def tone(seconds: float, level: int = 10000) -> np.ndarray:
    return (np.sin(np.arange(round(8000 * seconds)) * 2 * np.pi * 300 / 8000) * level).astype(np.int16)


def loud_frames(heard: list[np.ndarray]) -> int:
    return sum(1 for h in heard if len(h) and np.abs(h).max() > 3000)


async def test_an_empty_payload_does_not_stop_the_stream():
    heard: list[np.ndarray] = []
    session, to = await agent_rtp(heard)
    (phone,) = await peers(1)
    try:
        packets = pcmu_packets(tone(1.0), seq0=100, ts0=0, ssrc=7)
        empty = RtpPacket(0, sequence_number=125, timestamp=25 * SAMPLES, ssrc=7, payload=b"").serialize()
        await phone.play(packets[:25], to)
        phone.transport.sendto(empty, to)  # FFmpeg would take it for the end of the stream
        t = time.monotonic()
        await phone.play(pcmu_packets(tone(1.0), seq0=126, ts0=26 * SAMPLES, ssrc=7), to)
        await asyncio.sleep(0.1)
    finally:
        await session.close()
        phone.transport.close()
    assert phone.received_after(t + 0.5) >= 15  # the agent still talks
    assert loud_frames(heard) >= 25 + 50 - 6  # ... and still hears the caller after it
    assert session.failure is None


async def test_one_spoofed_packet_does_not_move_the_agents_audio():
    heard: list[np.ndarray] = []
    session, to = await agent_rtp(heard)
    phone, spoofer = await peers(2)
    try:
        packets = pcmu_packets(tone(1.5), seq0=100, ts0=0, ssrc=7)
        await phone.play(packets[:25], to)
        # One packet each from elsewhere: with the caller's SSRC and next number, and with another.
        spoofer.transport.sendto(pcmu_packets(tone(0.02), seq0=125, ts0=25 * SAMPLES, ssrc=7)[0], to)
        spoofer.transport.sendto(pcmu_packets(tone(0.02), seq0=9, ts0=0, ssrc=99)[0], to)
        await asyncio.sleep(1.0)  # the caller pauses (silence suppression)
        await phone.play(packets[25:], to)
    finally:
        await session.close()
        for peer in (phone, spoofer):
            peer.transport.close()
    assert spoofer.packets == [] and session.remote == phone.addr
    assert len(phone.packets) >= 80 and session.foreign == 2


async def test_a_foreign_ssrc_from_another_address_is_neither_played_nor_followed():
    heard: list[np.ndarray] = []
    session, to = await agent_rtp(heard)
    phone, junk = await peers(2)
    try:
        quiet = pcmu_packets(np.zeros(8000, np.int16), seq0=500, ts0=0, ssrc=7)  # the caller: 1 s of silence
        noise = pcmu_packets(tone(1.0), seq0=501, ts0=SAMPLES, ssrc=0xBAD)  # loud, interleaved, all along
        phone.transport.sendto(quiet[0], to)
        for a, b in zip(quiet[1:], noise):
            phone.transport.sendto(a, to)
            junk.transport.sendto(b, to)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
    finally:
        await session.close()
        for peer in (phone, junk):
            peer.transport.close()
    assert junk.packets == [] and session.remote == phone.addr and len(phone.packets) >= 40
    assert heard and loud_frames(heard) == 0  # not a frame of the junk was played
    assert session.foreign >= 45


async def test_a_peer_that_moves_and_keeps_sending_is_followed():
    """NAT rebinding or a new media source after a re-INVITE: the old source stops, a new
    one (here with a new SSRC) keeps sending: after a few packets it is the peer."""
    heard: list[np.ndarray] = []
    session, to = await agent_rtp(heard)
    old, new = await peers(2)
    try:
        await old.play(pcmu_packets(tone(0.4), seq0=10, ts0=0, ssrc=7), to)
        await asyncio.sleep(0.6)
        t = time.monotonic()
        await new.play(pcmu_packets(tone(1.0), seq0=30000, ts0=0, ssrc=8), to)
        await asyncio.sleep(0.1)
    finally:
        await session.close()
        for peer in (old, new):
            peer.transport.close()
    assert session.remote == new.addr and session.relatched == 1
    assert new.received_after(t) >= 25 and old.received_after(t + 0.3) == 0
    assert loud_frames(heard) >= 15 + 35  # both streams were heard


async def test_sequence_jumps_and_an_ssrc_change_resynchronise_the_stream():
    heard: list[np.ndarray] = []
    session, to = await agent_rtp(heard)
    (phone,) = await peers(1)
    try:
        sections = [(1000, 7), (2500, 7), (1200, 7), (40000, 9)]  # +1500, -1300, then a new SSRC and numbering
        for seq0, ssrc in sections:
            await phone.play(pcmu_packets(tone(0.6), seq0=seq0, ts0=seq0 * SAMPLES, ssrc=ssrc), to)
        await asyncio.sleep(0.1)
    finally:
        await session.close()
        phone.transport.close()
    # Each section is heard, but for a few packets at its start (the buffer refills, a new
    # SSRC must persist for LATCH_PACKETS first).
    assert loud_frames(heard) >= 4 * 30 - 3 * 3 - 6, loud_frames(heard)
    assert session.jitter.resyncs == 3 and session.peer_ssrc == 9


async def test_nothing_is_sent_before_the_call_is_confirmed_and_the_peer_is_heard():
    heard: list[np.ndarray] = []
    phone, named = await peers(2)
    session = RtpSession("PCMU", 0, 101, named.addr, lambda: LOUD, 24000, heard.append, confirmed=False)
    to = ("127.0.0.1", await session.start("127.0.0.1"))
    try:
        await asyncio.sleep(0.3)
        assert named.packets == [] and phone.packets == []  # the SDP's address gets nothing, ever
        await phone.play(pcmu_packets(tone(0.3), seq0=1, ts0=0, ssrc=7), to)
        assert phone.packets == []  # heard, but not confirmed yet (no ACK)
        session.confirm()
        await phone.play(pcmu_packets(tone(0.3), seq0=16, ts0=16 * SAMPLES, ssrc=7), to)
    finally:
        await session.close()
        for peer in (phone, named):
            peer.transport.close()
    assert len(phone.packets) >= 10 and named.packets == []
    assert session.last_heard is not None


def test_the_jitter_buffer_starts_over_on_a_jump_either_way():
    jb = JitterBuffer(depth=2)
    for seq in (10, 11, 12):
        jb.put(seq, bytes([seq]))
    assert jb.pop() == b"\x0a"
    for seq in (1512, 1513):  # +1500
        jb.put(seq, bytes([seq % 256]))
    assert [jb.pop(), jb.pop()] == [bytes([1512 % 256]), bytes([1513 % 256])] and jb.lost == 0
    for seq in (100, 101):  # far behind: no late packets, a new numbering
        jb.put(seq, bytes([seq]))
    assert [jb.pop(), jb.pop()] == [b"\x64", b"\x65"] and jb.resyncs == 2 and jb.late == 0
    jb.put(99, b"x")  # just behind: late
    assert jb.late == 1
