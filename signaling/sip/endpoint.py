"""SIP user agent over UDP (RFC 3261): phone calls from PBXs, SBCs and trunks, and to them.

    SipServer answers calls:
      INVITE ─► 100 Trying, 180 Ringing, 200 OK + SDP answer (resent on timer T1..T2 until
                the ACK comes) ─► RtpSession (G.711) <─> CallSession
      CANCEL before the answer ─► 200, then 487 to the INVITE      call limit ─► 486
    SipClient (sip_client.py) places them: INVITE + SDP offer ─► 200 ─► ACK ─► the same media.

SipEndpoint holds what both directions share: the UDP socket, each call's dialog (Dialog:
what the agent's requests inside a call are built from), the media set-up (RTP and a
CallSession; DTMF reaches the session, and session.hangup_digit ends the call), BYE either
way (SipCall.hangup() resends the agent's BYE on Timer E until it is answered, for Timer F
at most), client transactions, re-INVITEs (200 with the media unchanged), OPTIONS
(keepalives), and the refusals RFC 3261 8.2 asks of any request: 405/501 for methods we do
not do, 416 for a Request-URI scheme other than sip/sips/tel, 420 for a Require naming an
extension (we support none: no 100rel, no session timers), 505 for a SIP version other than
2.0, 481 for unknown dialogs.

Responses go where RFC 3261 18.2.2 and RFC 3581 (rport) say, and the agent's requests go
to where the peer's messages come from, so peers behind NAT get them. Anything malformed
is answered 400 when it can be, dropped otherwise; nothing a peer sends may take the
endpoint down. Not built: TCP, authentication, DNS SRV (RFC 3263).

An INVITE costs nothing it can turn against a third party: no RTP goes out before the
ACK (whose To tag proves the caller got our 200) and the caller's own packets name where
it is. A call not confirmed within server.connect_timeout_s is dropped with one BYE and
no Timer F wait, and one source address may hold server.max_unconfirmed_per_source such
calls at most (486 beyond). A confirmed call whose peer sends no RTP at all (comfort noise
counts) for server.media_timeout_s is taken for a vanished peer and hung up. Every task
that carries a call (the RTP loop, the 2xx resends, the media watch) has its failure
logged once, counted in `counts` and turned into an orderly end of that call.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import socket
import uuid
from collections import Counter, deque
from collections.abc import Awaitable
from dataclasses import dataclass, field

from agent.call.factory import SessionFactory
from agent.call.session import CallSession
from agent.config import Settings
from agent.rates import OUT_RATE
from signaling.sip.digest import CHALLENGE_HEADER, DigestClient, DigestError, parse_challenge
from signaling.sip.message import (
    SipMessage,
    SipParseError,
    UnsupportedUriScheme,
    UnsupportedVersion,
    canonical_name,
    make_response,
    parse_message,
    parse_name_addr,
    parse_uri,
    response_address,
    set_received_rport,
    split_top,
)
from signaling.sip.rtp import RtpSession
from signaling.sip.sdp import Codec, NoCommonCodec, SdpError, answer_audio, parse_sdp
from signaling.slots import CallSlots

log = logging.getLogger(__name__)
T1, T2 = 0.5, 4.0  # RFC 3261 timers: resends at T1, 2 T1, 4 T1... (capped at T2 but for the INVITE)
TIMER_B = TIMER_F = TIMER_H = 64 * T1  # give up waiting: for an INVITE's answer, a request's, an ACK
CLOSE_GRACE_S = 2.0  # on shutdown, how long the BYEs get to be answered
ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, NOTIFY"
HANDLED = frozenset(ALLOW.split(", "))
# NOTIFY is taken only for the agent's own transfers (REFER's subscription); the agent
# does not take REFERs (a caller cannot have the agent transfer itself elsewhere).
KNOWN_UNSUPPORTED = {"REGISTER", "SUBSCRIBE", "REFER", "MESSAGE", "INFO", "UPDATE", "PRACK", "PUBLISH"}
TRANSFER_TIMEOUT_S = 120.0  # how long a transfer may ring at its target
# Option tags a request may Require (RFC 3261 8.2.2.3). None: no reliable provisionals
# (100rel), no session timers (timer, RFC 4028: its refreshes would need UPDATE or our own
# re-INVITEs), no replaces. A Require of anything is answered 420.
SUPPORTED_EXTENSIONS: frozenset[str] = frozenset()


@dataclass
class Dialog:
    """A call's dialog (RFC 3261 12), the same whichever side placed the call: what the
    agent's requests inside it (ACK, BYE) are built from."""

    call_id: str
    local_tag: str
    local: str  # our From in our requests (the To in theirs), with our tag
    remote: str  # theirs, with their tag once it is known
    remote_target: str  # Request-URI of our requests: the peer's Contact
    peer: tuple[str, int]  # where our requests go: where the peer's messages come from
    route: list[str] = field(default_factory=list)  # Route headers, from Record-Route
    local_cseq: int = 0

    def request(self, method: str, via: str, cseq: int | None = None) -> SipMessage:
        """A request in this dialog, with the next CSeq unless given (an ACK takes its INVITE's)."""
        if cseq is None:
            self.local_cseq += 1
            cseq = self.local_cseq
        headers = [("Via", via), ("Max-Forwards", "70"), ("From", self.local), ("To", self.remote),
                   ("Call-ID", self.call_id), ("CSeq", f"{cseq} {method}")]
        headers += [("Route", route) for route in self.route]
        return SipMessage(method=method, uri=self.remote_target, headers=headers)


ENDED_KEPT = 8


@dataclass(eq=False)
class SipCall:
    """One phone call, either direction: its dialog, its RTP stream and its CallSession."""

    dialog: Dialog
    invite: SipMessage  # the INVITE that set it up: the caller's, or ours
    endpoint: SipEndpoint = field(repr=False)
    outbound: bool = False
    source: tuple[str, int] | None = None  # where their INVITE came from (responses go by its Via)
    answered: bool = False  # the dialog is confirmed: 200 OK sent (inbound) or received (outbound)
    acked: asyncio.Event = field(default_factory=asyncio.Event)  # our latest 2xx got its ACK
    ack_cseq: int = 0  # the CSeq of the INVITE that 2xx answers
    ended: bool = False
    end_reason: str = ""  # "the other side hung up", "hang-up digit #", ...
    done: asyncio.Event = field(default_factory=asyncio.Event)  # set once the call is over
    local_sdp: bytes = b""  # our answer (inbound) or offer (outbound); a re-INVITE gets it again
    final_response: bytes | None = None  # our final answer to the latest INVITE, for its resends
    ack: bytes | None = None  # our ACK of their 2xx (outbound), sent again when the 2xx comes again
    codec: Codec | None = None  # what the SDP settled on
    rtp: RtpSession | None = None
    session: CallSession | None = None
    dtmf: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)
    confirmed: bool = False  # the first ACK came (inbound), or the 200 (outbound): media may flow
    transfer: asyncio.Queue | None = None  # a transfer of ours waits for the NOTIFYs' (status, terminated)
    provisional: bytes | None = None  # our latest provisional answer, for resends of the INVITE
    created: float = field(default_factory=lambda: asyncio.get_running_loop().time())

    @property
    def call_id(self) -> str:
        return self.dialog.call_id

    @property
    def slot(self) -> str:
        """Its key in CallSlots: by the call object, since Call-IDs are the peer's choice."""
        return f"sip:{id(self)}"

    @property
    def local_tag(self) -> str:
        return self.dialog.local_tag

    async def hangup(self, reason: str = "the agent hung up") -> int | None:
        """End the call from the agent's side: BYE, resent on Timer E until it is answered
        (Timer F at most). Returns the status of that answer (None: none came, or the call
        had already ended)."""
        return await self.endpoint.hangup(self, reason)


class SipEndpoint(asyncio.DatagramProtocol):
    """A SIP user agent on one UDP port: its calls, and all that calls in either direction
    share. `advertise` is the address put in SDP, Via and Contact (the host's address as
    peers reach it); `voice` the agent's voice in its calls. Subclasses decide what a new
    INVITE gets (_new_invite)."""

    def __init__(self, sessions: SessionFactory, settings: Settings, host: str, port: int,
                 advertise: str | None = None, allow_from: set[str] | None = None, voice: str | None = None,
                 slots: CallSlots | None = None) -> None:
        self.sessions = sessions
        # The process's call slots, shared with the other transports (serve passes the app's).
        self.slots = slots if slots is not None else CallSlots(settings.server.max_calls)
        self.settings = settings
        self.host = host
        self.port = port
        self.advertise = advertise or host
        self.allow_from = allow_from
        self.voice = voice
        self.calls: dict[str, SipCall] = {}
        # The last few ended calls, for tests and debugging. Each keeps its session and RTP
        # stream (echo-guard buffers, caller audio): a few hundred KiB to megabytes a call,
        # so a long-running server must keep few. (It kept 100: memory grew for 100 calls.)
        self.ended: deque[SipCall] = deque(maxlen=ENDED_KEPT)
        self.transport: asyncio.DatagramTransport | None = None
        self.dropped = 0
        # What went wrong, by kind ("media_failed", "media_timeout", "unconfirmed", ...): for metrics.
        self.counts: Counter[str] = Counter()
        self._ending: set[asyncio.Task] = set()  # calls being ended from a callback
        # Our requests waiting for answers, by (Via branch, CSeq method): CANCEL shares its INVITE's branch.
        self._transactions: dict[tuple[str, str], asyncio.Queue[SipMessage]] = {}
        sip = settings.sip
        self.digest = DigestClient(sip.username, sip.password) if sip.username else None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, self.port))
        self.port = self._udp.get_extra_info("sockname")[1]
        log.info("SIP on udp %s:%d", self.host, self.port)
        return self.port

    def connection_made(self, transport) -> None:
        self.transport = transport

    @property
    def _udp(self) -> asyncio.DatagramTransport:
        """The socket's transport: every message is sent (and comes) after start()."""
        assert self.transport is not None, "the endpoint is not started"
        return self.transport

    async def close(self) -> None:
        """Hang up every call (BYE, given CLOSE_GRACE_S to be answered) and stop listening."""
        await asyncio.gather(*(self._end(call, "the agent shut down", bye=True, wait=CLOSE_GRACE_S)
                               for call in list(self.calls.values())), return_exceptions=True)
        if self._ending:  # calls a failure is ending: their BYEs get the same grace
            _, late = await asyncio.wait(set(self._ending), timeout=CLOSE_GRACE_S)
            for task in late:
                task.cancel()
        if self.transport is not None:
            self.transport.close()

    @property
    def contact(self) -> str:
        return f"<sip:agent@{hostport(self.advertise, self.port)}>"

    async def hangup(self, call: SipCall, reason: str = "the agent hung up") -> int | None:
        """See SipCall.hangup()."""
        return await self._end(call, reason, bye=True)

    # -- receiving ------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = parse_message(data)
        except SipParseError as e:
            self._reject_malformed(data, addr, e)
            return
        if msg.is_request:
            task = asyncio.ensure_future(self._on_request(msg, addr))
            task.add_done_callback(self._request_done)
        else:
            self._on_response(msg)

    def _on_response(self, msg: SipMessage) -> None:
        """Hand an answer to the transaction of ours that waits for it (stray ones are dropped)."""
        branch = msg.via[0].branch  # ours all have one: a response without is no answer to us
        responses = self._transactions.get((branch, msg.cseq[1])) if branch is not None else None
        if responses is not None:
            responses.put_nowait(msg)

    async def _on_request(self, msg: SipMessage, addr: tuple[str, int]) -> None:
        try:
            await self._handle_request(msg, addr)
        except SipParseError as e:  # a header only looked at now (Require, Record-Route...) is malformed
            if msg.method != "ACK":
                self._respond(msg, addr, 400, reason=f"Bad Request ({_one_line(str(e))})")

    async def _handle_request(self, msg: SipMessage, addr: tuple[str, int]) -> None:
        method = msg.method
        if self.allow_from is not None and addr[0] not in self.allow_from:
            if method != "ACK":
                self._respond(msg, addr, 403, reason="Forbidden (not on the allow-list)")
            return
        if method == "ACK":  # never answered
            call = self.calls.get(msg.call_id)
            # Our To tag in it: the sender got our 200 (a spoofed INVITE's sender never does).
            if call is not None and not call.ended and msg.to_tag == call.local_tag and msg.cseq[0] == call.ack_cseq:
                call.acked.set()
                if not call.confirmed:
                    self._confirmed(call)
            return
        refusal = _refusal(msg)
        if refusal is not None:
            status, headers = refusal
            self._respond(msg, addr, status, headers=headers)
        elif method == "INVITE":
            await self._invite(msg, addr)
        elif method == "BYE":
            call = self.calls.get(msg.call_id)
            if call is None or msg.to_tag != call.local_tag:
                self._respond(msg, addr, 481)
                return
            self._respond(msg, addr, 200)
            await self._end(call, "the other side hung up")
        elif method == "CANCEL":
            await self._cancel(msg, addr)
        elif method == "NOTIFY":
            self._notify(msg, addr)
        else:  # OPTIONS: a dispatcher's probe; 503 while no call would be taken
            unavailable = self._unavailable()
            if unavailable is not None:
                self._respond(msg, addr, 503, reason=f"Service Unavailable ({unavailable})",
                              headers=[("Retry-After", "10"), ("Allow", ALLOW)])
            else:
                self._respond(msg, addr, 200, headers=[("Allow", ALLOW), ("Accept", "application/sdp")])

    def _unavailable(self) -> str | None:
        """Why no new call would be taken now (None: it would)."""
        return None

    async def _invite(self, msg: SipMessage, addr: tuple[str, int]) -> None:
        call = self.calls.get(msg.call_id)
        if msg.to_tag:  # a re-INVITE inside a call
            if call is None or msg.to_tag != call.local_tag or call.ended:
                self._respond(msg, addr, 481)
            else:
                self._reinvite(call, msg, addr)
            return
        if call is not None:
            self._invite_again(call, msg, addr)
            return
        await self._new_invite(msg, addr)

    def _invite_again(self, call: SipCall, msg: SipMessage, addr: tuple[str, int]) -> None:
        """An INVITE without To tag for a Call-ID we have. A retransmission is one of its
        server transaction (RFC 3261 17.2.3: same top Via branch and sent-by, same CSeq; from
        where it came) and gets what the first one got. Otherwise, with the same From tag,
        Call-ID and CSeq, it is the same request come another way (a fork, a loop, or a
        spoof): 8.2.2.2 says 482 Loop Detected. Anything else would be a new dialog on a
        Call-ID already in use, which we cannot tell apart from the call's (they are keyed
        by Call-ID): refused with 486, and the call in progress is untouched either way."""
        if not call.outbound and _invite_key(msg, addr) == _invite_key(call.invite, call.source):
            again = call.final_response or call.provisional
            if again is not None:
                self._udp.sendto(again, response_address(msg.via[0], addr))
            return
        if msg.from_tag == call.invite.from_tag and msg.cseq == call.invite.cseq:
            self.counts["loop_detected"] += 1
            self._respond(msg, addr, 482)
        else:
            self._respond(msg, addr, 486, reason="Busy Here (that Call-ID is in use)")

    async def _new_invite(self, msg: SipMessage, addr: tuple[str, int]) -> None:
        raise NotImplementedError

    def _reinvite(self, call: SipCall, msg: SipMessage, addr: tuple[str, int]) -> None:
        """A re-INVITE (hold, a session refresh...): 200 with our SDP as it was. The media
        stay as they are; symmetric RTP follows the peer if its address changed."""
        to = response_address(msg.via[0], addr)
        if msg.cseq[0] == call.ack_cseq and call.final_response is not None:
            self._udp.sendto(call.final_response, to)  # a resend of the one being answered
            return
        ok = self._response_bytes(msg, addr, 200, body=call.local_sdp, content_type="application/sdp",
                                  headers=[("Contact", self.contact), ("Allow", ALLOW)])
        self._send_2xx(call, ok, msg.cseq[0], to)

    async def _cancel(self, msg: SipMessage, addr: tuple[str, int]) -> None:
        call = self.calls.get(msg.call_id)
        if call is None or call.outbound or call.invite.via[0].branch != msg.via[0].branch:
            self._respond(msg, addr, 481)
            return
        self._respond(msg, addr, 200)
        if not call.answered:
            terminated = self._response_bytes(call.invite, call.source, 487, to_tag=call.local_tag)
            call.final_response = terminated
            self._udp.sendto(terminated, response_address(call.invite.via[0], call.source))
            await self._end(call, "the caller gave up before the answer (CANCEL)")

    # -- calls ----------------------------------------------------------------------

    async def _start_media(self, call: SipCall, codec: Codec, sock: socket.socket, confirmed: bool = False) -> None:
        """The call's CallSession and RTP stream, on `sock` (bound: our SDP names its port):
        the peer's audio into the session at 8 kHz, the session's frames out, DTMF to it.
        Nothing goes out until the call is `confirmed` (see _confirmed)."""
        # The call's record id is ours: a peer's Call-ID can be anything.
        session = self.sessions.new_session(self.settings, voice=self.voice, echo_guard=True)  # lines echo it back
        rtp = RtpSession(codec.name, codec.payload_type, codec.dtmf_payload_type, (codec.remote_ip, codec.remote_port),
                         lambda: _samples(session), OUT_RATE, lambda samples: session.push_audio(samples, 8000),
                         lambda digit: self._dtmf(call, digit), on_failure=lambda e: self._media_failed(call, e),
                         confirmed=False)
        call.codec, call.session, call.rtp = codec, session, rtp  # set first, so that _end() closes them whatever happens
        self._call_task(call, self._end_when_the_session_does(call, session), "session_end")
        await rtp.start(sock=sock)
        if confirmed:
            self._confirmed(call)

    def _confirmed(self, call: SipCall) -> None:
        """The dialog is confirmed (the ACK came, or the callee's 200): media may go out, to
        where the peer's own packets come from, and a peer that then falls silent is watched for."""
        call.confirmed = True
        if call.session is not None:
            call.session.greet()
        if call.rtp is not None:
            call.rtp.confirm()
            self._call_task(call, self._watch_media(call), "media_watch")

    async def _end_when_the_session_does(self, call: SipCall, session: CallSession) -> None:
        """The agent hangs up (session.idle_hangup_s): BYE."""
        await session.ended.wait()
        await self._end(call, f"agent hung up: {session.end_reason}", bye=True)

    async def _watch_media(self, call: SipCall) -> None:
        """End the call once the peer has sent no RTP at all for server.media_timeout_s."""
        rtp, timeout = call.rtp, self.settings.server.media_timeout_s
        assert rtp is not None  # _confirmed watches only a call with its RTP
        since = rtp.clock()
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            last = max(since, rtp.last_heard or since)
            if rtp.clock() - last > timeout:
                break
        self.counts["media_timeout"] += 1
        log.warning("call %s: no RTP from the caller for %.0f s; hanging up", call.call_id, timeout)
        # The peer is most likely gone: its BYE gets a short while to be answered, not Timer F.
        await self._end(call, f"no RTP came for {timeout:.0f} s", bye=True, wait=CLOSE_GRACE_S)

    def _media_failed(self, call: SipCall, error: BaseException) -> None:
        """The RTP loop died (RtpSession logged why): the call cannot go on; end it in order."""
        self.counts["media_failed"] += 1
        self._end_soon(call, f"the media failed ({type(error).__name__})")

    def _call_task(self, call: SipCall, coro: Awaitable, name: str) -> asyncio.Task:
        """A task that belongs to a call (cancelled when it ends); its failure is logged once,
        counted as `name`_failed and ends the call."""
        task = asyncio.ensure_future(coro)
        call.tasks.append(task)

        def done(task: asyncio.Task) -> None:
            if task.cancelled() or task.exception() is None:
                return
            log.error("call %s: %s failed", call.call_id, name, exc_info=task.exception())
            self.counts[f"{name}_failed"] += 1
            self._end_soon(call, f"{name} failed ({type(task.exception()).__name__})")

        task.add_done_callback(done)
        return task

    def _end_soon(self, call: SipCall, reason: str) -> None:
        """End a call from a callback (BYE to the peer if the call was confirmed)."""
        if call.ended:
            return
        task = asyncio.ensure_future(self._end(call, reason, bye=True))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    def _dtmf(self, call: SipCall, digit: str) -> None:
        call.dtmf.append(digit)
        log.info("call %s: DTMF %s", call.call_id, digit)
        action = call.session.push_dtmf(digit) if call.session is not None else None
        if action == "hangup" and not call.ended:
            self._call_task(call, call.hangup(f"the caller pressed the hang-up key {digit}"), "hangup")
        elif action == "transfer" and not call.ended and call.transfer is None:
            self._call_task(call, self.transfer(call, self.settings.session.transfer_to), "transfer")

    # -- transfer (RFC 3515) ----------------------------------------------------------

    async def transfer(self, call: SipCall, target: str) -> bool:
        """Hand the caller on to `target` (a sip: URI) with REFER, follow the NOTIFYs'
        sipfrag progress, and hang up once it answered 2xx; on a failure the call goes on
        and the session says so. Returns whether the call was transferred."""
        if call.transfer is not None or call.ended or not call.confirmed:
            return False
        call.transfer = asyncio.Queue()
        status = "no answer to the REFER"
        try:
            refer = call.dialog.request("REFER", self._via())
            refer.headers += [("Contact", self.contact), ("Refer-To", f"<{target}>"),
                              ("Referred-By", _uri_of(call.dialog.local))]
            log.info("call %s: transferring to %s", call.call_id, target)
            answer = await self._send_request(refer, call.dialog.peer)
            if answer is not None and answer.status is not None and 200 <= answer.status < 300:
                status = await self._transfer_outcome(call)
            elif answer is not None:
                status = f"{answer.status} {answer.reason or ''}".strip()
        finally:
            call.transfer = None
        ok = status.startswith("2")
        log.info("call %s: transfer to %s %s (%s)", call.call_id, target, "done" if ok else "failed", status)
        if call.session is not None:
            call.session.transferred(target, ok, status)
        if ok:
            self.counts["transferred"] += 1
            await self._end(call, f"the agent transferred the call to {target}", bye=True)
        else:
            self.counts["transfer_failed"] += 1
        return ok

    async def _transfer_outcome(self, call: SipCall) -> str:
        """The transfer's final status line from the NOTIFYs (RFC 3515 2.4.5): "200 OK",
        "486 Busy Here"...; the subscription ending without one, or TRANSFER_TIMEOUT_S
        passing, is a failure."""
        assert call.transfer is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TRANSFER_TIMEOUT_S
        while (left := deadline - loop.time()) > 0:
            try:
                status, terminated = await asyncio.wait_for(call.transfer.get(), left)
            except TimeoutError:
                break
            if status is not None and not status.startswith("1"):
                return status
            if terminated:
                return status or "the transfer ended without a final answer"
        return f"no final answer in {TRANSFER_TIMEOUT_S:.0f} s"

    def _notify(self, msg: SipMessage, addr: tuple[str, int]) -> None:
        """A NOTIFY of the refer subscription (RFC 3515): its sipfrag's status line goes to
        the transfer waiting for it; any other NOTIFY gets 481 (no such subscription)."""
        call = self.calls.get(msg.call_id)
        event = (msg.header("Event") or "").split(";")[0].strip().lower()
        if call is None or call.transfer is None or msg.to_tag != call.local_tag or event != "refer":
            self._respond(msg, addr, 481)
            return
        self._respond(msg, addr, 200)
        terminated = (msg.header("Subscription-State") or "").strip().lower().startswith("terminated")
        call.transfer.put_nowait((_sipfrag_status(msg.body), terminated))

    def _send_2xx(self, call: SipCall, data: bytes, cseq: int, to: tuple[str, int]) -> None:
        """Send our 2xx to an INVITE and resend it until its ACK comes (RFC 3261 13.3.1.4)."""
        call.final_response, call.ack_cseq, call.acked = data, cseq, asyncio.Event()
        self._udp.sendto(data, to)
        self._call_task(call, self._resend_until_ack(call, data, to), "2xx_resend")

    async def _resend_until_ack(self, call: SipCall, data: bytes, to: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        limit = TIMER_H
        if not call.confirmed:  # a first answer: the call must be confirmed within connect_timeout_s of its INVITE
            limit = min(TIMER_H, call.created + self.settings.server.connect_timeout_s - loop.time())
        acked, interval, deadline = call.acked, T1, loop.time() + limit
        while (left := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(acked.wait(), min(interval, left))
                return
            except TimeoutError:
                interval = min(2 * interval, T2)
                if deadline - loop.time() > 0:
                    self._udp.sendto(data, to)
        log.warning("call %s: no ACK after %.0f s; ending it", call.call_id, loop.time() - call.created)
        if call.confirmed:  # a re-INVITE's 2xx: the call was up, hang it up properly (RFC 3261 13.3.1.4)
            await self._end(call, f"no ACK came in {limit:.0f} s", bye=True)
            return
        # Never confirmed: maybe no caller at all (a spoofed source). One BYE, as 13.3.1.4
        # asks, but no Timer F: nothing of the call is kept waiting for its answer.
        self.counts["unconfirmed"] += 1
        await self._end(call, f"not confirmed (no ACK) in {limit:.0f} s", bye=True, wait=0)

    async def _end(self, call: SipCall, reason: str, bye: bool = False, wait: float = TIMER_F) -> int | None:
        """End a call: stop its media and its session, then with `bye` (the agent hangs up)
        send BYE and wait up to `wait` s for the answer. Returns the BYE's answer's status."""
        if call.ended:
            return None
        call.ended, call.end_reason = True, reason
        self.slots.release(call.slot)  # at once: the BYE dance needs no slot
        for task in call.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if call.rtp is not None:
            await call.rtp.close()
        if call.session is not None:
            await call.session.close()
            try:
                self.sessions.finish(call.session, "sip-out" if call.outbound else "sip-in", _party(call),
                                     _ended_by(reason), reason)
            except Exception:
                log.exception("call %s: its record failed", call.call_id)
        status = None
        if bye and call.answered and wait <= 0:  # one BYE, not waited for
            self._udp.sendto(call.dialog.request("BYE", self._via()).to_bytes(), call.dialog.peer)
        elif bye and call.answered:
            # The call stays in self.calls meanwhile: a BYE crossing ours gets its 200.
            answer = await self._send_request(call.dialog.request("BYE", self._via()), call.dialog.peer, wait)
            status = None if answer is None else answer.status
            if answer is None:
                log.warning("call %s: our BYE got no answer in %.0f s", call.call_id, wait)
        self.calls.pop(call.call_id, None)
        self.ended.append(call)
        call.done.set()
        log.info("call %s ended: %s", call.call_id, reason)
        return status

    # -- sending --------------------------------------------------------------------

    def _via(self) -> str:
        return f"SIP/2.0/UDP {hostport(self.advertise, self.port)};branch=z9hG4bK{uuid.uuid4().hex[:16]};rport"

    def _authorized(self, request: SipMessage, challenge: SipMessage, answered: dict[str, str]) -> SipMessage | None:
        """`request` again, answering the digest challenges of a 401/407 with sip.username
        (RFC 3261 22.2): CSeq + 1, a new branch, an Authorization or Proxy-Authorization for
        each. None when there are no credentials, or when a realm already answered
        (`answered`: realm -> nonce, kept across the tries of one request) challenges
        again with a nonce that is not stale: the credentials were refused."""
        assert challenge.status is not None and request.method is not None and request.uri is not None
        if self.digest is None:
            return None
        header = CHALLENGE_HEADER[challenge.status]
        try:
            challenges = [parse_challenge(header, value) for value in challenge.headers_named(header)]
        except DigestError as e:
            log.warning("cannot answer the %d to our %s: %s", challenge.status, request.method, e)
            return None
        if not challenges:
            return None
        answers = []
        for c in challenges:
            if c.realm in answered and not c.stale:
                return None
            answered[c.realm] = c.nonce
            answers.append((c.answer_header, self.digest.answer(c, request.method, request.uri)))
        replaced = {name for name, _ in answers}
        cseq = request.cseq[0] + 1
        call = self.calls.get(request.call_id)
        if call is not None:  # the dialog's next request must come after this one
            call.dialog.local_cseq = max(call.dialog.local_cseq, cseq)
        headers: list[tuple[str, str]] = []
        for name, value in request.headers:
            key = canonical_name(name)
            if key == "Via":  # ours has one; the new transaction gets a branch of its own
                headers.append(("Via", self._via()))
            elif key == "CSeq":
                headers.append(("CSeq", f"{cseq} {request.method}"))
            elif key not in replaced:
                headers.append((name, value))
        return SipMessage(method=request.method, uri=request.uri, headers=headers + answers, body=request.body)

    async def _send_request(self, request: SipMessage, to: tuple[str, int], timeout: float = TIMER_F) -> SipMessage | None:
        """Send a request other than INVITE as a client transaction (RFC 3261 17.1.2): resent
        on Timer E (T1, doubling up to T2) until a final answer, which is returned; None if
        none comes within `timeout` (Timer F). A 401/407 is answered once with sip.username
        (a request but CANCEL: RFC 3261 22.1 forbids challenging it)."""
        answered: dict[str, str] = {}
        while True:
            answer = await self._request_once(request, to, timeout)
            if answer is None or answer.status not in (401, 407) or request.method == "CANCEL":
                return answer
            retry = self._authorized(request, answer, answered)
            if retry is None:
                return answer
            request = retry

    async def _request_once(self, request: SipMessage, to: tuple[str, int], timeout: float) -> SipMessage | None:
        branch, method = request.via[0].branch, request.method
        assert branch is not None and method is not None  # a request with our _via()
        key = (branch, method)
        answers = self._transactions[key] = asyncio.Queue()
        data = request.to_bytes()
        loop = asyncio.get_running_loop()
        deadline, interval = loop.time() + timeout, T1
        try:
            while True:
                self._udp.sendto(data, to)
                resend_at = min(loop.time() + interval, deadline)
                while (left := resend_at - loop.time()) > 0:
                    try:
                        answer = await asyncio.wait_for(answers.get(), left)
                    except TimeoutError:
                        break
                    assert answer.status is not None  # _on_response queues responses only
                    if answer.status >= 200:
                        return answer
                    interval = T2  # a provisional answer: the final one is coming, resend slowly
                if loop.time() >= deadline:
                    return None
                interval = min(2 * interval, T2)
        finally:
            self._transactions.pop(key, None)

    def _response_bytes(self, request: SipMessage, addr, status: int, **kwargs) -> bytes:
        response = make_response(request, status, **kwargs)
        top = set_received_rport(request.via[0], *addr)
        for i, (name, _value) in enumerate(response.headers):  # the top Via records where it came from
            if name == "Via":
                response.headers[i] = ("Via", top.to_str())
                break
        return response.to_bytes()

    def _respond(self, request: SipMessage, addr, status: int, **kwargs) -> bytes:
        data = self._response_bytes(request, addr, status, **kwargs)
        self._udp.sendto(data, response_address(request.via[0], addr))
        return data

    def _request_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.counts["request_failed"] += 1
            log.error("SIP request failed", exc_info=task.exception())

    def _reject_malformed(self, data: bytes, addr, error: Exception) -> None:
        """A 400 (505 for another SIP version) when the message names enough to answer it
        (RFC 3261 21.4.1, 8.2.2), else drop it."""
        self.dropped += 1
        text = data[:8192].decode("utf-8", "replace")
        version = r"SIP/[0-9]+\.[0-9]+" if isinstance(error, UnsupportedVersion) else r"SIP/2\.0"
        if not re.match(rf"[A-Za-z]+ \S+ {version}\r?\n", text):
            return
        needed = ("Via", "From", "To", "Call-ID", "CSeq")
        wanted: dict[str, str] = {}
        for line in re.split(r"\r?\n", text):
            name, colon, value = line.partition(":")
            name = canonical_name(name)
            if colon and name in needed and name not in wanted:
                wanted[name] = value.strip()
        if len(wanted) < len(needed) or not all(wanted.values()):
            return
        if isinstance(error, UnsupportedVersion):
            status = "505 Version Not Supported"
        else:
            status = f"400 Bad Request ({_one_line(str(error))})"
        head = [f"SIP/2.0 {status}"] + [f"{name}: {wanted[name]}" for name in needed] + ["Content-Length: 0"]
        self._udp.sendto(("\r\n".join(head) + "\r\n\r\n").encode(), addr)


class SipServer(SipEndpoint):
    """Answers SIP calls on one UDP port with the agent; `ring_s` is how long it rings first."""

    def __init__(self, sessions: SessionFactory, settings: Settings, host: str, port: int,
                 advertise: str | None = None, allow_from: set[str] | None = None, ring_s: float = 0.0,
                 voice: str | None = None, slots: CallSlots | None = None) -> None:
        super().__init__(sessions, settings, host, port, advertise, allow_from, voice, slots)
        self.ring_s = ring_s
        self.draining = False  # set when `serve` stops taking calls (signaling/server.py drain())

    def _unavailable(self) -> str | None:
        if not self.sessions.ready:
            return "the models are still loading"
        if self.draining:
            return "shutting down"
        if not self.slots.free:
            return "call limit reached"
        return None

    async def _new_invite(self, msg: SipMessage, addr: tuple[str, int]) -> None:
        if not self.sessions.ready or self.draining:  # another node may take it (a dispatcher fails over on 503)
            why = "shutting down" if self.sessions.ready else "the models are still loading"
            self._respond(msg, addr, 503, reason=f"Service Unavailable ({why})", headers=[("Retry-After", "10")])
            return
        if self._unconfirmed_from(addr[0]) >= self.settings.server.max_unconfirmed_per_source:
            # One address must not hold every slot with INVITEs it never ACKs.
            self.counts["refused_unconfirmed"] += 1
            self._respond(msg, addr, 486, reason="Busy Here (too many unconfirmed calls from this address)")
            return
        if not self.slots.free:  # taken below, when the call is made (no await in between)
            self.counts["refused_call_limit"] += 1
            self._respond(msg, addr, 486, reason="Busy Here (call limit reached)")
            return
        content_type = (msg.header("Content-Type") or "").split(";")[0].strip().lower()
        if not msg.body or content_type != "application/sdp":
            self._respond(msg, addr, 488, headers=[("Accept", "application/sdp")],
                          reason="Not Acceptable Here (an SDP offer is needed)")
            return
        try:
            offer = parse_sdp(msg.body.decode("utf-8", "replace"))
            _, codec = answer_audio(offer, self.advertise, 0, 0)
        except NoCommonCodec:
            self._respond(msg, addr, 488, headers=[("Warning", '305 - "only PCMU and PCMA audio"')])
            return
        except SdpError as e:
            self._respond(msg, addr, 400, reason=f"Bad Request (SDP: {_one_line(str(e))})")
            return
        call = SipCall(_inbound_dialog(msg, addr), msg, self, source=addr)
        self.calls[call.call_id] = call
        self.slots.take(call.slot, "sip")
        self._respond(msg, addr, 100)
        call.provisional = self._respond(msg, addr, 180, to_tag=call.local_tag)
        if self.ring_s:
            await asyncio.sleep(self.ring_s)
        if call.ended:  # cancelled while ringing
            return
        sock = None
        try:
            sock = rtp_socket(self.host)
            answer, _ = answer_audio(offer, self.advertise, sock.getsockname()[1], random.getrandbits(31))
            await self._start_media(call, codec, sock)
        except Exception:
            log.exception("call %s: could not start", call.call_id)
            if call.rtp is None and sock is not None:
                sock.close()
            self._respond(msg, addr, 500)
            await self._end(call, "the media could not start")
            return
        if call.ended:  # cancelled while the media started: _end() ran before they were running
            await call.rtp.close()
            await call.session.close()
            return
        call.answered, call.local_sdp = True, answer.encode()
        ok = self._response_bytes(msg, addr, 200, to_tag=call.local_tag, body=call.local_sdp,
                                  content_type="application/sdp", headers=[("Contact", self.contact), ("Allow", ALLOW)])
        self._send_2xx(call, ok, msg.cseq[0], response_address(msg.via[0], addr))
        log.info("call %s answered (%s, RTP %d -> %s:%d)", call.call_id, codec.name, sock.getsockname()[1],
                 codec.remote_ip, codec.remote_port)

    def _unconfirmed_from(self, ip: str) -> int:
        return sum(1 for call in self.calls.values()
                   if not call.outbound and not call.confirmed and call.source is not None and call.source[0] == ip)


def _invite_key(invite: SipMessage, source: tuple[str, int] | None) -> tuple:
    """What identifies an INVITE's server transaction (RFC 3261 17.2.3): its top Via's branch
    and sent-by, its CSeq, and where it came from. (For an RFC 2543 peer, whose branches are
    not unique, the From tag and Request-URI stand in, as 17.2.3 allows.)"""
    via = invite.via[0]
    return via.branch, via.host.lower(), via.port, invite.cseq, invite.from_tag, invite.uri, source


def _inbound_dialog(invite: SipMessage, source: tuple[str, int]) -> Dialog:
    """The dialog an INVITE we answer sets up (RFC 3261 12.1.1): our side is its To with our
    tag; our requests go to its Contact, through its Record-Route, sent where it came from
    (the Contact may be a private address behind NAT)."""
    tag = uuid.uuid4().hex[:10]
    remote, uri = invite.header("From"), invite.uri
    assert remote is not None and uri is not None  # a parsed request: From is mandatory
    return Dialog(call_id=invite.call_id, local_tag=tag, local=f"{invite.header('To')};tag={tag}",
                  remote=remote, remote_target=contact_uri(invite) or uri,
                  peer=response_address(invite.via[0], source), route=invite.headers_named("Record-Route"))


def _refusal(msg: SipMessage) -> tuple[int, list[tuple[str, str]]] | None:
    """The answer RFC 3261 8.2.1-8.2.2 gives a request (not an ACK) before it is looked at,
    if any: 405/501 for a method we do not do, 416 for a Request-URI scheme we do not know,
    420 naming the extensions it requires that we lack."""
    if msg.method in KNOWN_UNSUPPORTED:
        return 405, [("Allow", ALLOW)]
    if msg.method not in HANDLED:
        return 501, [("Allow", ALLOW)]
    assert msg.uri is not None  # a request
    try:
        parse_uri(msg.uri)
    except UnsupportedUriScheme:
        return 416, []
    if msg.method != "CANCEL":  # a CANCEL never gets a 420 (8.2.2.3)
        unsupported = [tag for tag in msg.headers_named("Require") if tag.lower() not in SUPPORTED_EXTENSIONS]
        if unsupported:
            return 420, [("Unsupported", ", ".join(unsupported))]
    return None


def rtp_socket(host: str) -> socket.socket:
    """A UDP socket for a call's RTP on any free port of `host`: our SDP names its port."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((host, 0))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def contact_uri(msg: SipMessage) -> str | None:
    contact = msg.header("Contact")
    if not contact:
        return None
    try:
        return str(parse_name_addr(split_top(contact, ",")[0]).uri)
    except SipParseError:
        return None


def _samples(session: CallSession):
    frame = session.outbound.get_nowait()
    return None if frame is None else frame.samples


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _one_line(text: str, limit: int = 100) -> str:
    return re.sub(r"[\r\n]", " ", text)[:limit]


def _party(call: SipCall) -> dict[str, str | None]:
    """The other side of a call, for its record: the INVITE's From and To, its Call-ID
    and where the peer's messages come from."""
    peer = call.source if call.source is not None else call.dialog.peer
    return {"from": call.invite.header("From"), "to": call.invite.header("To"), "call_id": call.call_id,
            "address": hostport(*peer) if peer else None}


# Who ended a call, by the start of its end reason (the reasons _end() is given).
_ENDED_BY = (("agent hung up", "agent"), ("the agent hung up", "agent"), ("the agent transferred", "agent"),
             ("the agent shut down", "server"),
             ("the other side hung up", "caller"), ("the caller", "caller"), ("no RTP", "network"),
             ("no ACK", "network"), ("not confirmed", "network"))


def _ended_by(reason: str) -> str:
    return next((by for start, by in _ENDED_BY if reason.startswith(start)), "error")


def _uri_of(name_addr: str) -> str:
    """`<sip:...>` of a From/To value, without its tag."""
    return name_addr.split(";tag=")[0].strip()


def _sipfrag_status(body: bytes) -> str | None:
    """The status of a message/sipfrag body's status line, "200 OK" (None when there is none)."""
    first = body.decode("utf-8", "replace").strip().splitlines()[:1]
    parts = first[0].split(None, 2) if first else []
    if len(parts) >= 2 and parts[0].upper().startswith("SIP/") and parts[1].isdigit():
        return " ".join(parts[1:])
    return None
