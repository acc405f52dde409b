"""Outbound calls (`voice-agent call`) against hand-made peers (SIPp ones are in
e2e/test_sipp.py), DTMF into the session, and the 416/505/420 refusals."""

import asyncio
import os
import re
import socket
import struct
import subprocess
import sys

import pytest
from aiortc.rtp import RtpPacket
from support import offer, phone_for, request, start

from agent.call.events import DtmfReceived
from agent.call.factory import SessionFactory
from agent.cli import main as cli_main
from agent.config import load_settings
from agent.errors import ConfigError
from signaling.sip import endpoint as sip
from signaling.sip.client import CallFailed, SipClient, parse_target
from signaling.sip.message import make_response, parse_message
from signaling.sip.sdp import codec_from_answer, parse_sdp

session_loop = pytest.mark.asyncio(loop_scope="session")  # the models fixture's loop


# -- against hand-made peers -------------------------------------------------------

class Callee(asyncio.DatagramProtocol):
    """A UDP port that hands each SIP message it gets to the test."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue = asyncio.Queue()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        self.messages.put_nowait((parse_message(data), addr))

    async def next(self, timeout: float = 5.0):
        return await asyncio.wait_for(self.messages.get(), timeout)

    def answer(self, request, addr, status: int, to_tag: str | None = "callee1") -> None:
        self.transport.sendto(make_response(request, status, to_tag=to_tag).to_bytes(), addr)


async def callee_and_client(models, settings):
    loop = asyncio.get_running_loop()
    transport, callee = await loop.create_datagram_endpoint(Callee, local_addr=("127.0.0.1", 0))
    client = SipClient(SessionFactory(models), settings, "127.0.0.1")
    await client.start()
    return callee, client, parse_target(f"sip:bob@127.0.0.1:{transport.get_extra_info('sockname')[1]}")


@session_loop
async def test_rejected_calls_fail_with_the_answer_and_are_acked(models, tiny_settings):
    callee, client, target = await callee_and_client(models, tiny_settings)
    try:
        for status, message in ((486, "is busy (486 Busy Here)"),
                                (407, "asks for authentication (407 Proxy Authentication Required)"),
                                (603, "rejected the call (603 Decline)")):
            dialing = asyncio.ensure_future(client.dial(*target))
            invite, addr = await callee.next()
            assert invite.method == "INVITE" and b"m=audio" in invite.body and invite.cseq == (1, "INVITE")
            callee.answer(invite, addr, status)
            with pytest.raises(CallFailed, match=re.escape(message)):
                await dialing
            ack, _ = await callee.next()  # the rejection is ACKed in its transaction
            assert ack.method == "ACK" and ack.via[0].branch == invite.via[0].branch
            assert ack.to_tag == "callee1" and ack.cseq == (1, "ACK") and ack.call_id == invite.call_id
            callee.answer(invite, addr, status)  # the answer again (our ACK was "lost"): ACKed again
            assert (await callee.next())[0].method == "ACK"
        assert not client.calls
    finally:
        await client.close()
        callee.transport.close()


@session_loop
async def test_invite_resent_on_timer_a_and_given_up_at_timer_b(models, tiny_settings, monkeypatch):
    monkeypatch.setattr(sip, "TIMER_B", 2.0)
    callee, client, target = await callee_and_client(models, tiny_settings)
    try:
        with pytest.raises(CallFailed, match=r"no answer from 127\.0\.0\.1:\d+ in 2 s"):
            await client.dial(*target)
        sent = []
        while not callee.messages.empty():
            sent.append(callee.messages.get_nowait()[0])
        # Sent at 0, then T1 = 0.5 and 1.5 s (doubling), all the same request.
        assert len(sent) == 3 and len({(m.via[0].branch, m.cseq) for m in sent}) == 1
    finally:
        await client.close()
        callee.transport.close()


@session_loop
async def test_stopping_a_ringing_call_cancels_it(models, tiny_settings):
    callee, client, target = await callee_and_client(models, tiny_settings)
    try:
        progress = []
        dialing = asyncio.ensure_future(client.dial(*target, on_progress=progress.append))
        invite, addr = await callee.next()
        callee.answer(invite, addr, 100, to_tag=None)
        callee.answer(invite, addr, 180)
        await asyncio.sleep(0.7)
        assert [p.status for p in progress] == [100, 180]
        assert callee.messages.empty()  # a provisional answer stops the INVITE's resends
        dialing.cancel()
        cancel, cancel_addr = await callee.next()
        assert cancel.method == "CANCEL" and cancel.cseq == (1, "CANCEL") and cancel.uri == invite.uri
        assert cancel.via[0].branch == invite.via[0].branch and cancel.to_tag is None
        callee.answer(cancel, cancel_addr, 200)
        callee.answer(invite, addr, 487)
        ack, _ = await callee.next()
        assert ack.method == "ACK" and ack.via[0].branch == invite.via[0].branch
        with pytest.raises(asyncio.CancelledError):
            await dialing
        assert not client.calls
        # The calling side takes no calls: a new INVITE gets 403.
        phone, _, send, expect = await phone_for(client)
        send(request("INVITE", phone.get_extra_info("sockname")[1], "in1", 1, "i1", body=offer(4000)))
        await expect(403)
        phone.close()
    finally:
        await client.close()
        callee.transport.close()


def dtmf_packet(key: str, seq: int, timestamp: int, end: bool) -> bytes:
    """An RFC 4733 telephone-event packet (payload type 101) for one keypad key."""
    payload = struct.pack("!BBH", "0123456789*#ABCD".index(key), (0x80 if end else 0) | 10, 800 if end else 400)
    return RtpPacket(payload_type=101, sequence_number=seq, timestamp=timestamp, ssrc=1234, payload=payload).serialize()


@session_loop
async def test_dtmf_reaches_the_session_and_the_hangup_key_ends_the_call(models, tiny_settings):
    server = await start(models, tiny_settings.replace("session", hangup_digit="#"))
    transport, port, send, expect = await phone_for(server)
    phone = transport.get_protocol()
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind(("127.0.0.1", 0))
    try:
        send(request("INVITE", port, "dtmf-call", 1, "d1", body=offer(rtp.getsockname()[1])))
        await expect(100, 180)
        ok = await asyncio.wait_for(phone.messages.get(), 5)
        assert ok.status == 200
        send(request("ACK", port, "dtmf-call", 1, "d2", to_tag=ok.to_tag))
        call = server.calls["dtmf-call"]
        agent_rtp = ("127.0.0.1", codec_from_answer(parse_sdp(ok.body)).remote_port)
        # A re-INVITE gets our SDP as it was, for its own CSeq.
        send(request("INVITE", port, "dtmf-call", 2, "d3", body=offer(rtp.getsockname()[1]), to_tag=ok.to_tag))
        again = await asyncio.wait_for(phone.messages.get(), 5)
        assert again.status == 200 and again.cseq == (2, "INVITE") and again.body == ok.body
        send(request("ACK", port, "dtmf-call", 2, "d4", to_tag=ok.to_tag))

        # Key 5, sent as phones do: the event repeated, then its end three times.
        for i, end in enumerate((False, False, True, True, True)):
            rtp.sendto(dtmf_packet("5", 100 + i, 8000, end), agent_rtp)
        async with asyncio.timeout(5):
            while not isinstance(event := await call.session.events.get(), DtmfReceived):
                pass
        assert event.digit == "5" and event.t > 0 and call.dtmf == ["5"] and not call.ended

        for i, end in enumerate((False, True, True, True)):
            rtp.sendto(dtmf_packet("#", 200 + i, 16000, end), agent_rtp)
        bye = await asyncio.wait_for(phone.messages.get(), 5)
        assert bye.method == "BYE" and bye.from_tag == ok.to_tag and bye.to_tag == "phone1"
        assert call.ended and call.end_reason == "the caller pressed the hang-up key #"
        # Unanswered, the BYE comes again (Timer E); the 200 to it ends the hang-up.
        resent = await asyncio.wait_for(phone.messages.get(), 2)
        assert resent.method == "BYE" and resent.via[0].branch == bye.via[0].branch and resent.cseq == bye.cseq
        transport.sendto(make_response(resent, 200).to_bytes(), ("127.0.0.1", server.port))
        assert await asyncio.wait_for(call.tasks[-1], 5) == 200
        assert not server.calls and server.ended[-1] is call and call.dtmf == ["5", "#"]
    finally:
        rtp.close()
        transport.close()
        await server.close()


@session_loop
async def test_416_420_and_505_refusals(models, tiny_settings):
    server = await start(models, tiny_settings)
    loop = asyncio.get_running_loop()
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    raw.setblocking(False)
    port = raw.getsockname()[1]

    async def ask(text: str) -> str:
        await loop.sock_sendto(raw, text.replace("\n", "\r\n").encode(), ("127.0.0.1", server.port))
        return (await asyncio.wait_for(loop.sock_recv(raw, 65535), 5)).decode()

    try:
        # RFC 3261 8.2.2.1: a Request-URI scheme we do not know.
        answer = await ask(request("OPTIONS", port, "r1", 1, "a").replace("sip:agent@127.0.0.1", "mailto:agent@example.com", 1))
        assert answer.startswith("SIP/2.0 416 Unsupported URI Scheme\r\n")
        # 8.2.2.3: a required extension we lack (we support none), named in Unsupported.
        invite = request("INVITE", port, "r2", 1, "b", body=offer(4000)).replace("Max-Forwards", "Require: 100rel, timer\nMax-Forwards")
        answer = await ask(invite)
        assert answer.startswith("SIP/2.0 420 Bad Extension\r\n") and "\r\nUnsupported: 100rel, timer\r\n" in answer
        assert not server.calls
        # ... but never for an ACK (no answer at all) nor a CANCEL (481 here: no such call).
        ack = request("ACK", port, "r3", 1, "c").replace("Max-Forwards", "Require: foo\nMax-Forwards")
        await loop.sock_sendto(raw, ack.replace("\n", "\r\n").encode(), ("127.0.0.1", server.port))
        assert (await ask(request("CANCEL", port, "r4", 1, "d").replace("Max-Forwards", "Require: foo\nMax-Forwards"))
                ).startswith("SIP/2.0 481 ")
        # RFC 4475 3.1.2.18 (badvers): another SIP version gets 505, its headers echoed.
        badvers = request("OPTIONS", port, "r5", 1, "e").replace("SIP/2.0\n", "SIP/7.0\n", 1).replace(
            "Via: SIP/2.0/UDP", "Via: SIP/7.0/UDP")
        answer = await ask(badvers)
        assert answer.startswith("SIP/2.0 505 Version Not Supported\r\n") and "\r\nCall-ID: r5\r\n" in answer
        # The next valid request is answered as usual.
        assert (await ask(request("OPTIONS", port, "r6", 1, "f"))).startswith("SIP/2.0 200 OK\r\n")
    finally:
        raw.close()
        await server.close()


# -- the command line --------------------------------------------------------------

def test_call_with_a_bad_uri_exits_2_with_one_line():
    env = {k: v for k, v in os.environ.items() if k != "VOICE_AGENT_PROFILE"}
    p = subprocess.run([sys.executable, "-m", "agent.cli", "call", "bob@example.com", "--profile", "tiny"],
                       capture_output=True, timeout=60, env=env)
    err = p.stderr.decode()
    assert p.returncode == 2 and err.startswith("voice-agent: error: bad SIP URI 'bob@example.com'"), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["sips:bob@127.0.0.1"], "only sip: URIs"),
    (["tel:+15551234567"], "only sip: URIs"),
    (["http://example.com/"], "unsupported URI scheme 'http'"),
    (["sip:bob@"], "bad host"),
    (["sip:bob@127.0.0.1;transport=tcp"], "transport=tcp is not supported"),
    (["sip:bob@127.0.0.1", "--max-seconds", "0"], "--max-seconds must be positive"),
    (["sip:bob@127.0.0.1", "--local-host", "me"], "--local-host must be an IP address"),
    (["sip:bob@127.0.0.1", "--voice", "bob"], "unknown voice 'bob'"),
])
def test_call_refuses_bad_input_before_loading_models(args, message, capsys):
    assert cli_main(["call", *args, "--profile", "tiny"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_the_hangup_digit_setting_is_checked():
    assert load_settings("tiny", env={}).session.hangup_digit == ""  # off by default
    assert load_settings("tiny", env={"VOICE_AGENT_SESSION__HANGUP_DIGIT": "#"}).session.hangup_digit == "#"
    with pytest.raises(ConfigError, match="session.hangup_digit must be one key of"):
        load_settings("tiny", env={"VOICE_AGENT_SESSION__HANGUP_DIGIT": '"55"'})
