"""SIP digest authentication (signaling/sip/digest.py): the RFCs' own examples, challenges
as servers write them, and the agent's calls answering 401 and 407 challenges: SIPp checks
the answer with its own digest code (verifyauth), and `voice-agent call` with refused
credentials ends with one line and exit 1."""

import asyncio
import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest
from support import free_udp_port

from agent.call.factory import SessionFactory
from signaling.sip.client import CallFailed, SipClient, parse_target
from signaling.sip.digest import Challenge, DigestClient, DigestError, parse_challenge
from signaling.sip.message import make_response, parse_message

SIPP = Path(__file__).parents[1] / "e2e" / "sipp"
ROOT = Path(__file__).parents[2]
session_loop = pytest.mark.asyncio(loop_scope="session")  # the models fixture's loop
needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="SIPp (Debian package sip-tester) is not installed")


# -- the algorithm ---------------------------------------------------------------------

RFC7616 = ('Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm={alg}, '
           'nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"')
CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"


@pytest.mark.parametrize(("algorithm", "response"), [
    ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),  # RFC 7616 3.9.1
    ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
])
def test_the_rfc_7616_examples(algorithm, response):
    challenge = parse_challenge("WWW-Authenticate", RFC7616.format(alg=algorithm))
    answer = DigestClient("Mufasa", "Circle of Life").answer(challenge, "GET", "/dir/index.html", CNONCE)
    assert f'response="{response}"' in answer and "qop=auth, nc=00000001" in answer
    assert 'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"' in answer and f"algorithm={algorithm}" in answer


def test_the_rfc_2617_example_and_counts_per_nonce():
    challenge = parse_challenge("WWW-Authenticate", 'Digest realm="testrealm@host.com", qop="auth,auth-int", '
                                'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"')
    client = DigestClient("Mufasa", "Circle Of Life")
    first = client.answer(challenge, "GET", "/dir/index.html", "0a4f113b")
    assert 'response="6629fae49393a05397450978507c4ef1"' in first and "nc=00000001" in first
    assert "nc=00000002" in client.answer(challenge, "GET", "/dir/index.html")  # the same nonce again


def test_sha_512_256_and_sess_follow_rfc_7616():
    challenge = parse_challenge("Proxy-Authenticate", 'Digest realm="r", nonce="n", algorithm=SHA-512-256-sess, qop=auth')
    answer = DigestClient("u", "p").answer(challenge, "INVITE", "sip:bob@example.com", "c")

    def h(text):
        return hashlib.new("sha512_256", text.encode()).hexdigest()

    ha1 = h(f"{h('u:r:p')}:n:c")
    assert f'response="{h(f"{ha1}:n:00000001:c:auth:" + h("INVITE:sip:bob@example.com"))}"' in answer
    assert challenge.answer_header == "Proxy-Authorization"


def test_challenges_as_servers_write_them():
    c = parse_challenge("WWW-Authenticate", 'Digest algorithm=MD5, realm="asterisk", nonce="25813d13"')
    assert (c.realm, c.nonce, c.algorithm, c.qop, c.stale) == ("asterisk", "25813d13", "MD5", (), False)
    c = parse_challenge("WWW-Authenticate", 'digest realm="a, \\"b\\"",nonce=x,stale=TRUE,qop="auth"')
    assert c.realm == 'a, "b"' and c.nonce == "x" and c.stale and c.qop == ("auth",)
    no_qop = DigestClient("u", "p").answer(Challenge("WWW-Authenticate", "r", "n"), "BYE", "sip:x")
    assert "qop" not in no_qop and "cnonce" not in no_qop  # RFC 2069's form


@pytest.mark.parametrize(("value", "problem"), [
    ('Basic realm="x"', "scheme is not supported"),
    ('Digest realm="x"', "no nonce"),
    ('Digest nonce="x"', "no realm"),
    ('Digest realm="x", nonce="y", algorithm=SHA-1', "algorithm SHA-1 is not supported"),
    ('Digest realm="x", nonce="y", qop="auth-int"', "qop auth-int is not supported"),
    ('Digest realm="x" nonce', "cannot read"),
])
def test_challenges_that_cannot_be_answered_are_one_line(value, problem):
    with pytest.raises(DigestError, match=problem):
        parse_challenge("WWW-Authenticate", value)


def test_the_password_is_never_in_a_repr():
    from agent.config import load_settings

    settings = load_settings("tiny", env={"VOICE_AGENT_SIP__USERNAME": "alice", "VOICE_AGENT_SIP__PASSWORD": "s3cret"})
    assert settings.sip.password == "s3cret"
    assert "s3cret" not in repr(settings) and "s3cret" not in repr(DigestClient("alice", "s3cret"))


# -- calls that are challenged ---------------------------------------------------------------

def sipp_uas(tmp_path, port, status, header, qop, password="s3cret"):
    xml = tmp_path / "uas.xml"
    xml.write_text((SIPP / "uas_challenge.xml").read_text().replace("{STATUS}", str(status))
                   .replace("{HEADER}", header).replace("{QOP}", qop).replace("{USER}", "alice")
                   .replace("{PASSWORD}", password))
    return ["sipp", "-sf", str(xml), "-m", "1", "-nostdin", "-i", "127.0.0.1", "-p", str(port),
            "-timeout", "30s", "-timeout_error"]


@needs_sipp
@session_loop
@pytest.mark.parametrize("qop", ["", ', qop="auth"'], ids=["no-qop", "qop-auth"])
@pytest.mark.parametrize("password", ["s3cret", "wrong"])
async def test_sipp_checks_the_answer_to_its_401(models, tiny_settings, tmp_path, qop, password):
    port = free_udp_port()
    uas = await asyncio.create_subprocess_exec(*sipp_uas(tmp_path, port, 401, "WWW-Authenticate", qop), cwd=tmp_path,
                                               stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    settings = tiny_settings.replace("sip", username="alice", password=password)
    client = SipClient(SessionFactory(models), settings, "127.0.0.1")
    await client.start()
    try:
        await asyncio.sleep(0.3)  # SIPp listening
        with pytest.raises(CallFailed) as failed:
            await client.dial(*parse_target(f"sip:bob@127.0.0.1:{port}"))
        _, err = await asyncio.wait_for(uas.communicate(), 20)
        assert uas.returncode == 0, err.decode()[-2000:]
    finally:
        await client.close()
        if uas.returncode is None:
            uas.kill()
    # SIPp's verdict on our Authorization, by the answer it chose.
    expected = "486 Authenticated And Busy" if password == "s3cret" else "403 Wrong Credentials"
    assert expected in str(failed.value)


class Challenger(asyncio.DatagramProtocol):
    """A hand-made UAS that challenges with a 407 (SHA-256, qop=auth) and checks the
    answer with the formula written out here (SIPp's verifyauth reads Authorization only)."""

    def __init__(self) -> None:
        self.invites: list = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        msg = parse_message(data)
        if msg.method != "INVITE":
            return
        self.invites.append(msg)
        proxy_auth = msg.header("Proxy-Authorization")
        if proxy_auth is None:
            response = make_response(msg, 407, to_tag="p1")
            response.headers.append(("Proxy-Authenticate",
                                     'Digest realm="proxy.test", nonce="pn1", algorithm=SHA-256, qop="auth"'))
        else:
            response = make_response(msg, 486 if self.valid(msg, proxy_auth) else 403, to_tag="p1")
        self.transport.sendto(response.to_bytes(), addr)

    @staticmethod
    def valid(msg, value: str) -> bool:
        fields = dict(part.strip().split("=", 1) for part in value.removeprefix("Digest ").split(","))
        fields = {k: v.strip('"') for k, v in fields.items()}

        def h(text):
            return hashlib.sha256(text.encode()).hexdigest()

        ha1, ha2 = h("alice:proxy.test:s3cret"), h(f"INVITE:{fields['uri']}")
        expected = h(f"{ha1}:pn1:{fields['nc']}:{fields['cnonce']}:auth:{ha2}")
        return fields["uri"] == msg.uri and fields["username"] == "alice" and fields["response"] == expected


@session_loop
async def test_a_proxys_407_is_answered_in_proxy_authorization(models, tiny_settings):
    loop = asyncio.get_running_loop()
    transport, challenger = await loop.create_datagram_endpoint(Challenger, local_addr=("127.0.0.1", 0))
    client = SipClient(SessionFactory(models), tiny_settings.replace("sip", username="alice", password="s3cret"),
                       "127.0.0.1")
    await client.start()
    try:
        port = transport.get_extra_info("sockname")[1]
        with pytest.raises(CallFailed, match=r"is busy \(486"):  # the challenger's "answer accepted"
            await client.dial(*parse_target(f"sip:bob@127.0.0.1:{port}"))
    finally:
        await client.close()
        transport.close()
    first, second = challenger.invites
    assert second.call_id == first.call_id and second.from_tag == first.from_tag
    assert second.cseq == (first.cseq[0] + 1, "INVITE") and second.via[0].branch != first.via[0].branch
    assert second.header("Authorization") is None and second.body == first.body


@needs_sipp
async def test_refused_credentials_end_voice_agent_call_with_one_line_and_exit_1(tmp_path):
    port = free_udp_port()
    uas = await asyncio.create_subprocess_exec(
        "sipp", "-sf", str(SIPP / "uas_challenge_twice.xml"), "-m", "1", "-nostdin", "-i", "127.0.0.1",
        "-p", str(port), "-timeout", "30s", "-timeout_error", cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    env = {**os.environ, "VOICE_AGENT_SIP__USERNAME": "alice", "VOICE_AGENT_SIP__PASSWORD": "not-the-password"}
    env.pop("VOICE_AGENT_PROFILE", None)
    try:
        await asyncio.sleep(0.3)
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "call", f"sip:bob@127.0.0.1:{port}", "--profile", "tiny",
            "--local-host", "127.0.0.1", cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(agent.communicate(), 120)
        _, uas_err = await asyncio.wait_for(uas.communicate(), 20)
        assert uas.returncode == 0, uas_err.decode()[-2000:]  # it saw an Authorization, and both ACKs
    finally:
        if uas.returncode is None:
            uas.kill()
    assert agent.returncode == 1, err.decode()[-2000:]
    last = err.decode().strip().splitlines()[-1]
    assert last == (f"voice-agent: error: sip:bob@127.0.0.1:{port} refused the credentials of sip.username "
                    f"'alice' (401 Unauthorized): check the password")
    assert b"not-the-password" not in out + err
