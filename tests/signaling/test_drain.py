"""Readiness and draining of a real `voice-agent serve` process: GET /ready and SIP OPTIONS
say 503 while it loads, while every slot is taken and once it drains; on SIGTERM it takes
no new call but lets the one in progress finish, then exits 0; after server.drain_s it
ends the rest itself. /health stays 200 (liveness) throughout."""

import asyncio
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import aiohttp
from support import free_udp_port, offer, request

from signaling.sip.message import parse_message
from signaling.webrtc.loopback import Caller

ROOT = Path(__file__).resolve().parents[2]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """A `serve --profile tiny` subprocess with HTTP and SIP."""

    def __init__(self, proc, http_port: int, sip_port: int) -> None:
        self.proc, self.http_port, self.sip_port = proc, http_port, sip_port
        self.url = f"http://127.0.0.1:{http_port}"

    @classmethod
    async def start(cls, **settings) -> "Node":
        http_port, sip_port = free_tcp_port(), free_udp_port()
        env = {**os.environ, **{f"VOICE_AGENT_SERVER__{k.upper()}": str(v) for k, v in settings.items()}}
        env.pop("VOICE_AGENT_PROFILE", None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "serve", "--profile", "tiny", "--host", "127.0.0.1",
            "--port", str(http_port), "--sip-port", str(sip_port), cwd=ROOT, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        return cls(proc, http_port, sip_port)

    async def get(self, http, path: str) -> tuple[int, dict]:
        async with http.get(self.url + path) as r:
            return r.status, await r.json()

    async def until_ready(self, http, timeout: float = 240) -> dict:
        deadline, seen_loading = time.monotonic() + timeout, False
        while True:
            try:
                status, body = await self.get(http, "/ready")
                if status == 200:
                    return {"body": body, "seen_loading": seen_loading}
                seen_loading = seen_loading or "loading" in body["reason"]
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "not ready in time"
            await asyncio.sleep(0.2)

    async def sip(self, method: str, body: str = "") -> int:
        """A request from a fresh UDP socket; the status of the first final answer."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        try:
            port = sock.getsockname()[1]
            text = request(method, port, uuid.uuid4().hex, 1, uuid.uuid4().hex[:8], body=body)
            await loop.sock_sendto(sock, text.replace("\n", "\r\n").encode(), ("127.0.0.1", self.sip_port))
            while True:
                data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
                status = parse_message(data).status
                if status is not None and status >= 200:
                    return status
        finally:
            sock.close()

    async def wait_exit(self, timeout: float) -> tuple[int, str]:
        _, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        return self.proc.returncode, err.decode()


async def test_ready_follows_loading_and_free_slots(speech):
    node = await Node.start(max_calls=1)
    try:
        async with aiohttp.ClientSession() as http:
            state = await node.until_ready(http)
            body = state["body"]
            assert body["ready"] and body["free_slots"] == 1
            assert body["engine_free_slots"]["speech"] > 0 and body["engine_free_slots"]["reply"] > 0
            assert await node.sip("OPTIONS") == 200
            caller = Caller(node.url)  # the one slot taken
            caller.mic.say(speech[0])
            await caller.dial(http)
            await caller.wait_for(lambda: caller.pc.connectionState == "connected", 30)
            status, body = await node.get(http, "/ready")
            assert status == 503 and "busy" in body["reason"] and body["free_slots"] == 0
            assert await node.sip("OPTIONS") == 503  # a dispatcher's probe takes the node out
            async with http.get(node.url + "/metrics") as r:
                assert "voice_agent_ready 0.0" in await r.text()
            await caller.close()
            deadline = time.monotonic() + 10
            while (await node.get(http, "/ready"))[0] != 200:
                assert time.monotonic() < deadline, "the slot did not come back"
                await asyncio.sleep(0.2)
            assert await node.sip("OPTIONS") == 200  # ... and puts it back
    finally:
        node.proc.send_signal(signal.SIGTERM)
        code, err = await node.wait_exit(60)
    assert code == 0, err[-3000:]
    assert state["seen_loading"] or "models ready" in err  # it answered 503 while loading, if asked in time


async def test_sigterm_drains_the_call_in_progress_then_exits_0(speech):
    node = await Node.start(drain_s=60)
    async with aiohttp.ClientSession() as http:
        await node.until_ready(http)
        caller = Caller(node.url)
        caller.mic.say(speech[0], pause_s=0.5)
        await caller.dial(http)
        await caller.wait_for(lambda: any(m["type"] == "speech_started" for m in caller.messages), 60)
        node.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        # Draining: alive, not ready; nothing new is taken; the call goes on.
        status, health = await node.get(http, "/health")
        assert status == 200 and health["active_calls"] == 1
        status, body = await node.get(http, "/ready")
        assert status == 503 and "shutting down" in body["reason"]
        newcomer = Caller(node.url)
        try:
            await newcomer.dial(http)
            raise AssertionError("a call was taken while draining")
        except RuntimeError as e:
            assert "HTTP 503" in str(e) and "shutting down" in str(e)
        finally:
            await newcomer.pc.close()
        assert await node.sip("OPTIONS") == 503
        assert await node.sip("INVITE", body=offer(free_udp_port())) == 503
        await caller.wait_for(lambda: any(m["type"] == "turn" for m in caller.messages), 90)  # answered meanwhile
        assert node.proc.returncode is None
        async with http.delete(f"{node.url}/calls/{caller.call_id}") as r:  # the call ends: the node goes
            assert r.status == 200
        await caller.close()
        started = time.monotonic()
        code, err = await node.wait_exit(30)
    assert code == 0, err[-3000:]
    assert time.monotonic() - started < 10  # it left once the call ended, not at drain_s
    assert "draining: 1 calls in progress" in err


async def test_the_calls_left_at_drain_s_are_ended(speech):
    node = await Node.start(drain_s=2)
    async with aiohttp.ClientSession() as http:
        await node.until_ready(http)
        caller = Caller(node.url)
        await caller.dial(http)
        await caller.wait_for(lambda: caller.pc.connectionState == "connected", 30)
        node.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code, err = await node.wait_exit(60)
        await caller.close()
    assert code == 0, err[-3000:]
    assert 1.5 < time.monotonic() - started < 30
    assert "ending the 1 calls left" in err
    assert f"call {caller.call_id}: closed (shutdown)" in err
