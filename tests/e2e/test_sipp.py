"""SIP calls with SIPp, a SIP peer nobody on the project wrote: SIPp calling the agent,
and `voice-agent call` placing calls to a SIPp UAS (talking until SIGTERM, a key press,
the agent hanging up, --max-seconds)."""

import asyncio
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from support import FIXTURES, free_udp_port, start, ulaw_file

from agent.audio import read_audio
from agent.call.factory import SessionFactory
from signaling.sip.client import SipClient, call_out, parse_target

HERE = Path(__file__).parent
session_loop = pytest.mark.asyncio(loop_scope="session")  # the models fixture's loop
DTMF_PCAP = Path("/usr/share/sip-tester/dtmf_2833_1.pcap")  # SIPp's own RFC 4733 recording of key 1
needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="SIPp (Debian package sip-tester) is not installed")


@needs_sipp
@session_loop
async def test_sipp_asks_and_hears_an_answer(models, tiny_settings, tmp_path):
    server = await start(models, tiny_settings)
    try:
        speech = read_audio(FIXTURES / "question1.wav", 8000)
        ulaw = tmp_path / "question.ulaw"
        ulaw_file(ulaw, np.concatenate([np.zeros(4000, np.int16), speech]))
        scenario = tmp_path / "uac.xml"
        scenario.write_text((HERE / "sipp" / "uac_question.xml").read_text()
                            .replace("{ULAW}", str(ulaw)).replace("{LISTEN_MS}", "9000"))
        sipp = await asyncio.create_subprocess_exec(
            "sipp", f"127.0.0.1:{server.port}", "-sf", str(scenario), "-m", "1", "-l", "1", "-nostdin",
            "-i", "127.0.0.1", "-mi", "127.0.0.1", "-p", str(free_udp_port()), "-mp", str(free_udp_port()),
            "-timeout", "60s", "-timeout_error", cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(sipp.communicate(), 90)
        assert sipp.returncode == 0, err.decode()[-2000:]
        (call,) = server.ended
        # The question arrived as RTP; SIPp then sends nothing more, which must count as silence.
        assert call.rtp.received > 100
        turns = call.session.turns
        assert turns and turns[0].agent_start is not None  # ... was answered
        assert call.rtp.loud_sent > 10  # ... and the answer went out as RTP
        assert not server.calls
        # The call's record names the caller as SIPp sent it, and why the call ended.
        (record,) = [r.to_dict() for r in server.sessions.records.recent()]
        assert record["transport"] == "sip-in" and record["ended_by"] == "caller"
        assert record["end_reason"] == "the other side hung up"
        party = record["party"]
        assert party["call_id"] == call.call_id and "sipp" in party["from"] and party["to"]
        assert party["address"].startswith("127.0.0.1:")
        assert record["id"] != call.call_id  # ours, not the peer's
        assert record["turns"][0]["transcript"] and record["turns"][0]["reply"]
    finally:
        await server.close()



def sipp_uas(tmp_path: Path, scenario: str, port: int, listen_ms: int = 0) -> list[str]:
    """The command line of a SIPp UAS on 127.0.0.1:port playing tests/e2e/sipp/<scenario> with
    question 1 as its caller's speech, then silence (RTP goes on, as from a phone: a peer
    that sends nothing for server.media_timeout_s is hung up on)."""
    speech = read_audio(FIXTURES / "question1.wav", 8000)
    ulaw = tmp_path / "question.ulaw"
    ulaw_file(ulaw, np.concatenate([np.zeros(4000, np.int16), speech, np.zeros(60 * 8000, np.int16)]))
    xml = tmp_path / scenario
    xml.write_text((HERE / "sipp" / scenario).read_text().replace("{ULAW}", str(ulaw))
                   .replace("{LISTEN_MS}", str(listen_ms)).replace("{DTMF_PCAP}", str(DTMF_PCAP)))
    return ["sipp", "-sf", str(xml), "-m", "1", "-nostdin", "-i", "127.0.0.1", "-mi", "127.0.0.1",
            "-p", str(port), "-mp", str(free_udp_port()), "-timeout", "60s", "-timeout_error"]


@needs_sipp
@session_loop
async def test_voice_agent_call_talks_with_a_sipp_uas_until_sigterm(tmp_path):
    """The command as a user runs it: SIPp answers and asks; once the agent has answered
    aloud, SIGTERM (as Ctrl-C) makes it hang up, and it exits 0."""
    port = free_udp_port()
    uas = await asyncio.create_subprocess_exec(*sipp_uas(tmp_path, "uas_question_wait_bye.xml", port), cwd=tmp_path,
                                               stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    env = {k: v for k, v in os.environ.items() if k != "VOICE_AGENT_PROFILE"}
    agent = await asyncio.create_subprocess_exec(sys.executable, "-m", "agent.cli", "call", f"sip:callee@127.0.0.1:{port}",
                                                 "--profile", "tiny", env=env, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE)
    lines: list[str] = []
    try:
        async with asyncio.timeout(90):  # model loading, then the question (4 s) and the reply
            while not lines or not re.match(r"turn 1: caller [0-9.]+-", lines[-1]):  # not "caller said"
                line = await agent.stdout.readline()
                assert line, f"the agent stopped early: {lines}"
                lines.append(line.decode().rstrip("\n"))
        # "turn 1" is printed once the reply is queued, not played: let it play before
        # hanging up (an immediate SIGTERM cut some replies at 10 voiced packets).
        await asyncio.sleep(2.0)
        agent.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(agent.communicate(), 20)
        lines += out.decode().splitlines()
        assert agent.returncode == 0, "\n".join(lines) + err.decode()[-3000:]
        _, uas_err = await asyncio.wait_for(uas.communicate(), 20)
        assert uas.returncode == 0, uas_err.decode()[-2000:]  # SIPp got our BYE and answered it
    finally:
        for process in (agent, uas):
            if process.returncode is None:
                process.kill()
    assert lines[0].startswith(f"calling sip:callee@127.0.0.1:{port} at 127.0.0.1:{port} from 127.0.0.1:")
    assert "ringing (180 Ringing)" in lines
    assert any(line.startswith("answered: PCMU, RTP 127.0.0.1:") for line in lines)
    assert any(re.match(r"turn 1: caller [0-9.]+-[0-9.]+ s, agent said: ", line) for line in lines)
    end = re.fullmatch(r"hung up: the agent hung up \(stopped\), after [0-9.]+ s \(RTP: (\d+) packets in, (\d+) "
                       r"voiced packets out\)", lines[-1])
    assert end, lines
    assert int(end.group(1)) > 150 and int(end.group(2)) > 10  # the question came in, a spoken answer went out


@needs_sipp
@pytest.mark.skipif(not DTMF_PCAP.exists(), reason="SIPp's DTMF pcap files are not installed")
@session_loop
async def test_a_sipp_uas_presses_a_key_and_hangs_up(models, tiny_settings, tmp_path):
    port = free_udp_port()
    uas = await asyncio.create_subprocess_exec(*sipp_uas(tmp_path, "uas_question.xml", port, listen_ms=2500),
                                               cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL,
                                               stderr=asyncio.subprocess.PIPE)
    try:
        lines: list[str] = []
        call = await call_out(SessionFactory(models), tiny_settings, *parse_target(f"sip:callee@127.0.0.1:{port}"), "127.0.0.1",
                              say=lines.append)
        _, err = await asyncio.wait_for(uas.communicate(), 20)
        assert uas.returncode == 0, err.decode()[-2000:]  # its BYE got our 200
    finally:
        if uas.returncode is None:
            uas.kill()
    assert call.end_reason == "the other side hung up" and call.dtmf == ["1"]
    assert any(line.startswith("DTMF 1 at ") for line in lines), lines
    assert re.fullmatch(r"hung up: the other side hung up, after 2\.\d s \(RTP: \d+ packets in, .*", lines[-1]), lines
    assert call.rtp.received > 100  # the question, as it played


@needs_sipp
@session_loop
async def test_the_agent_hangs_up_a_call_it_placed(models, tiny_settings, tmp_path):
    port = free_udp_port()
    uas = await asyncio.create_subprocess_exec(*sipp_uas(tmp_path, "uas_question_wait_bye.xml", port), cwd=tmp_path,
                                               stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    client = SipClient(SessionFactory(models), tiny_settings, "127.0.0.1")
    await client.start()
    try:
        progress = []
        call = await client.dial(*parse_target(f"sip:callee@127.0.0.1:{port}"), on_progress=progress.append)
        assert [p.status for p in progress] == [180] and call.answered and call.codec.name == "PCMU"
        async with asyncio.timeout(40):  # the question is heard and answered aloud
            while not (call.session.turns and call.session.turns[0].agent_start is not None
                       and call.rtp.loud_sent > 10):
                await asyncio.sleep(0.1)
        assert await call.hangup() == 200  # SIPp's 200 to our BYE
        assert call.ended and call.end_reason == "the agent hung up" and not client.calls
        assert call.rtp.received > 100
        _, err = await asyncio.wait_for(uas.communicate(), 20)
        assert uas.returncode == 0, err.decode()[-2000:]
    finally:
        if uas.returncode is None:
            uas.kill()
        await client.close()


@needs_sipp
@session_loop
async def test_call_out_hangs_up_at_max_seconds(models, tiny_settings, tmp_path):
    port = free_udp_port()
    uas = await asyncio.create_subprocess_exec(*sipp_uas(tmp_path, "uas_question_wait_bye.xml", port), cwd=tmp_path,
                                               stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        lines: list[str] = []
        call = await call_out(SessionFactory(models), tiny_settings, *parse_target(f"sip:callee@127.0.0.1:{port}"), "127.0.0.1",
                              max_seconds=1.0, say=lines.append)
        assert call.end_reason == "the agent hung up (--max-seconds)"
        assert re.fullmatch(r"hung up: the agent hung up \(--max-seconds\), after 1\.\d s .*", lines[-1]), lines
        _, err = await asyncio.wait_for(uas.communicate(), 20)
        assert uas.returncode == 0, err.decode()[-2000:]  # SIPp got our BYE
    finally:
        if uas.returncode is None:
            uas.kill()




# -- call transfer (REFER) ------------------------------------------------------------------

TRANSFERRED_ENDING = """  <recv request="BYE"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>"""

FAILED_ENDING = """  <pause milliseconds="6000"/>
  <send retrans="500">
    <![CDATA[
      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: "SIPp caller" <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 4 BYE
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200"/>"""


@needs_sipp
@pytest.mark.skipif(not DTMF_PCAP.exists(), reason="SIPp's DTMF pcap files are not installed")
@session_loop
@pytest.mark.parametrize("final", ["200 OK", "486 Busy Here"])
async def test_a_key_press_transfers_the_caller_with_refer(models, tiny_settings, tmp_path, final):
    target = "sip:person@example.com"
    settings = tiny_settings.replace("session", transfer_to=target, transfer_digit="1")
    server = await start(models, settings)
    try:
        ulaw = tmp_path / "silence.ulaw"
        ulaw_file(ulaw, np.zeros(8000 * 20, np.int16))
        done = final.startswith("2")
        scenario = tmp_path / "uac.xml"
        scenario.write_text((HERE / "sipp" / "uac_transfer.xml").read_text()
                            .replace("{ULAW}", str(ulaw)).replace("{DTMF_PCAP}", str(DTMF_PCAP))
                            .replace("{TARGET}", target).replace("{FINAL}", final)
                            .replace("{ENDING_XML}", TRANSFERRED_ENDING if done else FAILED_ENDING))
        sipp = await asyncio.create_subprocess_exec(
            "sipp", f"127.0.0.1:{server.port}", "-sf", str(scenario), "-m", "1", "-l", "1", "-nostdin",
            "-i", "127.0.0.1", "-mi", "127.0.0.1", "-p", str(free_udp_port()), "-mp", str(free_udp_port()),
            "-timeout", "60s", "-timeout_error", cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(sipp.communicate(), 90)
        assert sipp.returncode == 0, err.decode()[-2000:]
        (call,) = server.ended
        assert call.dtmf == ["1"]
        if done:  # the agent hung up once the target answered
            assert call.end_reason == f"the agent transferred the call to {target}"
            assert server.counts["transferred"] == 1
        else:  # it stayed on the line and said so
            assert call.end_reason == "the other side hung up" and server.counts["transfer_failed"] == 1
            (said,) = [t for t in call.session.turns if t.kind == "transfer_failed"]
            assert said.reply_text == settings.session.transfer_failed and said.agent_start is not None
        (record,) = [r for r in server.sessions.records.recent() if r.id == call.session.call_id]
        assert record.ended_by == ("agent" if done else "caller")
    finally:
        await server.close()
