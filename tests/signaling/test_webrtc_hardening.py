"""WebRTC calls against hostile or broken peers (issue 17): bad SDP offers, offers that
never connect, peers killed mid-call, failing call tasks. Real aiortc peers over loopback."""

import asyncio
import contextlib
import gc
import os
import random
import signal
import sys
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from agent.call.factory import SessionFactory
from signaling.server import CALLS, create_app
from signaling.webrtc.call import BadOffer, SessionAudioTrack, WebRTCCall
from signaling.webrtc.loopback import Caller

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def offer_sdp() -> str:
    """A real offer, as the web client sends it (audio + the events data channel)."""
    caller = Caller("http://unused")
    await caller.pc.setLocalDescription(await caller.pc.createOffer())
    sdp = caller.pc.localDescription.sdp
    await caller.close()
    return sdp


def without(sdp: str, prefix: str) -> str:
    return "\r\n".join(line for line in sdp.split("\r\n") if not line.startswith(prefix))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class LoopErrors:
    """Collects what the event loop reports as unhandled ("Task exception was never retrieved")."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.errors: list[str] = []
        self.previous = self.loop.get_exception_handler()
        self.loop.set_exception_handler(self.report)

    def report(self, loop, context: dict) -> None:
        if "exception" in context:  # not the harness's own pending tasks collected here
            self.errors.append(f"{context['message']}: {context['exception']!r}")

    def stop(self) -> list[str]:
        gc.collect()  # unretrieved task exceptions are reported when the task is collected
        self.loop.set_exception_handler(self.previous)
        return self.errors


def closed_counter(call: WebRTCCall) -> list[WebRTCCall]:
    closed: list[WebRTCCall] = []
    call.on_closed = closed.append
    return closed


async def test_close_never_raises_and_reports_once(models, tiny_settings):
    # What a failed negotiation leaves: aiortc made a transceiver for the track but never
    # gave it a transport, and its own close() raises on it.
    from agent.call.outbound import OutboundAudio

    call = WebRTCCall(SessionFactory(models), tiny_settings, None)
    closed = closed_counter(call)
    await call.pc.setRemoteDescription(RTCSessionDescriptionOffer(without(await offer_sdp(), "m=audio")))
    with contextlib.suppress(AttributeError):
        call.pc.addTrack(SessionAudioTrack(OutboundAudio(480, 10)))
    await call.close()
    await call.close()
    assert closed == [call] and call.end_reason == "hangup"


BROKEN = {
    "no audio m-line": lambda s: without(s, "m=audio"),
    "no a=mid": lambda s: without(s, "a=mid"),
    "no direction": lambda s: without(s, "a=sendrecv"),
    "m=Audio": lambda s: s.replace("m=audio", "m=Audio"),
    "no data channel m-line": lambda s: without(s, "m=application"),
    "BUNDLE names a missing m-line": lambda s: s.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 7 1"),
    "no ICE password": lambda s: without(s, "a=ice-pwd"),
    "no codec in common": lambda s: s.replace("opus/48000/2", "x/48000/2").replace("G722/8000", "x/8000")
                                      .replace("PCMU/8000", "x/8000").replace("PCMA/8000", "x/8000"),
    "not SDP": lambda s: "hello",
}


@pytest.mark.parametrize("name", list(BROKEN))
async def test_a_broken_offer_is_a_bad_offer_and_leaves_nothing(models, tiny_settings, name):
    sdp = BROKEN[name](await offer_sdp())
    errors = LoopErrors()
    fds = open_fds()
    call = WebRTCCall(SessionFactory(models), tiny_settings, None)
    closed = closed_counter(call)
    with pytest.raises(BadOffer) as e:
        await call.answer(RTCSessionDescriptionOffer(sdp))
    assert "\n" not in str(e.value) and str(e.value)
    await call.close()  # what the server does anyway: nothing more happens
    assert closed == [call] and call.end_reason == "bad_offer"
    assert call.session is None or call.session.closed
    await asyncio.sleep(0.1)
    assert open_fds() <= fds
    assert errors.stop() == []


def RTCSessionDescriptionOffer(sdp: str):
    from aiortc import RTCSessionDescription

    return RTCSessionDescription(sdp=sdp, type="offer")


def mutations(sdp: str, n: int, seed: int = 17):
    """Seeded random bit flips and deleted lines."""
    rng = random.Random(seed)
    lines = sdp.split("\r\n")
    for i in range(n):
        if i % 3 == 2:
            kept = list(lines)
            del kept[rng.randrange(len(kept))]
            yield "\r\n".join(kept)
        else:
            data = bytearray(sdp.encode())
            for _ in range(rng.randint(1, 5)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(7)
            yield data.decode("latin-1")


async def test_mutated_offers_are_answered_or_refused_never_crash(models, tiny_settings):
    sdp = await offer_sdp()
    errors = LoopErrors()
    outcomes = {"answered": 0, "refused": 0}
    for mutated in mutations(sdp, 90):
        call = WebRTCCall(SessionFactory(models), tiny_settings, None)
        closed = closed_counter(call)
        try:
            await call.answer(RTCSessionDescriptionOffer(mutated))
            outcomes["answered"] += 1
        except BadOffer as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
        await call.close()  # never raises
        assert closed == [call]
    assert outcomes["refused"] > 15 and outcomes["answered"] > 5, outcomes
    assert errors.stop() == []


async def start_server(models, settings):
    server = TestServer(create_app(SessionFactory(models), settings), host="127.0.0.1")
    await server.start_server()
    return server


async def test_an_offer_that_never_connects_frees_its_slot(models, tiny_settings):
    server = await start_server(models, tiny_settings.replace("server", connect_timeout_s=1.0, max_calls=1))
    try:
        async with aiohttp.ClientSession() as http:
            # No candidates, and the answer never reaches a peer: ICE cannot complete.
            sdp = without(await offer_sdp(), "a=candidate")
            async with http.post(server.make_url("/offer"), json={"sdp": sdp, "type": "offer"}) as r:
                assert r.status == 200
                call = server.app[CALLS][(await r.json())["call_id"]]
            deadline = time.monotonic() + 5.0
            while call.id in server.app[CALLS] and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert call.id not in server.app[CALLS], "the slot is still held"
            assert call.end_reason == "connect_timeout"
            async with http.get(server.make_url("/metrics")) as r:
                assert 'voice_agent_calls_ended_total{reason="connect_timeout"} 1.0' in await r.text()
            # The slot is free again: a real caller is answered.
            caller = Caller(str(server.make_url("")))
            await caller.dial(http)
            await caller.close()
    finally:
        await server.close()


async def test_answer_makes_the_agent_the_dtls_server(models, tiny_settings):
    call = WebRTCCall(SessionFactory(models), tiny_settings, None)
    answer = await call.answer(RTCSessionDescriptionOffer(await offer_sdp()))
    await call.close()
    setups = [line for line in answer.sdp.split("\r\n") if line.startswith("a=setup:")]
    assert setups and set(setups) == {"a=setup:passive"}


async def test_a_failed_dtls_handshake_is_logged_with_its_cause(models, tiny_settings, caplog):
    """An offer whose fingerprint is not the caller's certificate's: ICE completes, DTLS
    fails, and the agent says why (aiortc says it only in its debug log) and ends the call."""
    from aiortc import RTCSessionDescription

    server = await start_server(models, tiny_settings)
    caller = Caller(str(server.make_url("")))
    try:
        await caller.pc.setLocalDescription(await caller.pc.createOffer())
        lines = caller.pc.localDescription.sdp.split("\r\n")
        forged = [line[:-2] + ("00" if not line.endswith("00") else "11") if line.startswith("a=fingerprint:")
                  else line for line in lines]
        assert forged != lines
        async with aiohttp.ClientSession() as http:
            async with http.post(server.make_url("/offer"), json={"sdp": "\r\n".join(forged), "type": "offer"}) as r:
                assert r.status == 200
                answer = await r.json()
        call = server.app[CALLS][answer["call_id"]]
        with caplog.at_level("WARNING", logger="signaling.webrtc.call"):
            await caller.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
            deadline = time.monotonic() + 30
            while answer["call_id"] in server.app[CALLS] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        assert call.end_reason == "connection_failed" and "fingerprint mismatch" in call.failure, call.failure
        failed = [r.getMessage() for r in caplog.records if "connection failed" in r.getMessage()]
        assert len(failed) == 1 and "DTLS failed as server" in failed[0] and "fingerprint mismatch" in failed[0]
    finally:
        await caller.close()
        await server.close()


async def test_a_killed_peer_is_dropped_after_media_timeout(models, tiny_settings):
    server = await start_server(models, tiny_settings.replace("server", media_timeout_s=1.0))
    peer = None
    try:
        # A caller in a process of its own, killed mid-call: no DTLS close, no DELETE.
        peer = await asyncio.create_subprocess_exec(sys.executable, "-m", "signaling.webrtc.loopback",
                                                    str(server.make_url("")), "1", "120")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(c.pc.connectionState == "connected"
                                                      for c in server.app[CALLS].values()):
            await asyncio.sleep(0.1)
        (call,) = server.app[CALLS].values()
        await asyncio.sleep(1.5)  # its audio flows: the media timeout does not fire on a live peer
        assert call.pc.connectionState == "connected" and call.id in server.app[CALLS]
        peer.send_signal(signal.SIGKILL)
        await peer.wait()
        killed = time.monotonic()
        while call.id in server.app[CALLS] and time.monotonic() < killed + 6.0:
            await asyncio.sleep(0.1)
        assert call.id not in server.app[CALLS], "the call outlived its silent peer"
        assert call.end_reason == "media_timeout"
    finally:
        if peer is not None and peer.returncode is None:
            peer.kill()
            await peer.wait()
        await server.close()


async def test_a_failing_call_task_ends_the_call(models, tiny_settings, speech):
    errors = LoopErrors()

    def broken_listener(call, event) -> None:
        raise RuntimeError("a bug in an event listener")

    call = WebRTCCall(SessionFactory(models), tiny_settings, None, on_event=broken_listener)
    closed = closed_counter(call)
    caller = Caller("http://unused")
    caller.mic.say(speech[0], pause_s=0.3)
    await caller.pc.setLocalDescription(await caller.pc.createOffer())
    answer = await call.answer(caller.pc.localDescription)
    await caller.pc.setRemoteDescription(answer)
    try:
        await caller.wait_for(lambda: closed, timeout=40)  # the first event (speech_started) fails
        assert call.end_reason == "task_failed" and closed == [call]
        assert call.session.closed
    finally:
        await caller.close()
        await call.close()
    assert errors.stop() == []


async def test_media_codecs_start_no_threads_per_call():
    """Each FFmpeg filter graph (every resampler) and Opus encoder made for a call used to
    start a worker thread per core, freed only when the garbage collector came round: a
    server's threads grew with its calls. agent.audio makes FFmpeg start none."""
    import fractions

    import av
    import numpy as np
    import psutil
    from aiortc.codecs.opus import OpusDecoder, OpusEncoder

    from agent.audio import Resampler

    before = psutil.Process().num_threads()
    encoder, decoder, resampler = OpusEncoder(), OpusDecoder(), Resampler(16000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 480), np.int16), format="s16", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = 24000, 0, fractions.Fraction(1, 24000)
    for _ in range(3):
        encoder.encode(frame)
    assert len(resampler.push(np.zeros(960, np.int16), 48000)) > 0
    assert decoder and psutil.Process().num_threads() == before

