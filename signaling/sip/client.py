"""Outbound calls: the agent as a SIP user agent client over UDP (RFC 3261 13 and 17.1).

    voice-agent call sip:USER@HOST[:PORT]
      INVITE + SDP offer (PCMU, PCMA, telephone-event), resent on Timer A until anything
      answers; nothing by Timer B ─► CallFailed
      ─► 100 / 180 / 183 (progress) ─► 200 OK + SDP answer ─► ACK (again whenever the
      200 comes again) ─► RTP and a CallSession, as for a call the agent answers ─► BYE
      from either side
      3xx-6xx ─► ACK, CallFailed naming the answer (401/407: no digest authentication)
      ringing for longer than RING_TIMEOUT_S, or stopped while ringing ─► CANCEL; the 487
      is ACKed

HOST is an IP address or a name resolved by getaddrinfo (no DNS SRV/NAPTR, RFC 3263); the
requests of the call go to that address. The first 2xx wins (no forking), and early media
(a 183 with SDP) is not played.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import uuid
from collections.abc import Callable
from typing import cast

from agent.call.events import SessionEvent, event_line
from agent.call.factory import SessionFactory
from agent.config import Settings
from agent.errors import InputError, VoiceAgentError
from signaling.sip import endpoint as sip
from signaling.sip.digest import DigestClient
from signaling.sip.endpoint import ALLOW, CLOSE_GRACE_S, T1, TIMER_F, Dialog, SipCall, SipEndpoint, contact_uri, hostport, rtp_socket
from signaling.sip.message import DEFAULT_PORT, SipMessage, SipParseError, SipUri, parse_uri
from signaling.sip.sdp import SdpError, codec_from_answer, make_offer, parse_sdp

log = logging.getLogger(__name__)
RING_TIMEOUT_S = 120.0  # how long a call may ring before the agent gives up (CANCEL)
TIMER_D = 32.0  # how long a rejection may come again (and is ACKed again)
PROGRESS = {100: "trying", 180: "ringing", 181: "being forwarded", 182: "queued", 183: "session progress"}


class CallFailed(VoiceAgentError):
    """The call could not be placed: rejected, not answered, unusable answer. One line."""


def parse_target(text: str) -> tuple[SipUri, tuple[str, int]]:
    """A `call` destination, sip:USER@HOST[:PORT]: (its URI, the (IP, port) to send to).
    InputError, one line, for anything that cannot be dialled."""
    try:
        uri = parse_uri(text.strip())
    except SipParseError as e:
        raise InputError(f"bad SIP URI {text!r} ({e}); expected sip:USER@HOST[:PORT]") from None
    if uri.scheme != "sip":
        raise InputError(f"cannot call {text!r}: only sip: URIs (sips: needs TLS; for a phone number, "
                         f"call sip:NUMBER@GATEWAY)")
    transport = (uri.params.get("transport") or "udp").lower()
    if transport != "udp":
        raise InputError(f"cannot call {text!r}: transport={transport} is not supported, only UDP")
    if uri.headers:
        raise InputError(f"cannot call {text!r}: URI headers (?...) are not supported")
    try:
        return uri, resolve(uri)
    except ValueError as e:
        raise InputError(f"cannot call {text!r}: {e}") from None


def resolve(uri: SipUri) -> tuple[str, int]:
    """Where requests to `uri` go: (IP, port) of its host (getaddrinfo; no DNS SRV).
    ValueError, one line, for a host that cannot be resolved."""
    host = uri.host[1:-1] if uri.host.startswith("[") else uri.host
    try:
        found = socket.getaddrinfo(host, uri.port or DEFAULT_PORT, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"cannot resolve {host!r} ({getattr(e, 'strerror', None) or e})") from None
    # SOCK_DGRAM for a host name: IPv4 or IPv6 addresses, (host, port, ...).
    return cast("tuple[str, int]", found[0][4][:2])


def local_address_for(peer: tuple[str, int]) -> str:
    """The address this host reaches `peer` from (the routing table's choice): the one to
    put in Via, Contact and SDP. No packet is sent."""
    with socket.socket(socket.AF_INET6 if ":" in peer[0] else socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(peer)
        except OSError as e:
            raise CallFailed(f"cannot reach {peer[0]}: {e.strerror or e}") from None
        return s.getsockname()[0]


class SipClient(SipEndpoint):
    """A SIP endpoint that places calls (dial()) and takes none: a new INVITE gets 403."""

    def __init__(self, sessions: SessionFactory, settings: Settings, host: str, port: int = 0,
                 advertise: str | None = None, voice: str | None = None) -> None:
        super().__init__(sessions, settings, host, port, advertise, voice=voice)
        self._invites: dict[str, tuple[SipMessage, tuple[str, int]]] = {}  # branch -> our INVITE, where it went

    async def _new_invite(self, msg: SipMessage, addr: tuple[str, int]) -> None:
        self._respond(msg, addr, 403, reason="Forbidden (this agent places calls, it does not take them)")

    def _on_response(self, msg: SipMessage) -> None:
        assert msg.status is not None  # datagram_received hands responses only
        if msg.cseq[1] == "INVITE" and msg.status >= 200:
            self._ack_answer(msg)
        super()._on_response(msg)

    def _ack_answer(self, answer: SipMessage) -> None:
        """ACK a final answer to our INVITE, each time it comes: a rejection within its
        transaction (RFC 3261 17.1.1.3), a 2xx with the dialog's ACK once dial() made it."""
        assert answer.status is not None  # a response
        if answer.status >= 300:
            branch = answer.via[0].branch  # ours all have one: one without answers nothing of ours
            sent = self._invites.get(branch) if branch is not None else None
            if sent is not None:
                invite, peer = sent
                self._udp.sendto(_in_transaction(invite, "ACK", to=answer.header("To")).to_bytes(), peer)
            return
        call = self.calls.get(answer.call_id)
        if call is not None and call.ack is not None:
            self._udp.sendto(call.ack, call.dialog.peer)

    async def dial(self, uri: SipUri, peer: tuple[str, int], on_progress: Callable[[SipMessage], None] | None = None,
                   ring_timeout: float = RING_TIMEOUT_S) -> SipCall:
        """Call `uri` at `peer`. Returns the call once answered, its media running; raises
        CallFailed when it is rejected or not answered. Cancelling the task while it rings
        sends CANCEL."""
        sock = rtp_socket(self.host)
        tag = uuid.uuid4().hex[:10]
        dialog = Dialog(call_id=f"{uuid.uuid4().hex}@{self.advertise}", local_tag=tag, local=f"{self.contact};tag={tag}",
                        remote=f"<{uri}>", remote_target=str(uri), peer=peer)
        invite = dialog.request("INVITE", self._via())
        invite.headers += [("Contact", self.contact), ("Allow", ALLOW), ("Content-Type", "application/sdp")]
        invite.body = make_offer(self.advertise, sock.getsockname()[1], random.getrandbits(31)).encode()
        call = SipCall(dialog, invite, self, outbound=True, local_sdp=invite.body)
        self.calls[call.call_id] = call
        branches: list[str] = []
        answered: dict[str, str] = {}  # realm -> the nonce our credentials answered
        try:
            while True:  # the INVITE, then again for each digest challenge answered
                branch = call.invite.via[0].branch
                assert branch is not None  # _via() names one
                branches.append(branch)
                answers = self._transactions[(branch, "INVITE")] = asyncio.Queue()
                self._invites[branch] = (call.invite, peer)
                answer = await self._final_answer(call, answers, on_progress, ring_timeout)
                assert answer.status is not None  # a response
                if answer.status not in (401, 407):
                    break
                retry = self._authorized(call.invite, answer, answered)
                if retry is None:
                    raise CallFailed(_rejection(answer, uri, refused=self.digest if answered else None))
                log.info("call %s: answering the %d challenge as %s", call.call_id, answer.status,
                         self.settings.sip.username)
                call.invite = retry
            if answer.status >= 300:
                raise CallFailed(_rejection(answer, uri))
            self._confirm(call, answer)
            try:
                codec = codec_from_answer(parse_sdp(answer.body))
            except SdpError as e:
                raise CallFailed(f"{uri} answered with no usable SDP ({e}); hung up") from None
            await self._start_media(call, codec, sock, confirmed=True)  # the 200 came and was ACKed
        except BaseException:  # CancelledError too: the call is not going ahead
            if call.rtp is None:
                sock.close()
            await self._end(call, "the call did not start", bye=call.answered, wait=CLOSE_GRACE_S)
            raise
        finally:
            for branch in branches:
                self._transactions.pop((branch, "INVITE"), None)
                asyncio.get_running_loop().call_later(TIMER_D, self._invites.pop, branch, None)
        log.info("call %s answered (%s, RTP %d -> %s:%d)", call.call_id, codec.name, sock.getsockname()[1],
                 codec.remote_ip, codec.remote_port)
        return call

    async def _final_answer(self, call: SipCall, answers: asyncio.Queue, on_progress: Callable[[SipMessage], None] | None,
                            ring_timeout: float) -> SipMessage:
        """Send the INVITE and resend it on Timer A (T1, doubling) until anything answers;
        nothing by Timer B fails the call. Then it may ring for `ring_timeout`: after that,
        or if the task is cancelled while it rings, CANCEL."""
        loop = asyncio.get_running_loop()
        data, peer = call.invite.to_bytes(), call.dialog.peer
        timer_b = sip.TIMER_B  # read here: tests shorten it
        interval, deadline, ringing = T1, loop.time() + timer_b, False
        self._udp.sendto(data, peer)
        try:
            while (left := deadline - loop.time()) > 0:
                resend = not ringing and interval < left  # else the wait ends at the deadline
                try:
                    answer = await asyncio.wait_for(answers.get(), interval if resend else left)
                except TimeoutError:
                    if resend:
                        interval *= 2
                        self._udp.sendto(data, peer)
                    continue
                if answer.status >= 200:
                    return answer
                if not ringing:  # no more resends; now it rings
                    ringing, deadline = True, loop.time() + ring_timeout
                if on_progress is not None:
                    on_progress(answer)
        except asyncio.CancelledError:
            if ringing:  # a CANCEL only after a provisional answer (RFC 3261 9.1)
                await self._cancel_invite(call, answers, CLOSE_GRACE_S)
            raise
        if not ringing:
            raise CallFailed(f"no answer from {peer[0]}:{peer[1]} in {timer_b:.0f} s: is a SIP phone or server there?")
        await self._cancel_invite(call, answers, TIMER_F)
        raise CallFailed(f"nobody answered in {ring_timeout:.0f} s of ringing")

    async def _cancel_invite(self, call: SipCall, answers: asyncio.Queue, wait: float) -> None:
        """CANCEL our ringing INVITE and wait for its end: a 487 (ACKed by _ack_answer) or,
        if the callee answered meanwhile, a 2xx: the dialog is confirmed so dial() can BYE it."""
        await self._send_request(_in_transaction(call.invite, "CANCEL"), call.dialog.peer, wait)
        try:
            while (answer := await asyncio.wait_for(answers.get(), wait)).status < 200:
                pass
        except TimeoutError:
            return
        if answer.status < 300:
            self._confirm(call, answer)

    def _confirm(self, call: SipCall, ok: SipMessage) -> None:
        """The callee answered: the dialog takes its tag, Contact and route (RFC 3261 12.1.2)
        and our ACK goes out (13.2.2.4)."""
        dialog = call.dialog
        remote = ok.header("To")
        assert remote is not None  # mandatory: parse_message checked it
        dialog.remote = remote
        dialog.remote_target = contact_uri(ok) or dialog.remote_target
        try:
            dialog.route = list(reversed(ok.headers_named("Record-Route")))
        except SipParseError as e:
            log.warning("call %s: ignoring a malformed Record-Route (%s)", call.call_id, e)
        call.ack = dialog.request("ACK", self._via(), cseq=call.invite.cseq[0]).to_bytes()
        call.answered = True
        self._udp.sendto(call.ack, dialog.peer)


def _in_transaction(invite: SipMessage, method: str, to: str | None = None) -> SipMessage:
    """A CANCEL of our INVITE, or the ACK of a rejection: its Request-URI, top Via (so its
    branch), From, Call-ID, CSeq number and Route; To as the answer has it, for the ACK
    (RFC 3261 9.1, 17.1.1.3)."""
    sender, receiver = invite.header("From"), to or invite.header("To")
    assert sender is not None and receiver is not None  # our INVITE has both (Dialog.request)
    headers = [("Via", invite.headers_named("Via")[0]), ("Max-Forwards", "70"), ("From", sender),
               ("To", receiver), ("Call-ID", invite.call_id), ("CSeq", f"{invite.cseq[0]} {method}")]
    headers += [("Route", route) for route in invite.headers_named("Route")]
    return SipMessage(method=method, uri=invite.uri, headers=headers)


def _rejection(answer: SipMessage, uri: SipUri, refused: DigestClient | None = None) -> str:
    """One line saying why the call was not answered. `refused`: our credentials were
    answered and challenged again (wrong user name or password)."""
    assert answer.status is not None  # a response
    what = f"{answer.status} {answer.reason or ''}".strip()[:100]
    if answer.status in (401, 407) and refused is not None:
        return f"{uri} refused the credentials of sip.username {refused.username!r} ({what}): check the password"
    if answer.status in (401, 407):
        return (f"{uri} asks for authentication ({what}); set sip.username and sip.password "
                f"(VOICE_AGENT_SIP__PASSWORD), or its challenge cannot be answered (see the log)")
    if answer.status < 400:
        return f"{uri} redirects the call elsewhere ({what}); redirects are not followed"
    if answer.status in (486, 600):
        return f"{uri} is busy ({what})"
    return f"{uri} rejected the call ({what})"


# -- `voice-agent call` --------------------------------------------------------------

async def call_out(sessions: SessionFactory, settings: Settings, uri: SipUri, peer: tuple[str, int],
                   local_host: str, *, voice: str | None = None, max_seconds: float | None = None,
                   stop: asyncio.Event | None = None, say: Callable[[str], None] = print) -> SipCall:
    """Place a call and let the agent talk until either side hangs up, `max_seconds` pass
    or `stop` is set, saying what happens (one line each). Returns the ended call; raises
    CallFailed if it never started."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    client = SipClient(sessions, settings, local_host, voice=voice)
    await client.start()
    tasks: list[asyncio.Future] = []
    try:
        say(f"calling {uri} at {hostport(*peer)} from {hostport(local_host, client.port)}")
        dialing = asyncio.ensure_future(client.dial(uri, peer, on_progress=lambda answer: say(_progress(answer))))
        stopped = asyncio.ensure_future(stop.wait())
        tasks += [dialing, stopped]
        await asyncio.wait({dialing, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not dialing.done():
            dialing.cancel()
            await asyncio.gather(dialing, return_exceptions=True)
            raise CallFailed("stopped before the call was answered")
        call = dialing.result()
        answered_at = loop.time()
        rtp = call.rtp
        # dial() returns a call with its media running, on the SDP's address.
        assert call.codec is not None and call.session is not None
        assert rtp is not None and rtp.transport is not None and rtp.signalled is not None
        # (The SDP's address: RTP goes where the callee's own packets come from, once they do.)
        say(f"answered: {call.codec.name}, RTP {hostport(local_host, rtp.transport.get_extra_info('sockname')[1])}"
            f" <-> {hostport(*rtp.signalled)}")
        events = asyncio.ensure_future(_say_events(call.session.events, say))
        ended = asyncio.ensure_future(call.done.wait())
        tasks += [events, ended]
        waits: set[asyncio.Future] = {ended, stopped}
        if max_seconds:
            limit = asyncio.ensure_future(asyncio.sleep(max_seconds))
            waits.add(limit)
            tasks.append(limit)
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not call.ended:
            reason = "stopped" if stop.is_set() else "--max-seconds"
            status = await call.hangup(f"the agent hung up ({reason})")
            if status is None:
                say("our BYE got no answer")
        events.cancel()
        while not call.session.events.empty():  # what happened before the end
            line = event_line(call.session.events.get_nowait())
            if line:
                say(line)
        say(f"hung up: {call.end_reason}, after {loop.time() - answered_at:.1f} s "
            f"(RTP: {rtp.received} packets in, {rtp.loud_sent} voiced packets out)")
        return call
    finally:
        for task in tasks:
            task.cancel()
        await client.close()


async def _say_events(events: asyncio.Queue[SessionEvent], say: Callable[[str], None]) -> None:
    while True:
        line = event_line(await events.get())
        if line:
            say(line)


def _progress(answer: SipMessage) -> str:
    assert answer.status is not None  # a response
    return f"{PROGRESS.get(answer.status, 'progress')} ({answer.status} {answer.reason or ''})".replace(" )", ")")


def check_local_host(text: str) -> str:
    """--local-host: an IP address of this host (bound, and put in Via, Contact and SDP)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise InputError(f"--local-host must be an IP address of this host, got {text!r}") from None
