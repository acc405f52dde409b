"""SIP calls from hand-made requests over UDP (tiny profile); SIPp calls are in e2e/test_sipp.py."""

import asyncio
import uuid

import pytest
from support import free_udp_port, offer, phone_for, request, start

pytestmark = pytest.mark.asyncio(loop_scope="session")


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
