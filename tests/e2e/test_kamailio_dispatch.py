"""deploy/kamailio/dispatcher.cfg as shipped, in front of two `voice-agent serve` nodes:
SIPp callers through Kamailio are spread over both by load, a full node's refusal goes
on to the other, a node killed mid-test stops getting calls while the other's go on, and
every call placed is answered by exactly one node."""

import asyncio
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from support import FIXTURES, free_udp_port, get_json, health_until, kamailio_process, serve_process, ulaw_file

from agent.audio import read_audio

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
needs_peers = pytest.mark.skipif(shutil.which("kamailio") is None or shutil.which("sipp") is None,
                                 reason="Kamailio (Debian package kamailio) and SIPp (sip-tester) are needed")


async def start_dispatcher(tmp_path: Path, port: int, nodes: list[int]):
    listing = tmp_path / "dispatcher.list"
    listing.write_text("".join(f"1 sip:127.0.0.1:{p} 0 0 duid=node{i};maxload=2\n" for i, p in enumerate(nodes)))
    cfg = ((ROOT / "deploy" / "kamailio" / "dispatcher.cfg").read_text()
           .replace("!LISTEN!udp:127.0.0.1:5060!", f"!LISTEN!udp:127.0.0.1:{port}!")
           .replace("!DISPATCHER_LIST!/etc/kamailio/dispatcher.list!", f"!DISPATCHER_LIST!{listing}!"))
    return await kamailio_process(cfg, tmp_path)


async def callers(tmp_path: Path, kport: int, calls: int, at_once: int, listen_ms: int = 6000):
    """SIPp placing `calls` calls through the dispatcher, `at_once` at a time; its exit
    status and stderr."""
    ulaw = tmp_path / "q.ulaw"
    if not ulaw.exists():
        ulaw_file(ulaw, np.concatenate([np.zeros(4000, np.int16), read_audio(FIXTURES / "question1.wav", 8000)]))
    scenario = tmp_path / f"uac{listen_ms}.xml"
    scenario.write_text((HERE / "sipp" / "uac_question_routed.xml").read_text()
                        .replace("{ULAW}", str(ulaw)).replace("{LISTEN_MS}", str(listen_ms)))
    sipp = await asyncio.create_subprocess_exec(
        "sipp", f"127.0.0.1:{kport}", "-sf", str(scenario), "-m", str(calls), "-l", str(at_once), "-r", str(at_once),
        "-nostdin", "-i", "127.0.0.1", "-mi", "127.0.0.1", "-p", str(free_udp_port()), "-mp", str(free_udp_port()),
        "-timeout", "120s", "-timeout_error", "-trace_err", "-error_file", str(tmp_path / f"errors{listen_ms}.log"),
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(sipp.communicate(), 180)
    errors = tmp_path / f"errors{listen_ms}.log"
    return sipp.returncode, err.decode() + (errors.read_text()[-3000:] if errors.exists() else "")


async def call_ids(url: str, at_least: int = 0, timeout: float = 15.0) -> list[str]:
    """The SIP Call-IDs of a node's call records (waiting for `at_least`: a record is kept
    once its call's session has closed, a moment after the BYE was answered)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        ids = [c["party"]["call_id"] for c in (await get_json(url + "/calls?limit=100"))["calls"]]
        if len(ids) >= at_least or asyncio.get_running_loop().time() > deadline:
            return ids
        await asyncio.sleep(0.3)


@needs_peers
async def test_calls_spread_fail_over_and_survive_a_killed_node(tmp_path):
    kport = free_udp_port()
    node_ports = [free_udp_port(), free_udp_port()]
    kamailio = await start_dispatcher(tmp_path, kport, node_ports)
    nodes = [await serve_process({"VOICE_AGENT_SERVER__MAX_CALLS": "2"}, sip_port=p) for p in node_ports]
    try:
        for _, url, _ in nodes:
            await health_until(url, lambda s: s["status"] == "ready", timeout=240)
        await asyncio.sleep(3.0)  # the dispatcher's OPTIONS probes (every 2 s) find both up
        # Four callers at once: two slots a node, so both nodes must take calls.
        code, err = await callers(tmp_path, kport, calls=4, at_once=4)
        if code != 0:
            kamailio.send_signal(signal.SIGTERM)
            _, klog = await kamailio.communicate()
            raise AssertionError(err[-1500:] + "\n".join(line for line in klog.decode().splitlines()
                                                          if "<script>" in line or "ERROR" in line)[-3000:])
        first = [await call_ids(url, at_least=2) for _, url, _ in nodes]
        assert [len(ids) for ids in first] == [2, 2], first
        assert not set(first[0]) & set(first[1])  # no call answered twice
        # Node 0 dies (no BYE, no goodbye); the calls placed next all land on node 1.
        nodes[0][0].send_signal(signal.SIGKILL)
        await nodes[0][0].wait()
        code, err = await callers(tmp_path, kport, calls=2, at_once=1, listen_ms=3000)
        assert code == 0, err[-3000:]
        after = await call_ids(nodes[1][1], at_least=4)
        assert len(after) == 4 and set(first[1]) <= set(after)
    finally:
        for proc, _, _ in nodes:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.communicate(), 60)
        kamailio.send_signal(signal.SIGTERM)
        _, kamailio_err = await asyncio.wait_for(kamailio.communicate(), 30)
    log = kamailio_err.decode()
    assert log.count("call ") >= 6, log[-3000:]
