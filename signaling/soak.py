"""`voice-agent bench soak`: what each call leaves behind in a server meant to run for weeks.

A real server (`voice-agent serve`, in its own process) answers N calls one after another,
each a caller asking one question and hanging up once the answer is heard. After each call
has ended on the server, the bench reads the server process's resident memory, thread
count and open file descriptors (psutil). The first calls warm the process up (allocator
pools, executor threads, compiled paths); the figures after them, per call, are what a
long-running server would accumulate: the target is 0 threads and under 0.1 MiB per call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np
import psutil

from signaling.sip.phone import LoopbackPhone
from signaling.webrtc.loopback import Caller

TARGET_MIB_PER_CALL = 0.1


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def per_call(values: list[float]) -> float:
    """The least-squares slope of `values` against the call number: growth per call."""
    if len(values) < 2:
        return 0.0
    return float(np.polyfit(np.arange(len(values)), values, 1)[0])


class Server:
    """`voice-agent serve` in a subprocess, on free local ports."""

    def __init__(self, cli_args: list[str]) -> None:
        self.http_port, self.sip_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.args = [sys.executable, "-m", "agent.cli", "serve", *cli_args, "--host", "127.0.0.1",
                     "--port", str(self.http_port), "--sip-port", str(self.sip_port)]
        self.process: asyncio.subprocess.Process | None = None
        self.log = tempfile.TemporaryFile()  # the server's log: read only to explain a failure

    def last_log_line(self) -> str:
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    async def start(self, http: aiohttp.ClientSession, timeout: float = 300.0) -> None:
        self.process = await asyncio.create_subprocess_exec(*self.args, stdout=asyncio.subprocess.DEVNULL,
                                                            stderr=self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}: {self.last_log_line()}")
            try:
                if (await self.health(http)).get("status") == "ready":
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
        raise RuntimeError(f"the server was not ready within {timeout:.0f} s")

    async def health(self, http: aiohttp.ClientSession) -> dict:
        async with http.get(self.base + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
            return await r.json()

    def sample(self) -> dict:
        assert self.process is not None  # start() ran
        p = psutil.Process(self.process.pid)
        return {"rss_mib": round(p.memory_info().rss / 2**20, 2), "threads": p.num_threads(),
                "fds": p.num_fds()}

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self.log.close()


async def _reply_heard(loud_since, speech_end, timeout: float = 60.0) -> None:
    """Wait for the caller's question to be over and the agent's answer to start, then end."""
    deadline = time.monotonic() + timeout
    while not (speech_end() and loud_since(speech_end())):
        if time.monotonic() > deadline:
            raise RuntimeError("no answer was heard")
        await asyncio.sleep(0.05)
    while loud_since(time.monotonic() - 1.0):  # the answer goes on
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)


async def webrtc_call(server: Server, http: aiohttp.ClientSession, question_16k: np.ndarray) -> None:
    caller = Caller(server.base)
    try:
        await caller.dial(http)
        caller.mic.say(question_16k, pause_s=0.5)
        await _reply_heard(caller.loud_since, lambda: caller.mic.speech_end)
    finally:
        await caller.close()


async def sip_call(server: Server, number: int, question_8k: np.ndarray) -> None:
    phone = LoopbackPhone("127.0.0.1", server.sip_port, call_id=f"soak-{number}-{os.getpid()}")
    try:
        await phone.dial()
        phone.say(question_8k)
        await _reply_heard(phone.loud_since, lambda: phone.speech_end)
    finally:
        await phone.hang_up()


async def bench_soak(cli_args: list[str], transport: str, calls: int, warmup: int,
                     question_16k: np.ndarray, question_8k: np.ndarray,
                     progress: Callable[[dict], None] | None = None) -> dict:
    """Run `calls` calls through a fresh server started with `cli_args` and report what
    stays behind per call after the first `warmup`."""
    logging.getLogger("aioice").setLevel(logging.WARNING)  # the callers' ICE steps, every call
    server = Server(cli_args)
    samples: list[dict] = []
    async with aiohttp.ClientSession() as http:
        try:
            await server.start(http)
            samples.append({"call": 0, **server.sample()})
            for n in range(1, calls + 1):
                if transport == "webrtc":
                    await webrtc_call(server, http, question_16k)
                else:
                    await sip_call(server, n, question_8k)
                deadline = time.monotonic() + 30
                while (await server.health(http))["active_calls"] and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)  # let the call's last callbacks run
                samples.append({"call": n, **server.sample()})
                if progress:
                    progress(samples[-1])
        finally:
            await server.stop()
    after = samples[warmup:]
    result: dict[str, Any] = {
        "transport": transport, "calls": calls, "warmup_calls": warmup,
        "after_warmup": {
            "rss_mib_per_call": round(per_call([s["rss_mib"] for s in after]), 4),
            "threads_per_call": round(per_call([s["threads"] for s in after]), 4),
            "fds_per_call": round(per_call([s["fds"] for s in after]), 4),
            "rss_mib_growth": round(after[-1]["rss_mib"] - after[0]["rss_mib"], 2),
            "threads_growth": after[-1]["threads"] - after[0]["threads"],
            "fds_growth": after[-1]["fds"] - after[0]["fds"],
        },
        "start": samples[0], "end": samples[-1],
        "samples": samples,
    }
    a = result["after_warmup"]
    result["meets_target"] = a["threads_growth"] <= 0 and a["rss_mib_per_call"] < TARGET_MIB_PER_CALL
    return result
