"""`serve` with sip.register against SIPp as a registrar with digest authentication: it
registers, refreshes before the granted expiry, shows the state in /health and /metrics,
and removes the binding at shutdown; a registrar that never answers holds up nothing."""

import asyncio
import shutil
import signal
import urllib.request
from pathlib import Path

import pytest
from support import free_udp_port, health_until, serve_process

SIPP = Path(__file__).parent / "sipp"
ROOT = Path(__file__).parents[2]
needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="SIPp (Debian package sip-tester) is not installed")


async def start_serve(register: str, password: str = "s3cret"):
    proc, url, _ = await serve_process({"VOICE_AGENT_SIP__REGISTER": register, "VOICE_AGENT_SIP__USERNAME": "alice",
                                        "VOICE_AGENT_SIP__PASSWORD": password})
    return proc, url


def metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        return r.read().decode()


@needs_sipp
async def test_serve_registers_refreshes_and_unregisters_at_a_sipp_registrar(tmp_path):
    registrar_port = free_udp_port()
    xml = tmp_path / "registrar.xml"
    xml.write_text((SIPP / "registrar.xml").read_text().replace("{USER}", "alice").replace("{PASSWORD}", "s3cret")
                   .replace("{EXPIRES}", "12"))
    registrar = await asyncio.create_subprocess_exec(
        "sipp", "-sf", str(xml), "-m", "1", "-nostdin", "-i", "127.0.0.1", "-p", str(registrar_port),
        "-timeout", "120s", "-timeout_error", cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    serve, url = await start_serve(f"sip:alice@127.0.0.1:{registrar_port}")
    try:
        state = await health_until(url, lambda s: (s.get("sip_registration") or {}).get("state") == "registered")
        assert state["sip_registration"]["aor"] == f"sip:alice@127.0.0.1:{registrar_port}"
        # Granted 12 s: the refresh comes well before that, and is granted 3600 s.
        state = await health_until(url, lambda s: s["sip_registration"]["expires_s"] == 3600, timeout=15)
        assert state["sip_registration"]["state"] == "registered"
        assert "voice_agent_sip_registered 1.0" in await asyncio.to_thread(metrics, url)
        serve.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(serve.communicate(), 60)
        assert serve.returncode == 0, err.decode()[-3000:]
        _, registrar_err = await asyncio.wait_for(registrar.communicate(), 20)
        assert registrar.returncode == 0, registrar_err.decode()[-2000:]  # it got the Expires: 0
    finally:
        for proc in (serve, registrar):
            if proc.returncode is None:
                proc.kill()
    log = err.decode()
    assert log.count("SIP registration at") == 2, log  # registered once (refreshes are silent), removed
    assert "s3cret" not in log


async def test_a_registrar_that_never_answers_holds_up_nothing():
    silent = free_udp_port()  # nothing listens there
    serve, url = await start_serve(f"sip:alice@127.0.0.1:{silent}")
    try:
        state = await health_until(url, lambda s: s["status"] == "ready")
        assert state["sip_registration"]["state"] == "registering"  # still waiting for an answer
    finally:
        serve.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(serve.communicate(), 60)
    assert serve.returncode == 0, err.decode()[-3000:]


def test_a_wildcard_host_advertises_a_reachable_address():
    """`serve --host 0.0.0.0`: Via, Contact and SDP must not say 0.0.0.0 to a peer."""
    import ipaddress

    from agent.config import load_settings
    from signaling.server import sip_address

    settings = load_settings("tiny", env={})
    assert sip_address("127.0.0.1", settings) is None  # a concrete address is used as it is
    default = sip_address("0.0.0.0", settings)
    assert default is not None and not ipaddress.ip_address(default).is_unspecified
    via_registrar = settings.replace("sip", register="sip:alice@127.0.0.1:5070")
    assert sip_address("0.0.0.0", via_registrar) == "127.0.0.1"  # the route to the registrar
