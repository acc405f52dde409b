"""The agent behind Kamailio (Debian's kamailio), as behind a PBX: Kamailio is the registrar
with digest authentication (its own digest code checks the agent's answers) and the proxy
calls go through both ways (tests/e2e/kamailio/registrar.cfg, started here in the
foreground). A SIPp caller reaches the agent by its registered account, and the agent's
own call out through the proxy answers the proxy's 407."""

import asyncio
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from support import FIXTURES, ROOT, free_udp_port, get_json, health_until, kamailio_process, serve_process, ulaw_file

from agent.audio import read_audio

HERE = Path(__file__).parent
needs_peers = pytest.mark.skipif(shutil.which("kamailio") is None or shutil.which("sipp") is None,
                                 reason="Kamailio (Debian package kamailio) and SIPp (sip-tester) are needed")
REALM, USER, PASSWORD = "pbx.test", "agent", "s3cret"


async def start_kamailio(tmp_path: Path, port: int, callee: str):
    return await kamailio_process((HERE / "kamailio" / "registrar.cfg").read_text().replace("{USER}", USER)
                                  .replace("{PASSWORD}", PASSWORD).replace("{REALM}", REALM)
                                  .replace("{PORT}", str(port)).replace("{CALLEE}", callee), tmp_path)


async def stop(proc) -> str:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
    return err.decode()


def question_ulaw(path: Path, tail_s: float = 0.0) -> Path:
    speech = read_audio(FIXTURES / "question1.wav", 8000)
    ulaw_file(path, np.concatenate([np.zeros(4000, np.int16), speech, np.zeros(int(8000 * tail_s), np.int16)]))
    return path


@needs_peers
async def test_a_caller_reaches_the_agent_registered_at_kamailio(tmp_path):
    kport = free_udp_port()
    kamailio = await start_kamailio(tmp_path, kport, "127.0.0.1:9")  # no outbound call in this test
    serve, url, _ = await serve_process({"VOICE_AGENT_SIP__REGISTER": f"sip:{USER}@127.0.0.1:{kport}",
                                         "VOICE_AGENT_SIP__USERNAME": USER, "VOICE_AGENT_SIP__PASSWORD": PASSWORD})
    try:
        await health_until(url, lambda s: s["status"] == "ready"
                           and (s.get("sip_registration") or {}).get("state") == "registered")
        scenario = tmp_path / "uac.xml"
        scenario.write_text((HERE / "sipp" / "uac_question_routed.xml").read_text()
                            .replace("{ULAW}", str(question_ulaw(tmp_path / "q.ulaw")))
                            .replace("{LISTEN_MS}", "12000"))
        sipp = await asyncio.create_subprocess_exec(
            "sipp", f"127.0.0.1:{kport}", "-sf", str(scenario), "-m", "1", "-l", "1", "-nostdin",
            "-i", "127.0.0.1", "-mi", "127.0.0.1", "-p", str(free_udp_port()), "-mp", str(free_udp_port()),
            "-timeout", "60s", "-timeout_error", cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(sipp.communicate(), 90)
        assert sipp.returncode == 0, err.decode()[-2000:]  # answered, and its BYE (through Kamailio) got a 200
        (record,) = (await get_json(url + "/calls"))["calls"]
        assert record["transport"] == "sip-in" and record["ended_by"] == "caller"
        assert record["party"]["address"] == f"127.0.0.1:{kport}"  # it came through the proxy
        assert any(t["reply"] and t["agent_start"] is not None for t in record["turns"]), record["turns"]
    finally:
        serve_log = await stop(serve)
        kamailio_log = await stop(kamailio)
    assert serve.returncode == 0, serve_log[-3000:]
    assert "REGISTER from" in kamailio_log and "challenged" in kamailio_log  # digest-checked by Kamailio
    assert "to the registered contact" in kamailio_log
    assert PASSWORD not in serve_log


@needs_peers
async def test_the_agents_call_out_answers_the_proxys_407(tmp_path):
    kport, uas_port = free_udp_port(), free_udp_port()
    kamailio = await start_kamailio(tmp_path, kport, f"127.0.0.1:{uas_port}")
    xml = tmp_path / "uas.xml"
    xml.write_text((HERE / "sipp" / "uas_question.xml").read_text()
                   .replace("{ULAW}", str(question_ulaw(tmp_path / "q.ulaw", tail_s=30)))
                   .replace("{LISTEN_MS}", "3000").replace("{DTMF_PCAP}", "/usr/share/sip-tester/dtmf_2833_1.pcap"))
    uas = await asyncio.create_subprocess_exec(
        "sipp", "-sf", str(xml), "-m", "1", "-nostdin", "-i", "127.0.0.1", "-mi", "127.0.0.1", "-p", str(uas_port),
        "-mp", str(free_udp_port()), "-timeout", "60s", "-timeout_error", cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    import os
    import sys

    env = {**os.environ, "VOICE_AGENT_SIP__USERNAME": USER, "VOICE_AGENT_SIP__PASSWORD": PASSWORD}
    env.pop("VOICE_AGENT_PROFILE", None)
    try:
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "call", f"sip:callee@127.0.0.1:{kport}", "--profile", "tiny",
            "--local-host", "127.0.0.1", cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(agent.communicate(), 120)
        _, uas_err = await asyncio.wait_for(uas.communicate(), 30)
    finally:
        if uas.returncode is None:
            uas.kill()
        kamailio_log = await stop(kamailio)
    lines = out.decode().splitlines()
    assert agent.returncode == 0, (lines, err.decode()[-3000:])
    assert uas.returncode == 0, "\n".join(lines) + uas_err.decode()[-1500:]
    assert any(line.startswith("answered: PCMU") for line in lines), lines
    assert lines[-1].startswith("hung up: the other side hung up"), lines
    assert "INVITE from sip:agent@" in kamailio_log and "challenged" in kamailio_log
    assert PASSWORD not in out.decode() + err.decode()
