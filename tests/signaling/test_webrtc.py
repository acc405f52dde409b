"""Browser calls over WebRTC, tested with a real aiortc peer over loopback (tiny profile)."""

import asyncio
import time

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from agent.call.factory import SessionFactory
from signaling.server import CALLS, create_app
from signaling.webrtc.call import SessionAudioTrack
from signaling.webrtc.loopback import Caller

pytestmark = pytest.mark.asyncio(loop_scope="session")
RATE = 16000


async def start_server(models, settings):
    server = TestServer(create_app(SessionFactory(models), settings), host="127.0.0.1")
    await server.start_server()
    return server


@pytest.fixture(scope="module")
async def server(models, tiny_settings):
    server = await start_server(models, tiny_settings)
    yield server
    await server.close()


async def health(http, server):
    async with http.get(server.make_url("/health")) as r:
        return await r.json()


async def test_the_agent_answers_after_the_caller_stops(server, speech):
    async with aiohttp.ClientSession() as http:
        caller = Caller(str(server.make_url("")))
        caller.mic.say(speech[0], pause_s=0.5)
        await caller.dial(http, voice="leo")
        await caller.wait_for(lambda: caller.mic.speech_end is not None and caller.loud_since(caller.mic.speech_end))
        first_loud = caller.loud_since(0)[0]
        assert first_loud > caller.mic.speech_end  # never while the caller speaks
        await caller.wait_for(lambda: any(m["type"] == "turn" for m in caller.messages))
        kinds = [m["type"] for m in caller.messages]
        assert "speech_started" in kinds and "speech_stopped" in kinds and "reply_text" in kinds
        turn = next(m for m in caller.messages if m["type"] == "turn")
        assert turn["latency_ms"]["first_frame_queued"] > 0
        await caller.wait_for(lambda: any(m["type"] == "transcript" for m in caller.messages))
        async with http.delete(server.make_url(f"/calls/{caller.call_id}")) as r:
            assert r.status == 200
        async with http.delete(server.make_url(f"/calls/{caller.call_id}")) as r:
            assert r.status == 404 and "error" in await r.json()
        assert (await health(http, server))["active_calls"] == 0
        await caller.pc.close()
        # The call's record: GET /calls/{id}, and first in GET /calls.
        async with http.get(server.make_url(f"/calls/{caller.call_id}")) as r:
            assert r.status == 200
            record = await r.json()
        assert record["transport"] == "webrtc" and record["party"]["address"] == "127.0.0.1"
        assert record["ended_by"] == "server" and record["end_reason"] == "hangup"
        assert record["duration_s"] > 0 and record["audio"] is None  # records.audio is off
        (first,) = record["turns"][:1]
        assert first["reply"] == turn["reply"] and first["latency_ms"] == turn["latency_ms"]
        # The caller's words reached the page and the record (written by the real model).
        transcript = next(m for m in caller.messages if m["type"] == "transcript" and m["turn"] == 1)
        assert first["transcript"] == transcript["text"] and transcript["text"]
        async with http.get(server.make_url("/calls?limit=1")) as r:
            assert [c["id"] for c in (await r.json())["calls"]] == [caller.call_id]


async def test_call_records_answer_bad_and_unknown_requests_with_json_errors(server):
    async with aiohttp.ClientSession() as http:
        for target, status in (("/calls/nosuchcall", 404), ("/calls/..%2F..%2Fetc%2Fpasswd", 404),
                               ("/calls?limit=x", 400), ("/calls?limit=0", 400), ("/calls?limit=99999999", 400)):
            async with http.get(server.make_url(target)) as r:
                assert r.status == status, target
                assert r.content_type == "application/json" and (await r.json())["error"], target
        async with http.get(server.make_url("/calls")) as r:
            assert r.status == 200 and isinstance((await r.json())["calls"], list)


async def test_barge_in_stops_the_agent(server, speech):
    async with aiohttp.ClientSession() as http:
        caller = Caller(str(server.make_url("")))
        caller.mic.say(speech[0], pause_s=0.5)
        await caller.dial(http)
        await caller.wait_for(lambda: caller.mic.speech_end is not None
                              and len(caller.loud_since(caller.mic.speech_end)) >= 10)
        caller.mic.say(speech[1])  # talk over the agent
        await caller.wait_for(lambda: any(m["type"] == "interrupted" for m in caller.messages))
        cut_at = time.monotonic()
        interrupted = next(m for m in caller.messages if m["type"] == "interrupted")
        assert interrupted["turn"] == 1
        # The agent falls silent (network and jitter buffer aside) while the caller talks on.
        await asyncio.sleep(1.0)
        assert caller.mic.speech_end is None or caller.mic.speech_end > cut_at  # still talking
        assert not caller.loud_since(cut_at + 0.4)
        # The second utterance is answered.
        await caller.wait_for(lambda: any(m["type"] == "turn" and m["turn"] == 2 for m in caller.messages))
        await caller.pc.close()


async def test_bad_requests_get_json_errors_and_calls_go_on(server, speech, tiny_settings):
    async with aiohttp.ClientSession() as http:
        caller = Caller(str(server.make_url("")))
        caller.mic.say(speech[0], pause_s=0.5)
        await caller.dial(http)
        url = server.make_url("/offer")
        too_big = "x" * (tiny_settings.server.max_body_kb * 1024 + 10)
        cases = [
            (dict(data=b"{not json"), 400),
            (dict(data=b"\xff\xfe\xfd"), 400),
            (dict(json=[1, 2]), 400),
            (dict(json={"type": "offer"}), 400),
            (dict(json={"sdp": "v=0", "type": "answer"}), 400),
            (dict(json={"sdp": "this is not sdp", "type": "offer"}), 400),
            (dict(json={"sdp": "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "type": "offer"}), 400),
            (dict(json={"sdp": caller.pc.localDescription.sdp, "type": "offer", "voice": "bob"}), 400),
            (dict(data=too_big), 413),
        ]
        for kwargs, status in cases:
            async with http.post(url, **kwargs) as r:
                assert r.status == status, (kwargs.get("json"), await r.text())
                assert "error" in await r.json()
        for method, path, status in [("GET", "/nowhere", 404), ("DELETE", "/calls/nope", 404), ("PUT", "/offer", 405)]:
            async with http.request(method, server.make_url(path)) as r:
                assert r.status == status and "error" in await r.json()
        state = await health(http, server)
        assert state["status"] == "ready" and state["active_calls"] == 1
        # The call in progress is unharmed: it is answered.
        await caller.wait_for(lambda: caller.mic.speech_end is not None and caller.loud_since(caller.mic.speech_end))
        assert caller.pc.connectionState == "connected"
        await caller.pc.close()


async def test_call_limit_answers_503(models, tiny_settings):
    server = await start_server(models, tiny_settings.replace("server", max_calls=1))
    try:
        async with aiohttp.ClientSession() as http:
            first, second = Caller(str(server.make_url(""))), Caller(str(server.make_url("")))
            await first.dial(http)
            await second.pc.setLocalDescription(await second.pc.createOffer())
            body = {"sdp": second.pc.localDescription.sdp, "type": "offer"}
            async with http.post(server.make_url("/offer"), json=body) as r:
                assert r.status == 503 and "busy" in (await r.json())["error"]
            await first.pc.close()
            await second.pc.close()
    finally:
        await server.close()


async def test_a_vanished_peer_is_cleaned_up(server, models, speech):
    async with aiohttp.ClientSession() as http:
        caller = Caller(str(server.make_url("")))
        caller.mic.say(speech[0], pause_s=0.5)
        await caller.dial(http)
        call = server.app[CALLS][caller.call_id]
        await caller.wait_for(lambda: caller.mic.speech_end is not None and caller.loud_since(caller.mic.speech_end))
        await caller.pc.close()  # the tab is closed mid-reply: no DELETE
        await caller.wait_for(lambda: caller.call_id not in server.app[CALLS], timeout=20)
        assert call.session.closed and not call.session.agent_busy
        assert (await health(http, server))["active_calls"] == 0
        await asyncio.sleep(0.3)
        assert not models.tts.active  # its speech generation stopped and was freed


async def test_two_calls_at_once(server, speech):
    async with aiohttp.ClientSession() as http:
        callers = [Caller(str(server.make_url(""))) for _ in range(2)]
        for caller, audio in zip(callers, speech):
            caller.mic.say(audio, pause_s=0.5)
        await asyncio.gather(*(c.dial(http) for c in callers))
        assert (await health(http, server))["active_calls"] == 2
        for caller in callers:
            await caller.wait_for(lambda c=caller: c.mic.speech_end is not None and c.loud_since(c.mic.speech_end),
                                  timeout=60)
        for caller in callers:
            await caller.pc.close()


async def test_metrics_and_the_page(server):
    async with aiohttp.ClientSession() as http:
        async with http.get(server.make_url("/metrics")) as r:
            text = await r.text()
        assert r.status == 200
        for name in ("voice_agent_calls_total", "voice_agent_calls_active", "voice_agent_event_loop_lag_seconds_bucket",
                     "voice_agent_turn_latency_seconds_bucket", "voice_agent_models_ready 1.0"):
            assert name in text, name
        async with http.get(server.make_url("/")) as r:
            page = await r.text()
        assert r.status == 200 and "<html" in page.lower()


async def test_outbound_track_paces_and_survives_barge_in():
    from agent.call.outbound import OutboundAudio

    out = OutboundAudio(480, 100)
    await out.put(np.full(480 * 20, 1000, dtype=np.int16), 1, 0)
    track = SessionAudioTrack(out)
    start = time.monotonic()
    frames = [await track.recv() for _ in range(10)]
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 0.4  # 10 frames of 20 ms, paced (the first is due at once)
    assert [f.pts for f in frames] == [480 * i for i in range(10)]
    out.clear()  # barge-in
    after = await track.recv()
    assert after.pts == 4800 and not after.to_ndarray().any()  # silence, timestamps unbroken
    await asyncio.sleep(0.5)  # the sender paused: the clock restarts, no burst of late frames
    t0 = time.monotonic()
    await track.recv()
    await track.recv()
    assert time.monotonic() - t0 >= 0.015
    track.stop()


async def test_transfer_requests_are_checked_and_browser_calls_refused(server, speech):
    async with aiohttp.ClientSession() as http:
        caller = Caller(str(server.make_url("")))
        await caller.dial(http)
        try:
            for body, status, reason in (({"to": "http://example.com"}, 400, "sip: URI"),
                                         ({"to": "sip:a@b>\r\nX: y"}, 400, "sip: URI"),
                                         ([1], 400, "JSON object"),
                                         ({"to": "sip:person@example.com"}, 409, "only phone calls")):
                async with http.post(server.make_url(f"/calls/{caller.call_id}/transfer"), json=body) as r:
                    assert r.status == status and reason in (await r.json())["error"], body
            async with http.post(server.make_url("/calls/nosuchcall/transfer"), json={"to": "sip:a@b"}) as r:
                assert r.status == 404 and "error" in await r.json()
        finally:
            await caller.close()
