"""`voice-agent serve` against hostile HTTP and one call limit for every transport.

One real server process (tiny profile, server.max_calls = 1, SIP on), reached over
loopback: raw HTTP on a socket for what an HTTP client library will not send, aiohttp for
the rest, a real aiortc peer for WebRTC calls and hand-made SIP over UDP for phone calls.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import aiohttp
import pytest

from signaling.webrtc.loopback import Caller

ROOT = Path(__file__).resolve().parents[2]
WEB_FILES = {p.read_bytes() for p in (ROOT / "web").iterdir() if p.is_file()}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, http_port: int, sip_port: int) -> None:
        self.http_port, self.sip_port = http_port, sip_port
        self.url = f"http://127.0.0.1:{http_port}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    http_port, sip_port = free_port(), free_port(socket.SOCK_DGRAM)
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    env = {**os.environ, "VOICE_AGENT_SERVER__MAX_CALLS": "1"}
    env.pop("VOICE_AGENT_PROFILE", None)
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--profile", "tiny", "--host", "127.0.0.1",
                                 "--port", str(http_port), "--sip-port", str(sip_port)],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the models did not load in 240 s"
            try:
                if health(Server(http_port, sip_port))["status"] == "ready":
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        yield Server(http_port, sip_port)
        assert proc.poll() is None, "the server died: " + log.read_text()[-3000:]
        assert "Traceback" not in log.read_text(), log.read_text()[-5000:]
    finally:
        proc.terminate()
        proc.wait(60)


def raw_http(server: Server, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; (status, headers, body) of the answer."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=timeout) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), answer[:200]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return int(lines[0].split()[1]), headers, body


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, body = out + body[:n], body[n + 2:]
    return out


def get(server: Server, target: str) -> tuple[int, dict[str, str], bytes]:
    return raw_http(server, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1"))


def health(server: Server) -> dict:
    status, headers, body = get(server, "/health")
    assert status == 200
    return json.loads(body)


def post_offer(body: bytes, *headers: str) -> bytes:
    extra = "".join(h + "\r\n" for h in headers)
    return (f"POST /offer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}"
            "Connection: close\r\n\r\n").encode("latin-1") + body


def assert_json_error(status: int, headers: dict[str, str], body: bytes, expect: int | None = None) -> str:
    assert 400 <= status < 500, (status, body[:300])
    assert expect is None or status == expect, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), (headers, body[:300])
    reason = json.loads(body)["error"]
    assert isinstance(reason, str) and reason and "\n" not in reason
    return reason


JSON = "Content-Type: application/json"
HOSTILE = {
    "JSON nested 1,000 deep": (post_offer(b"[" * 1000 + b"]" * 1000, JSON), 400),
    "JSON nested 30,000 deep": (post_offer(b'{"a":' * 6000 + b"1" + b"}" * 6000, JSON), 400),
    "an integer of 5,000 digits": (post_offer(b'{"sdp": ' + b"7" * 5000 + b"}", JSON), 400),
    "gzip-encoded garbage": (post_offer(b"\x1f\x8b\x08\x00garbage, not gzip", JSON, "Content-Encoding: gzip"), 400),
    "gzip cut short": (post_offer(gzip.compress(b'{"sdp": "v=0", "type": "offer"}')[:20], "Content-Encoding: gzip"), 400),
    "deflate garbage": (post_offer(b"not deflate at all", "Content-Encoding: deflate"), 400),
    "a gzip bomb (10 MB of zeros)": (post_offer(gzip.compress(b"0" * 10_000_000), "Content-Encoding: gzip"), 413),
    "a Brotli body": (post_offer(b"\x0b\x02\x80hello\x03", "Content-Encoding: br"), 400),
    "a zstd body": (post_offer(b"(\xb5/\xfd garbage", "Content-Encoding: zstd"), 400),
    "charset=bogus": (post_offer(b'{"type": "offer"}', "Content-Type: application/json; charset=bogus"), 415),
    "charset=rot13 (not a text encoding)": (post_offer(b"{}", "Content-Type: application/json; charset=rot13"), 415),
    "charset=zlib": (post_offer(zlib.compress(b"{}"), "Content-Type: application/json; charset=zlib"), 415),
    "UTF-16 claimed, odd bytes": (post_offer(b'{"a"}', "Content-Type: application/json; charset=utf-16"), 400),
    "not UTF-8": (post_offer(b"\xff\xfe\xfd{", JSON), 400),
    "an unknown method": (b"FROB /offer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
    "a method with a control byte": (b"PO\x01ST /offer HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "not HTTP at all": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03hello\r\n\r\n", 400),
    "HTTP/9.9": (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    "a bad chunk size": (b"POST /offer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    "Content-Length and chunked": (b"POST /offer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "a 20 KB header": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n", 400),
    "a header without a colon": (b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_request_gets_a_json_4xx_and_the_server_goes_on(server, name):
    data, expect = HOSTILE[name]
    assert_json_error(*raw_http(server, data), expect=expect)
    assert health(server)["status"] == "ready"


TRAVERSALS = [
    "/static/../README.md", "/static/%2e%2e/README.md", "/static/%2E%2E%2FREADME.md", "/static/..%2fREADME.md",
    "/static/..%2FREADME.md", "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/static/..%5cREADME.md",
    "/static/..\\README.md", "/static/..\\..\\etc\\passwd", "/static//etc/passwd", "/static/%2fetc%2fpasswd",
    "/static/%252e%252e/README.md", "/static/....//README.md", "/static/./../README.md",
    "/static/index.html/../../README.md", "/static/app.js/..%2f..%2fREADME.md", "/static/..;/README.md",
    "/static/../../../../../../etc/passwd", "/static/%00../README.md", "/static/.%2e/README.md",
    "/static/%c0%ae%c0%ae/README.md", "/static/../signaling/server.py", "/static/..%2f..%2f..%2fetc/hostname",
    "http://x/static/../README.md", "/static/", "/static", "/static/nope.js", "/static/.hidden", "/static/web",
    "/static/index.html?x=../..", "/static/index.html?file=../../README.md", "/static/?x=../README.md",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_static_never_serves_anything_outside_web(server, target):
    status, headers, body = get(server, target)
    if status == 200:
        assert body in WEB_FILES, (target, body[:200])  # a file of web/ (the query string is no path)
    else:
        assert_json_error(status, headers, body, expect=404)


def test_static_serves_the_web_client(server):
    status, headers, body = get(server, "/static/app.js")
    assert status == 200 and body == (ROOT / "web" / "app.js").read_bytes()
    assert "javascript" in headers["content-type"]
    status, headers, body = get(server, "/")
    assert status == 200 and body == (ROOT / "web" / "index.html").read_bytes()


# -- calls ------------------------------------------------------------------------------

pytestmark_async = pytest.mark.asyncio(loop_scope="session")


async def async_health(http: aiohttp.ClientSession, server: Server) -> dict:
    async with http.get(server.url + "/health") as r:
        return await r.json()


async def offer_sdp() -> str:
    caller = Caller("")
    await caller.pc.setLocalDescription(await caller.pc.createOffer())
    sdp = caller.pc.localDescription.sdp
    await caller.pc.close()
    return sdp


def mutations(sdp: str) -> dict[str, str]:
    lines = sdp.split("\r\n")
    out = {
        "without the audio m-line": "\r\n".join(line for line in lines if not line.startswith("m=audio")),
        "without a=mid": "\r\n".join(line for line in lines if not line.startswith("a=mid")),
        "without a=fingerprint": "\r\n".join(line for line in lines if not line.startswith("a=fingerprint")),
        "cut in half": sdp[:len(sdp) // 2],
    }
    rng = random.Random(17)
    for k in range(12):
        data = bytearray(sdp.encode())
        for _ in range(4):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(7)
        out[f"bit flips {k}"] = data.decode("utf-8", "replace")
    return out


@pytestmark_async
async def test_a_failed_offer_frees_its_slot(server):
    """Each bad offer is a 4xx JSON and leaves no call behind; with max_calls = 1 a real
    call still gets in after all of them (a leaked slot would make it 503)."""
    sdp = await offer_sdp()
    async with aiohttp.ClientSession() as http:
        for name, mutated in mutations(sdp).items():
            async with http.post(server.url + "/offer", json={"sdp": mutated, "type": "offer"}) as r:
                text = await r.text()
                assert r.status in (200, 400), (name, r.status, text)
                assert "error" in json.loads(text) if r.status == 400 else "call_id" in json.loads(text), (name, text)
            if r.status == 200:  # flips that left a usable offer: hang up
                async with http.delete(server.url + f"/calls/{json.loads(text)['call_id']}") as r:
                    assert r.status == 200
            state = await async_health(http, server)
            assert state["active_calls"] == 0, (name, state)
            assert state["free_slots"] == 1, (name, state)
        caller = Caller(server.url)
        try:
            await caller.dial(http)
            await caller.wait_for(lambda: caller.pc.connectionState == "connected", timeout=20)
        finally:
            await caller.pc.close()
            if caller.call_id:
                async with http.delete(server.url + f"/calls/{caller.call_id}"):
                    pass


class Phone:
    """A SIP phone on a UDP socket, talking to the server by hand-made requests."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.call_id = uuid.uuid4().hex
        self.to_tag = ""

    def send(self, method: str, cseq: int, body: str = "") -> None:
        to = "<sip:agent@127.0.0.1>" + (f";tag={self.to_tag}" if self.to_tag else "")
        head = (f"{method} sip:agent@127.0.0.1 SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\r\n"
                f"From: <sip:phone@127.0.0.1>;tag=phone1\r\nTo: {to}\r\nCall-ID: {self.call_id}\r\n"
                f"CSeq: {cseq} {method}\r\nMax-Forwards: 70\r\nContact: <sip:phone@127.0.0.1:{self.port}>\r\n")
        if body:
            head += "Content-Type: application/sdp\r\n"
        self.sock.sendto((head + f"Content-Length: {len(body)}\r\n\r\n" + body).encode(),
                         ("127.0.0.1", self.server.sip_port))

    def final_answer(self) -> tuple[int, str]:
        """(status, To tag) of the next final answer (provisional ones skipped)."""
        while True:
            text = self.sock.recv(65536).decode()
            status = int(text.split()[1])
            if status >= 200:
                to = next(line for line in text.split("\r\n") if line.lower().startswith(("to:", "t:")))
                return status, to.partition(";tag=")[2].split(";")[0]

    def invite(self) -> int:
        self.to_tag = ""
        rtp_port = self.rtp.getsockname()[1]
        sdp = (f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
               f"m=audio {rtp_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
        self.send("INVITE", 1, sdp)
        status, self.to_tag = self.final_answer()
        self.send("ACK", 1)  # 2xx or not, the phone confirms it
        return status

    def bye(self) -> int:
        self.send("BYE", 2)
        return self.final_answer()[0]

    def close(self) -> None:
        self.sock.close()
        self.rtp.close()


@pytestmark_async
async def test_one_call_limit_for_webrtc_and_sip(server):
    """max_calls = 1 for the process: a WebRTC call makes an INVITE get 486, a SIP call
    makes an offer get 503, and /health and /metrics count both transports."""
    async with aiohttp.ClientSession() as http:
        caller = Caller(server.url)
        phone = Phone(server)
        try:
            await caller.dial(http)
            assert await asyncio.to_thread(phone.invite) == 486
            state = await async_health(http, server)
            assert state["calls_by_transport"] == {"webrtc": 1, "sip": 0, "media-stream": 0} and state["free_slots"] == 0, state
            async with http.delete(server.url + f"/calls/{caller.call_id}") as r:
                assert r.status == 200
            await caller.pc.close()
            assert (await async_health(http, server))["free_slots"] == 1

            phone.call_id = uuid.uuid4().hex
            assert await asyncio.to_thread(phone.invite) == 200
            state = await async_health(http, server)
            assert state["calls_by_transport"] == {"webrtc": 0, "sip": 1, "media-stream": 0} and state["active_calls"] == 1, state
            async with http.post(server.url + "/offer", json={"sdp": await offer_sdp(), "type": "offer"}) as r:
                assert r.status == 503 and "busy" in (await r.json())["error"]
            async with http.get(server.url + "/metrics") as r:
                text = await r.text()
            assert 'voice_agent_calls_active{transport="sip"} 1.0' in text
            assert 'voice_agent_calls_active{transport="webrtc"} 0.0' in text
            assert "voice_agent_call_slots_free 0.0" in text
            assert 'voice_agent_sip_events_total{event="refused_call_limit"} 1.0' in text  # the 486 above
            assert await asyncio.to_thread(phone.bye) == 200
            state = await async_health(http, server)
            assert state["active_calls"] == 0 and state["free_slots"] == 1, state
        finally:
            await caller.pc.close()
            phone.close()
