"""SIP calls: a real SIPp caller, and hand-made requests over UDP (tiny profile)."""

import asyncio
import fractions
import shutil
import socket
import uuid
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc.codecs.g711 import PcmuEncoder

from agent.audio import read_audio
from agent.call.factory import SessionFactory
from signaling.sip.endpoint import SipServer
from signaling.sip.message import parse_message

pytestmark = pytest.mark.asyncio(loop_scope="session")
HERE = Path(__file__).parent


async def start(models, settings, **kwargs) -> SipServer:
    server = SipServer(SessionFactory(models), settings, "127.0.0.1", 0, **kwargs)
    await server.start()
    return server


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ulaw_file(path: Path, audio_8k: np.ndarray) -> None:
    encoder = PcmuEncoder()
    out = bytearray()
    for i in range(0, len(audio_8k) - 159, 160):
        frame = av.AudioFrame.from_ndarray(audio_8k[i:i + 160].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 8000, 0, fractions.Fraction(1, 8000)
        out += encoder.encode(frame)[0][0]
    path.write_bytes(bytes(out))


@pytest.mark.skipif(shutil.which("sipp") is None, reason="SIPp (Debian package sip-tester) is not installed")
async def test_sipp_asks_and_hears_an_answer(models, tiny_settings, tmp_path):
    server = await start(models, tiny_settings)
    try:
        speech = read_audio(HERE / "fixtures" / "question1.wav", 8000)
        ulaw = tmp_path / "question.ulaw"
        ulaw_file(ulaw, np.concatenate([np.zeros(4000, np.int16), speech]))
        scenario = tmp_path / "uac.xml"
        scenario.write_text((HERE / "sipp" / "uac_question.xml").read_text()
                            .replace("{ULAW}", str(ulaw)).replace("{LISTEN_MS}", "9000"))
        sipp = await asyncio.create_subprocess_exec(
            "sipp", f"127.0.0.1:{server.port}", "-sf", str(scenario), "-m", "1", "-l", "1", "-nostdin",
            "-i", "127.0.0.1", "-mi", "127.0.0.1", "-p", str(free_udp_port()), "-mp", str(free_udp_port()),
            "-timeout", "60s", "-timeout_error", cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(sipp.communicate(), 90)
        assert sipp.returncode == 0, err.decode()[-2000:]
        (call,) = server.ended
        # The question arrived as RTP; SIPp then sends nothing more, which must count as silence.
        assert call.rtp.received > 100
        turns = call.session.turns
        assert turns and turns[0].agent_start is not None  # ... was answered
        assert call.rtp.loud_sent > 10  # ... and the answer went out as RTP
        assert not server.calls
    finally:
        await server.close()


class Phone(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.messages: asyncio.Queue = asyncio.Queue()

    def datagram_received(self, data, addr) -> None:
        self.messages.put_nowait(parse_message(data))


async def phone_for(server):
    loop = asyncio.get_running_loop()
    transport, phone = await loop.create_datagram_endpoint(Phone, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]

    def send(text: str) -> None:
        transport.sendto(text.replace("\n", "\r\n").encode(), ("127.0.0.1", server.port))

    async def expect(*statuses):
        got = []
        for _ in statuses:
            got.append((await asyncio.wait_for(phone.messages.get(), 5)).status)
        assert got == list(statuses)

    return transport, port, send, expect


def request(method: str, port: int, call_id: str, cseq: int, branch: str, body: str = "", to_tag: str = "",
            content_type: str = "application/sdp") -> str:
    head = (f"{method} sip:agent@127.0.0.1 SIP/2.0\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{branch};rport\n"
            f"From: <sip:phone@127.0.0.1>;tag=phone1\n"
            f"To: <sip:agent@127.0.0.1>{';tag=' + to_tag if to_tag else ''}\n"
            f"Call-ID: {call_id}\nCSeq: {cseq} {method}\nMax-Forwards: 70\n")
    if body:
        head += f"Content-Type: {content_type}\n"
    return head + f"Content-Length: {len(body.replace(chr(10), chr(13) + chr(10)).encode())}\n\n" + body


def offer(rtp_port: int, formats="0 101", maps="a=rtpmap:0 PCMU/8000\na=rtpmap:101 telephone-event/8000\n") -> str:
    return (f"v=0\no=- 1 1 IN IP4 127.0.0.1\ns=-\nc=IN IP4 127.0.0.1\nt=0 0\n"
            f"m=audio {rtp_port} RTP/AVP {formats}\n{maps}")


async def test_options_bad_input_and_unknown_dialogs(models, tiny_settings):
    server = await start(models, tiny_settings)
    transport, port, send, expect = await phone_for(server)
    try:
        for garbage in ("", "hello", "\x00" * 50, "INVITE sip:x SIP/2.0\n\n", "SIP/2.0 200 OK\n\n" * 3,
                        "X" * 70000):
            send(garbage)
        # Malformed, but naming enough to answer: 400.
        send(request("INVITE", port, "c1", 1, "a").replace("CSeq: 1 INVITE", "CSeq: 1 BYE"))
        await expect(400)
        send(request("OPTIONS", port, "c2", 1, "b"))
        await expect(200)
        send(request("BYE", port, "nosuchcall", 2, "c", to_tag="x"))
        await expect(481)
        send(request("CANCEL", port, "nosuchcall", 1, "d"))
        await expect(481)
        send(request("REGISTER", port, "c3", 1, "e"))
        await expect(405)
        send(request("FROBNICATE", port, "c4", 1, "f"))
        await expect(501)
        send(request("INVITE", port, "c5", 1, "g", body=offer(4000, "111", "a=rtpmap:111 opus/48000/2\n")))
        await expect(488)
        send(request("INVITE", port, "c6", 1, "h"))  # no SDP
        await expect(488)
        assert not server.calls
    finally:
        transport.close()
        await server.close()


async def test_cancel_before_answer(models, tiny_settings):
    server = await start(models, tiny_settings, ring_s=1.0)
    transport, port, send, expect = await phone_for(server)
    try:
        call_id = uuid.uuid4().hex
        send(request("INVITE", port, call_id, 1, "inv1", body=offer(free_udp_port())))
        await expect(100, 180)
        send(request("CANCEL", port, call_id, 1, "inv1"))
        await expect(200, 487)
        await asyncio.sleep(1.2)
        assert not server.calls and not models.tts.active
    finally:
        transport.close()
        await server.close()


async def test_answer_ack_bye_and_the_call_limit(models, tiny_settings):
    server = await start(models, tiny_settings.replace("server", max_calls=1))
    transport, port, send, expect = await phone_for(server)
    try:
        call_id = uuid.uuid4().hex
        send(request("INVITE", port, call_id, 1, "x1", body=offer(free_udp_port())))
        await expect(100, 180)
        ok = await asyncio.wait_for(transport.get_protocol().messages.get(), 5)
        assert ok.status == 200 and b"m=audio" in ok.body and "PCMU" in ok.body.decode()
        tag = ok.to_tag
        send(request("INVITE", port, call_id, 1, "x1", body=offer(4000)))  # a retransmission
        assert (await asyncio.wait_for(transport.get_protocol().messages.get(), 5)).status == 200
        send(request("ACK", port, call_id, 1, "x2", to_tag=tag))
        send(request("INVITE", port, "second", 1, "y1", body=offer(free_udp_port())))
        await expect(486)  # busy: one call is the limit
        send(request("BYE", port, call_id, 2, "x3", to_tag=tag))
        await expect(200)
        await asyncio.sleep(0.2)
        assert not server.calls and server.ended[-1].call_id == call_id
        await asyncio.sleep(1.0)
        assert transport.get_protocol().messages.empty()  # the ACK stopped the 200 OK resends
    finally:
        transport.close()
        await server.close()


async def test_the_agent_hangs_up_with_a_bye(models, tiny_settings):
    server = await start(models, tiny_settings)
    transport, port, send, expect = await phone_for(server)
    try:
        call_id = uuid.uuid4().hex
        send(request("INVITE", port, call_id, 1, "z1", body=offer(free_udp_port())))
        await expect(100, 180, 200)
        tag = server.calls[call_id].local_tag
        send(request("ACK", port, call_id, 1, "z2", to_tag=tag))
        await asyncio.sleep(0.1)
        await server.close()  # shutting down hangs up
        bye = await asyncio.wait_for(transport.get_protocol().messages.get(), 5)
        assert bye.method == "BYE" and bye.call_id == call_id
        assert bye.from_tag == tag and bye.to_tag == "phone1" and bye.cseq == (1, "BYE")
        assert not server.calls
    finally:
        transport.close()
