"""Provider media streams at GET /media-stream (signaling/mediastream.py), against a client
written here from Twilio's published Media Streams message format:

- provider -> agent: `connected` {protocol, version}; `start` {streamSid, start: {accountSid,
  callSid, streamSid, tracks, customParameters, mediaFormat: {encoding "audio/x-mulaw",
  sampleRate 8000, channels 1}}}; `media` {media: {track "inbound", chunk, timestamp (ms, a
  string), payload: base64 mu-law, no header}} every 20 ms; `mark` {mark: {name}} once the
  audio sent before that mark has been played (or dropped by a clear); `dtmf` {dtmf: {digit}};
  `stop`. Every message but `connected` has sequenceNumber and streamSid.
- agent -> provider: `media` {streamSid, media: {payload}}, `mark` {streamSid, mark: {name}},
  `clear` {streamSid}: drop every buffered sample and return the pending marks.

The client plays what it gets in real time (a 20 ms message takes 20 ms), echoes each mark
when the audio before it is played, and on `clear` drops its buffer and echoes the pending
marks at once, as the format says a provider does. mu-law is G.711's, written out below.
"""

import asyncio
import base64
import json
import time

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from agent.audio import read_audio
from agent.call.factory import SessionFactory
from signaling.server import CALLS, SLOTS, create_app

session_loop = pytest.mark.asyncio(loop_scope="session")  # the models fixture's loop
FRAME = 160  # 20 ms at 8 kHz
LOUD = 500


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """G.711 mu-law (bias 0x84, clip 32635)."""
    x = pcm.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    x = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.floor(np.log2(x)).astype(np.int32) - 7
    mantissa = (x >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def ulaw_decode(data: bytes) -> np.ndarray:
    u = ~np.frombuffer(data, np.uint8).astype(np.int32) & 0xFF
    exponent, mantissa = (u >> 4) & 0x07, u & 0x0F
    x = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -x, x).astype(np.int16)


def test_the_test_clients_mu_law_is_g711s():
    tone = (np.sin(np.arange(800) / 5) * 12000).astype(np.int16)
    back = ulaw_decode(ulaw_encode(tone))
    assert np.abs(back.astype(int) - tone).max() < 12000 / 16  # mu-law's step at that level
    assert ulaw_encode(np.array([0], np.int16)) == b"\xff"  # G.711's code for zero


class Provider:
    """One media stream as a provider opens it (see the module's docstring)."""

    def __init__(self, ws, sid: str) -> None:
        self.ws, self.sid = ws, sid
        self.seq = 0
        self.got: list[dict] = []  # every message from the agent
        self.heard: list[tuple[float, int]] = []  # (when played, peak) of each agent media message
        self.clears: list[float] = []
        self.echoed: list[str] = []
        self.closed_with: tuple[int | None, str] | None = None
        self._buffer: list = []  # ("audio", samples) and ("mark", name), in order
        self._reader = asyncio.ensure_future(self._read())
        self._player = asyncio.ensure_future(self._play())

    async def send(self, event: str, **fields) -> None:
        self.seq += 1
        message = {"event": event, **fields}
        if event != "connected":
            message.update(sequenceNumber=str(self.seq), streamSid=self.sid)
        await self.ws.send_str(json.dumps(message))

    async def start(self, call_sid="CA0001", custom=None) -> None:
        await self.send("connected", protocol="Call", version="1.0.0")
        await self.send("start", start={"accountSid": "AC0001", "callSid": call_sid, "streamSid": self.sid,
                                        "tracks": ["inbound"], "customParameters": custom or {},
                                        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                                        "channels": 1}})

    async def say(self, pcm_8k: np.ndarray) -> None:
        """The caller's audio, 20 ms a message in real time."""
        start = time.monotonic()
        for i in range(0, len(pcm_8k) - FRAME + 1, FRAME):
            payload = base64.b64encode(ulaw_encode(pcm_8k[i:i + FRAME])).decode()
            await self.send("media", media={"track": "inbound", "chunk": str(i // FRAME + 1),
                                            "timestamp": str(i // 8), "payload": payload})
            await asyncio.sleep(max(0.0, start + (i // FRAME + 1) * 0.02 - time.monotonic()))

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            self.got.append(data)
            assert data["streamSid"] == self.sid
            if data["event"] == "media":
                self._buffer.append(("audio", ulaw_decode(base64.b64decode(data["media"]["payload"]))))
            elif data["event"] == "mark":
                self._buffer.append(("mark", data["mark"]["name"]))
            elif data["event"] == "clear":
                self.clears.append(time.monotonic())
                marks = [item for kind, item in self._buffer if kind == "mark"]
                self._buffer.clear()
                for name in marks:  # the pending marks come back at once
                    await self._echo(name)
        self.closed_with = (self.ws.close_code, getattr(self.ws, "_close_message", ""))

    async def _play(self) -> None:
        while True:
            if self._buffer and self._buffer[0][0] == "mark":
                await self._echo(self._buffer.pop(0)[1])
                continue
            if self._buffer:
                samples = self._buffer.pop(0)[1]
                self.heard.append((time.monotonic(), int(np.abs(samples).max())))
            await asyncio.sleep(0.02)

    async def _echo(self, name: str) -> None:
        self.echoed.append(name)
        if not self.ws.closed:
            await self.send("mark", mark={"name": name})

    def loud_since(self, t: float) -> list[float]:
        return [when for when, peak in self.heard if when >= t and peak > LOUD]

    async def close(self) -> None:
        self._player.cancel()
        await self.ws.close()
        await asyncio.gather(self._reader, self._player, return_exceptions=True)


@pytest.fixture(scope="module")
async def server(models, tiny_settings):
    settings = tiny_settings.replace("server", connect_timeout_s=1.0)
    server = TestServer(create_app(SessionFactory(models), settings), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture(scope="module")
def question():
    from support import FIXTURES
    return read_audio(FIXTURES / "question1.wav", 8000)


async def until(test, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not test():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@session_loop
async def test_a_provider_stream_is_answered_aloud_with_marks_echoed(server, question):
    async with aiohttp.ClientSession() as http:
        provider = Provider(await http.ws_connect(server.make_url("/media-stream")), "MZ1")
        await provider.start(custom={"caller": "+15550100"})
        await provider.say(np.concatenate([np.zeros(4000, np.int16), question]))
        spoke_until = time.monotonic()
        silence = asyncio.ensure_future(provider.say(np.zeros(8000 * 30, np.int16)))  # the line stays open
        await until(lambda: len(provider.loud_since(spoke_until)) > 10)
        (call,) = [c for c in server.app[CALLS].values() if c.stream_sid == "MZ1"]
        await until(lambda: call.session.turns and call.session.turns[0].played_text is not None)
        turn = call.session.turns[0]
        assert turn.agent_start is not None and not turn.interrupted and turn.error is None
        assert call.session.echo is not None  # a phone line: the echo guard is on
        # Every media message came with a mark, and the played ones came back.
        kinds = [m["event"] for m in provider.got]
        assert kinds.count("media") == kinds.count("mark") and kinds[:2] == ["media", "mark"]
        assert provider.echoed and call.marks_played >= len(provider.echoed) - 1
        # Never more than AHEAD_S (200 ms: 10 messages) sent and not played.
        assert call.marks_sent - call.marks_played <= 10
        silence.cancel()
        await provider.send("stop", stop={"accountSid": "AC0001", "callSid": "CA0001"})
        await until(lambda: provider.closed_with is not None, 10)
        await provider.close()
    record = next(r for r in call.sessions.records.recent() if r.id == call.id).to_dict()
    assert record["transport"] == "media-stream" and record["ended_by"] == "caller"
    assert record["party"]["call_sid"] == "CA0001" and record["party"]["custom"] == {"caller": "+15550100"}
    assert record["turns"][0]["reply"] and not server.app[CALLS]


@session_loop
async def test_a_barge_in_clears_what_the_provider_holds(models, tiny_settings, question):
    # No echo comes back from this client, and the tiny profile's agent speaks loud noise:
    # the echo guard, strict until it has heard the line's echo, would take a while to let
    # the caller in. The guard's own barge-in rules are tested in tests/call/test_echo.py;
    # here the stream's part: the clear, and the agent stopping.
    server = TestServer(create_app(SessionFactory(models), tiny_settings.replace("echo", guard="off")),
                        host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            provider = Provider(await http.ws_connect(server.make_url("/media-stream")), "MZ2")
            await provider.start()
            await provider.say(np.concatenate([np.zeros(4000, np.int16), question]))
            spoke_until = time.monotonic()
            gap = asyncio.ensure_future(provider.say(np.zeros(8000 * 30, np.int16)))
            await until(lambda: len(provider.loud_since(spoke_until)) > 5)
            gap.cancel()
            await provider.say(question)  # talks over the agent
            finished = time.monotonic()
            assert provider.clears, "no clear at the barge-in"
            cleared = provider.clears[0]
            # After the clear the agent is silent while the caller goes on (at most what it
            # had in flight plays on); then it answers them.
            assert finished - cleared > 1.0
            assert len([t for t in provider.loud_since(cleared + 0.3) if t < finished]) <= 3
            (call,) = [c for c in server.app[CALLS].values() if c.stream_sid == "MZ2"]
            assert call.session.turns[0].interrupted and call.clears == 1
            await provider.close()
    finally:
        await server.close()


@session_loop
async def test_bad_streams_are_closed_with_a_reason_and_others_go_on(server, question):
    async with aiohttp.ClientSession() as http:
        good = Provider(await http.ws_connect(server.make_url("/media-stream")), "MZ3")
        await good.start()
        talking = asyncio.ensure_future(good.say(np.zeros(8000 * 5, np.int16)))
        cases = {
            "not json": ("{not json", 1007, "not JSON"),
            "no start": (None, 1008, "no start message in 1 s"),
            "media first": (json.dumps({"event": "media", "media": {"payload": ""}}), 1007, "expected a start"),
            "a-law": (json.dumps({"event": "start", "streamSid": "x", "start": {"mediaFormat": {
                "encoding": "audio/x-alaw", "sampleRate": 8000, "channels": 1}}}), 1007, "only audio/x-mulaw"),
        }
        for name, (text, code, reason) in cases.items():
            ws = await http.ws_connect(server.make_url("/media-stream"))
            if text is not None:
                await ws.send_str(text)
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.type == aiohttp.WSMsgType.CLOSE, name
            assert ws.close_code == code and reason in msg.extra, (name, msg.extra)
        # A started stream that sends garbage is closed; the good one is still up.
        bad = Provider(await http.ws_connect(server.make_url("/media-stream")), "MZ4")
        await bad.start()
        await bad.send("media", media={"payload": "not base64!"})
        await until(lambda: bad.closed_with is not None, 5)
        assert bad.closed_with[0] == 1007
        assert not talking.done() and not good.ws.closed
        talking.cancel()
        await good.close()
        await bad.close()
        # Not a WebSocket: a JSON 400.
        async with http.get(server.make_url("/media-stream")) as r:
            assert r.status == 400 and "WebSocket" in (await r.json())["error"]
    try:
        await until(lambda: not server.app[CALLS], 10)
    except AssertionError:
        raise AssertionError([(c.stream_sid, c.end_reason, c._closed) for c in server.app[CALLS].values()]) from None
    assert server.app[SLOTS].count() == 0
