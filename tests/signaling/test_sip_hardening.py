"""SIP calls under hostile or odd conditions (issue 17), through the real UDP and RTP path
with the tiny profile: a conversation of several turns with long gaps (echo guard on), an
INVITE flood that never ACKs, an INVITE retransmitted from elsewhere, a caller that
vanishes, a media loop that fails. The phone here is plain Python over loopback UDP,
sending G.711 RTP every 20 ms as SIPp and softphones do."""

import asyncio
import fractions
import logging
import time
from collections import Counter, deque

import av
import numpy as np
import pytest
from aiortc.codecs.g711 import PcmuDecoder, PcmuEncoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtp import RtpPacket
from support import FIXTURES, offer, phone_for, request, start

from agent.audio import read_audio
from signaling.sip.message import make_response
from signaling.sip.sdp import codec_from_answer, parse_sdp

pytestmark = pytest.mark.asyncio(loop_scope="session")
VOICED = 500  # a packet whose samples reach this carries the agent's voice, not silence


class RtpPhone(asyncio.DatagramProtocol):
    """A phone's media: sends what it is told to say (silence otherwise) as PCMU every 20 ms
    once started, and records when each packet came and how loud it was."""

    def __init__(self) -> None:
        self.transport = None
        self.to: tuple[str, int] | None = None
        self.pending: deque[np.ndarray] = deque()
        self.seq, self.timestamp, self.ssrc = 1000, 0, 0x1234
        self.got: list[tuple[float, int]] = []  # (when, peak sample)
        self.sent = 0
        self._encoder, self._decoder = PcmuEncoder(), PcmuDecoder()
        self._task: asyncio.Task | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        packet = RtpPacket.parse(data)
        frames = self._decoder.decode(JitterFrame(packet.payload, 0)) if packet.payload else []
        peak = max((int(np.abs(f.to_ndarray()).max()) for f in frames), default=0)
        self.got.append((time.monotonic(), peak))

    @property
    def port(self) -> int:
        return self.transport.get_extra_info("sockname")[1]

    def say(self, audio_8k: np.ndarray) -> None:
        audio = np.concatenate([audio_8k, np.zeros(-len(audio_8k) % 160, np.int16)])
        self.pending.extend(audio.reshape(-1, 160))

    def packet(self, samples: np.ndarray, payload_type: int = 0) -> bytes:
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 8000, 0, fractions.Fraction(1, 8000)
        payload = self._encoder.encode(frame)[0][0] if payload_type == 0 else bytes([40])  # CN: a level
        data = RtpPacket(payload_type, sequence_number=self.seq, timestamp=self.timestamp, ssrc=self.ssrc,
                         payload=payload).serialize()
        self.seq, self.timestamp = (self.seq + 1) % 65536, (self.timestamp + 160) % 2**32
        return data

    def start(self, to: tuple[str, int]) -> None:
        self.to = to
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        start, n = time.monotonic(), 0
        while True:
            samples = self.pending.popleft() if self.pending else np.zeros(160, np.int16)
            self.transport.sendto(self.packet(samples), self.to)
            self.sent += 1
            n += 1
            await asyncio.sleep(max(0.0, start + 0.02 * n - time.monotonic()))

    async def said(self) -> float:
        """Wait until all it was told to say went out; returns when."""
        while self.pending:
            await asyncio.sleep(0.02)
        return time.monotonic()

    def voiced_after(self, t: float) -> int:
        return sum(1 for at, peak in self.got if at > t and peak > VOICED)


async def rtp_phone() -> RtpPhone:
    _, phone = await asyncio.get_running_loop().create_datagram_endpoint(RtpPhone, local_addr=("127.0.0.1", 0))
    return phone


async def until(condition, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


async def next_message(transport, timeout: float = 5.0):
    return await asyncio.wait_for(transport.get_protocol().messages.get(), timeout)


async def answered(server, transport, port: int, send, rtp_port: int, call_id: str, ack: bool = True):
    """INVITE from the phone, 100/180/200 back, then (with `ack`) the ACK. Returns the 200
    and the agent's RTP address from its SDP."""
    send(request("INVITE", port, call_id, 1, f"b{call_id}", body=offer(rtp_port)))
    statuses = [(await next_message(transport)).status for _ in range(2)]
    ok = await next_message(transport)
    assert statuses + [ok.status] == [100, 180, 200], statuses + [ok.status]
    if ack:
        send(request("ACK", port, call_id, 1, f"a{call_id}", to_tag=ok.to_tag))
    return ok, ("127.0.0.1", codec_from_answer(parse_sdp(ok.body)).remote_port)


def drain(transport) -> list:
    messages = transport.get_protocol().messages
    out = []
    while not messages.empty():
        out.append(messages.get_nowait())
    return out


# -- a conversation ----------------------------------------------------------------

async def test_a_three_turn_conversation_with_gaps_longer_than_the_echo_buffer(models, tiny_settings):
    """Every SIP call used to go silent at the agent's second reply. Three questions, each
    answered aloud; between replies, longer than the echo guard's buffer. The second one
    comes after the caller's sequence numbers jump by 1,500, the third on a new SSRC."""
    server = await start(models, tiny_settings)  # echo.guard "auto": on for a phone line
    transport, port, send, _ = await phone_for(server)
    phone = await rtp_phone()
    questions = [read_audio(FIXTURES / f"question{i}.wav", 8000) for i in (1, 2, 1)]
    try:
        ok, agent = await answered(server, transport, port, send, phone.port, "conversation")
        call = server.calls["conversation"]
        assert call.session.echo is not None
        phone.start(agent)
        for i, question in enumerate(questions):
            if i == 1:
                phone.seq = (phone.seq + 1500) % 65536  # an SBC renumbers the stream
            elif i == 2:
                phone.ssrc, phone.seq = 0x5151, 40000  # a new stream (a re-INVITE elsewhere, a transfer)
            phone.say(np.concatenate([np.zeros(8000, np.int16), question]))
            asked = await phone.said()
            assert await until(lambda: len(call.session.turns) > i and call.session.turns[i].played_text is not None
                               and not call.session.agent_busy, 90), f"turn {i + 1} was not answered"
            turn = call.session.turns[i]
            assert turn.error is None and not turn.interrupted
            assert phone.voiced_after(asked) >= 10, f"turn {i + 1}: the answer was not heard"
            await asyncio.sleep(0.5)  # its last packets
        turns = call.session.turns
        assert len(turns) == 3
        buffer_s = len(call.session.echo._ref.buf) / 16000
        assert all(b.agent_start - a.agent_end > buffer_s for a, b in zip(turns, turns[1:]))
        assert not call.ended and call.rtp.failure is None and not server.counts
        assert call.rtp.jitter.resyncs >= 2
        send(request("BYE", port, "conversation", 2, "bye1", to_tag=ok.to_tag))
        assert (await next_message(transport)).status == 200
    finally:
        await phone.stop()
        phone.transport.close()
        transport.close()
        await server.close()


# -- INVITEs that are never confirmed ------------------------------------------------

async def test_an_invite_flood_without_acks_holds_no_slot_and_reflects_no_rtp(models, tiny_settings):
    """100 INVITEs that never ACK, naming a victim's address in their SDP (as from many
    sources: the per-source limit is lifted here). They take the call slots only until
    server.connect_timeout_s, get at most one BYE each, and the victim gets no packet."""
    settings = tiny_settings.replace("server", connect_timeout_s=1.5, max_unconfirmed_per_source=1000)
    server = await start(models, settings)
    flood, flood_port, flood_send, _ = await phone_for(server)
    victim = await rtp_phone()
    try:
        sent_at = time.monotonic()
        for i in range(100):
            flood_send(request("INVITE", flood_port, f"flood{i}", 1, f"f{i}", body=offer(victim.port)))
        finals: dict[str, int] = {}
        async with asyncio.timeout(15):
            while len(finals) < 100:
                msg = await next_message(flood, 15)
                if msg.status is not None and msg.status >= 200:
                    finals.setdefault(msg.call_id, msg.status)
        assert Counter(finals.values()) == {200: settings.server.max_calls, 486: 100 - settings.server.max_calls}
        # Abandoned at the connect timeout, and their slots free at once.
        assert await until(lambda: not server.calls, settings.server.connect_timeout_s + 5)
        assert time.monotonic() - sent_at < settings.server.connect_timeout_s + 4
        # A real caller is answered right after.
        transport, port, send, _ = await phone_for(server)
        phone = await rtp_phone()
        ok, agent = await answered(server, transport, port, send, phone.port, "real")
        phone.start(agent)
        assert await until(lambda: len(phone.got) >= 10, 5)  # and hears the agent
        await asyncio.sleep(1.0)  # any late BYE resend would come by now
        byes = Counter(m.call_id for m in drain(flood) if m.method == "BYE")
        assert set(byes.values()) == {1} and len(byes) == settings.server.max_calls  # one BYE each, no Timer E
        assert victim.got == []  # never an RTP packet toward the never-confirmed addresses
        assert server.counts["unconfirmed"] == settings.server.max_calls
        await phone.stop()
        phone.transport.close()
        transport.close()
    finally:
        flood.close()
        victim.transport.close()
        await server.close()


async def test_one_address_may_hold_only_a_few_unconfirmed_calls(models, tiny_settings):
    settings = tiny_settings.replace("server", connect_timeout_s=5.0)
    limit = settings.server.max_unconfirmed_per_source
    assert limit < settings.server.max_calls
    server = await start(models, settings)
    transport, port, send, _ = await phone_for(server)
    try:
        for i in range(6):
            send(request("INVITE", port, f"u{i}", 1, f"u{i}", body=offer(9)))
        finals: dict[str, object] = {}
        async with asyncio.timeout(10):
            while len(finals) < 6:
                msg = await next_message(transport, 10)
                if msg.status is not None and msg.status >= 200:
                    finals.setdefault(msg.call_id, msg)
        ok = [m for m in finals.values() if m.status == 200]
        busy = [m for m in finals.values() if m.status == 486]
        assert len(ok) == limit and len(busy) == 6 - limit
        assert all("unconfirmed" in m.reason for m in busy)
        # Once one of them is ACKed, that address may start another.
        send(request("ACK", port, ok[0].call_id, 1, "ack0", to_tag=ok[0].to_tag))
        await asyncio.sleep(0.2)
        send(request("INVITE", port, "u-next", 1, "unext", body=offer(9)))
        async with asyncio.timeout(10):
            while (msg := await next_message(transport, 10)).call_id != "u-next" or (msg.status or 0) < 200:
                pass
        assert msg.status == 200
        assert server.counts["refused_unconfirmed"] == 6 - limit
    finally:
        transport.close()
        await server.close()


async def test_an_invite_is_matched_on_its_transaction_not_its_call_id(models, tiny_settings):
    """A copy of a call's INVITE from another address, or with another branch, must not get
    that call's 200 (with its To tag): 482 Loop Detected (RFC 3261 8.2.2.2). A new INVITE
    with the Call-ID of a call in progress is refused. The true retransmission gets the 200
    again. Before the ACK no RTP goes out, though the caller's RTP already comes in."""
    server = await start(models, tiny_settings)
    transport, port, send, _ = await phone_for(server)
    other, _other_port, _, _ = await phone_for(server)
    phone = await rtp_phone()
    try:
        invite = request("INVITE", port, "tx", 1, "tx1", body=offer(phone.port))
        send(invite)
        assert [(await next_message(transport)).status for _ in range(3)] == [100, 180, 200]
        call = server.calls["tx"]
        ok_tag = call.local_tag
        phone.start(("127.0.0.1", call.rtp.transport.get_extra_info("sockname")[1]))  # early RTP, no ACK yet

        other.sendto(invite.replace("\n", "\r\n").encode(), ("127.0.0.1", server.port))  # the same bytes, elsewhere
        answer = await next_message(other)
        assert answer.status == 482 and answer.to_tag != ok_tag
        send(invite.replace("branch=z9hG4bKtx1", "branch=z9hG4bKtx2"))  # the same request, another transaction
        answer = await next_message(transport)
        assert answer.status == 482 and answer.to_tag != ok_tag
        send(invite.replace("tag=phone1", "tag=phone2").replace("branch=z9hG4bKtx1", "branch=z9hG4bKtx3"))
        answer = await next_message(transport)
        assert answer.status == 486 and answer.to_tag != ok_tag
        send(invite)  # the real retransmission
        again = await next_message(transport)
        assert again.status == 200 and again.to_tag == ok_tag
        await asyncio.sleep(0.5)
        assert phone.got == [] and call.rtp.received > 10  # heard, but nothing sent before the ACK

        send(request("ACK", port, "tx", 1, "txa", to_tag="wrong"))  # an ACK without our tag confirms nothing
        await asyncio.sleep(0.3)
        assert phone.got == [] and not call.confirmed
        send(request("ACK", port, "tx", 1, "txa", to_tag=ok_tag))
        assert await until(lambda: len(phone.got) >= 10, 5)
        assert server.counts["loop_detected"] == 2 and not call.ended
    finally:
        await phone.stop()
        phone.transport.close()
        transport.close()
        other.close()
        await server.close()


# -- a caller that vanishes, a media loop that fails ----------------------------------

async def test_a_caller_that_vanishes_is_hung_up_on(models, tiny_settings):
    settings = tiny_settings.replace("server", media_timeout_s=1.0)
    server = await start(models, settings)
    transport, port, send, _ = await phone_for(server)
    phone = await rtp_phone()
    try:
        ok, agent = await answered(server, transport, port, send, phone.port, "vanish")
        call = server.calls["vanish"]
        for _ in range(10):  # some speech, then only comfort noise now and then (silence suppression)
            phone.transport.sendto(phone.packet(np.zeros(160, np.int16)), agent)
            await asyncio.sleep(0.02)
        for _ in range(8):
            phone.transport.sendto(phone.packet(np.zeros(160, np.int16), payload_type=13), agent)
            await asyncio.sleep(0.3)
        assert not call.ended  # comfort noise says the caller is there
        gone = time.monotonic()  # then nothing at all: the phone lost its network
        bye = await next_message(transport, 6)
        assert bye.method == "BYE" and bye.call_id == "vanish" and bye.to_tag == "phone1"
        assert time.monotonic() - gone < settings.server.media_timeout_s + 3
        assert call.ended and call.session.closed and server.counts["media_timeout"] == 1
        assert "no RTP" in call.end_reason
        transport.sendto(make_response(bye, 200).to_bytes(), ("127.0.0.1", server.port))
        assert await until(lambda: not server.calls, 5)
    finally:
        phone.transport.close()
        transport.close()
        await server.close()


async def test_a_failing_media_loop_is_logged_once_and_ends_the_call_with_a_bye(models, tiny_settings, caplog):
    server = await start(models, tiny_settings)
    transport, port, send, _ = await phone_for(server)
    phone = await rtp_phone()
    try:
        ok, agent = await answered(server, transport, port, send, phone.port, "fails")
        call = server.calls["fails"]

        def broken(samples):  # a fault in what the tick calls: the loop must not die silently
            raise RuntimeError("injected fault")

        call.rtp.on_audio = broken
        with caplog.at_level(logging.ERROR, logger="signaling.sip.rtp"):
            phone.start(agent)
            bye = await next_message(transport, 5)
        assert bye.method == "BYE" and bye.call_id == "fails"
        transport.sendto(make_response(bye, 200).to_bytes(), ("127.0.0.1", server.port))
        assert await until(lambda: not server.calls, 5)
        assert call.ended and call.session.closed and server.counts["media_failed"] == 1
        assert "the media failed" in call.end_reason
        assert sum("media loop failed" in r.getMessage() for r in caplog.records) == 1
    finally:
        await phone.stop()
        phone.transport.close()
        transport.close()
        await server.close()


async def test_ended_calls_are_not_kept_without_bound(models, tiny_settings):
    """The endpoint keeps only the last ENDED_KEPT ended calls: each holds its session
    and RTP stream (echo-guard buffers, the caller's audio), and it kept 100 of them, so a
    server's memory grew with its first 100 calls."""
    import gc

    from agent.call.session import CallSession
    from signaling.sip.endpoint import ENDED_KEPT
    from signaling.sip.phone import LoopbackPhone

    server = await start(models, tiny_settings)
    try:
        for n in range(ENDED_KEPT + 4):
            phone = LoopbackPhone("127.0.0.1", server.port, call_id=f"kept-{n}")
            await phone.dial()
            await phone.hang_up()
        deadline = time.monotonic() + 10
        while server.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        gc.collect()
        assert not server.calls and len(server.ended) == ENDED_KEPT
        assert server.ended[-1].call_id == f"kept-{ENDED_KEPT + 3}"
        assert sum(type(o) is CallSession for o in gc.get_objects()) <= ENDED_KEPT
    finally:
        await server.close()
