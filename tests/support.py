"""What several test files share: the fixtures folder, and the hand-made SIP phone and
requests of the SIP tests (a peer we control byte by byte, beside the real ones in e2e/)."""

import asyncio
import fractions
import socket
from pathlib import Path

import av
import numpy as np
from aiortc.codecs.g711 import PcmuEncoder

from agent.call.factory import SessionFactory
from signaling.sip.endpoint import SipServer
from signaling.sip.message import parse_message

FIXTURES = Path(__file__).parent / "fixtures"


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


# -- a real `voice-agent serve` process ----------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def serve_process(env: dict[str, str], sip_port: int | None = None):
    """`voice-agent serve --profile tiny` on 127.0.0.1 with these environment settings:
    (the process, its base URL, its SIP port). stderr is piped: read it with communicate()."""
    import os
    import sys

    http_port, sip_port = free_tcp_port(), sip_port or free_udp_port()
    full = {**os.environ, **env}
    full.pop("VOICE_AGENT_PROFILE", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "serve", "--profile", "tiny", "--host", "127.0.0.1",
        "--port", str(http_port), "--sip-port", str(sip_port), cwd=ROOT, env=full,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    return proc, f"http://127.0.0.1:{http_port}", sip_port


async def get_json(url: str):
    """GET url: its JSON (any status)."""
    import json
    import urllib.error
    import urllib.request

    def fetch():
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    return await asyncio.to_thread(fetch)


async def health_until(url: str, test, timeout: float = 120.0) -> dict:
    """Poll url/health until test(state) holds; AssertionError with the last state if not."""
    import time

    deadline, state = time.monotonic() + timeout, None
    while True:
        try:
            state = await get_json(url + "/health")
            if test(state):
                return state
        except OSError:
            pass
        assert time.monotonic() < deadline, f"timed out; last /health: {state}"
        await asyncio.sleep(0.3)


async def kamailio_process(cfg: str, tmp_path: Path):
    """Kamailio in the foreground (-DD -E) on this configuration text; stderr is piped."""
    path = tmp_path / "kamailio.cfg"
    path.write_text(cfg)
    (tmp_path / "run").mkdir()
    proc = await asyncio.create_subprocess_exec(
        "kamailio", "-DD", "-E", "-f", str(path), "-Y", str(tmp_path / "run"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    await asyncio.sleep(1.0)
    assert proc.returncode is None, (await proc.stderr.read()).decode()[-2000:]
    return proc
