"""SIP user agent server over UDP (RFC 3261): phone calls from PBXs, SBCs and trunks.

    INVITE ─► 100 Trying, 180 Ringing, 200 OK + SDP answer (resent on timer T1..T2
              until the ACK comes) ─► RtpSession (G.711) <─> CallSession
    BYE ─► 200, the call ends      CANCEL before the answer ─► 200, then 487 to the INVITE
    OPTIONS ─► 200 (keepalives)    no dialog ─► 481   no codec ─► 488   call limit ─► 486

Responses go where RFC 3261 18.2.2 and RFC 3581 (rport) say, so callers behind NAT get
them. Anything malformed is answered 400 when it can be, dropped otherwise; nothing a
caller sends may take the server down.

The agent hangs up with a BYE on shutdown and when the ACK never comes.
Not built yet (see the issue): TCP, outbound calls (UAC), echo-safe barge-in.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import uuid
from collections import deque
from dataclasses import dataclass, field

from agent.config import Settings
from agent.models import UnifiedModelManager
from agent.session import OUT_RATE, CallSession

from .rtp import RtpSession
from .sdp import NoCommonCodec, SdpError, answer_audio, parse_sdp
from .sip_message import (SipMessage, SipParseError, canonical_name, make_response, parse_message, parse_name_addr,
                          response_address, set_received_rport, split_top)

log = logging.getLogger(__name__)
T1, T2 = 0.5, 4.0  # RFC 3261 timers: the 200 OK is resent at T1, 2 T1, ... capped at T2
TIMER_H = 64 * T1  # give up waiting for the ACK
ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS"
KNOWN_UNSUPPORTED = {"REGISTER", "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "INFO", "UPDATE", "PRACK", "PUBLISH"}


@dataclass
class SipCall:
    """One phone call: its dialog, its RTP stream and its CallSession."""

    call_id: str
    invite: SipMessage
    source: tuple[str, int]  # where the INVITE came from (responses go by its Via)
    local_tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    answered: bool = False
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False
    rtp: RtpSession | None = None
    session: CallSession | None = None
    final_response: bytes | None = None
    dtmf: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)


class SipServer(asyncio.DatagramProtocol):
    """Answers SIP calls on one UDP port with the agent. `advertise` is the address put in
    SDP and Contact (the host's address as callers reach it)."""

    def __init__(self, models: UnifiedModelManager, settings: Settings, host: str, port: int,
                 advertise: str | None = None, allow_from: set[str] | None = None, ring_s: float = 0.0) -> None:
        self.models = models
        self.settings = settings
        self.host = host
        self.port = port
        self.advertise = advertise or host
        self.allow_from = allow_from
        self.ring_s = ring_s
        self.calls: dict[str, SipCall] = {}
        self.ended: deque[SipCall] = deque(maxlen=100)  # recent calls, for health and tests
        self.transport: asyncio.DatagramTransport | None = None
        self.dropped = 0

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, self.port))
        self.port = self.transport.get_extra_info("sockname")[1]
        log.info("SIP on udp %s:%d", self.host, self.port)
        return self.port

    def connection_made(self, transport) -> None:
        self.transport = transport

    async def close(self) -> None:
        """Hang up every call (BYE) and stop listening."""
        await asyncio.gather(*(self._end(call, bye=True) for call in list(self.calls.values())),
                             return_exceptions=True)
        if self.transport is not None:
            self.transport.close()

    # -- receiving ------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = parse_message(data)
        except SipParseError as e:
            self._reject_malformed(data, addr, e)
            return
        if not msg.is_request:
            return  # responses to our BYEs: nothing to do
        task = asyncio.ensure_future(self._request(msg, addr))
        task.add_done_callback(_log_failure)

    async def _request(self, msg: SipMessage, addr: tuple[str, int]) -> None:
        if self.allow_from is not None and addr[0] not in self.allow_from:
            self._respond(msg, addr, 403, reason="Forbidden (not on the allow-list)")
            return
        method = msg.method
        if method == "INVITE":
            await self._invite(msg, addr)
        elif method == "ACK":
            call = self.calls.get(msg.call_id)
            if call is not None:
                call.acked.set()
        elif method == "BYE":
            call = self.calls.get(msg.call_id)
            if call is None or msg.to_tag != call.local_tag:
                self._respond(msg, addr, 481)
                return
            self._respond(msg, addr, 200)
            await self._end(call)
        elif method == "CANCEL":
            await self._cancel(msg, addr)
        elif method == "OPTIONS":
            self._respond(msg, addr, 200, headers=[("Allow", ALLOW), ("Accept", "application/sdp")])
        elif method in KNOWN_UNSUPPORTED:
            self._respond(msg, addr, 405, headers=[("Allow", ALLOW)])
        else:
            self._respond(msg, addr, 501, headers=[("Allow", ALLOW)])

    async def _invite(self, msg: SipMessage, addr: tuple[str, int]) -> None:
        call = self.calls.get(msg.call_id)
        if msg.to_tag:  # a re-INVITE inside the dialog: keep the media as it is
            if call is None or msg.to_tag != call.local_tag:
                self._respond(msg, addr, 481)
            elif call.final_response is not None:
                self._send(call.final_response, call)
            return
        if call is not None:  # a retransmission of the INVITE
            if call.final_response is not None:
                self._send(call.final_response, call)
            return
        if not self.models.ready:
            self._respond(msg, addr, 503, reason="Service Unavailable (the models are still loading)",
                          headers=[("Retry-After", "10")])
            return
        if len(self.calls) >= self.settings.server.max_calls:
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
            self._respond(msg, addr, 400, reason=f"Bad Request (SDP: {e})"[:120])
            return
        call = SipCall(msg.call_id, msg, addr)
        self.calls[msg.call_id] = call
        self._respond(msg, addr, 100)
        self._respond(msg, addr, 180, to_tag=call.local_tag)
        if self.ring_s:
            await asyncio.sleep(self.ring_s)
        if call.ended:  # cancelled while ringing
            return
        try:
            session = CallSession(self.models, self.settings)
            rtp = RtpSession(codec.name, codec.payload_type, codec.dtmf_payload_type,
                             (codec.remote_ip, codec.remote_port), lambda: _samples(session), OUT_RATE,
                             lambda samples: session.push_audio(samples, 8000), call.dtmf.append)
            port = await rtp.start(self.host, 0)
            answer, _ = answer_audio(offer, self.advertise, port, random.getrandbits(31))
        except Exception:
            log.exception("call %s: could not start", msg.call_id)
            self.calls.pop(msg.call_id, None)
            self._respond(msg, addr, 500)
            return
        call.session, call.rtp, call.answered = session, rtp, True
        contact = f"<sip:agent@{_hostport(self.advertise, self.port)}>"
        ok = self._response_bytes(msg, addr, 200, to_tag=call.local_tag, body=answer.encode(),
                                  content_type="application/sdp", headers=[("Contact", contact), ("Allow", ALLOW)])
        call.final_response = ok
        self._send(ok, call)
        call.tasks.append(asyncio.ensure_future(self._resend_until_ack(call, ok)))
        log.info("call %s answered (%s, RTP %d -> %s:%d)", call.call_id, codec.name, port,
                 codec.remote_ip, codec.remote_port)

    async def _resend_until_ack(self, call: SipCall, ok: bytes) -> None:
        interval, waited = T1, 0.0
        while waited < TIMER_H:
            try:
                await asyncio.wait_for(call.acked.wait(), interval)
                return
            except asyncio.TimeoutError:
                waited += interval
                interval = min(2 * interval, T2)
                self._send(ok, call)
        log.warning("call %s: no ACK after %.0f s; ending it", call.call_id, TIMER_H)
        await self._end(call, bye=True)

    async def _cancel(self, msg: SipMessage, addr: tuple[str, int]) -> None:
        call = self.calls.get(msg.call_id)
        branch = msg.via[0].branch if msg.via else None
        if call is None or not call.invite.via or call.invite.via[0].branch != branch:
            self._respond(msg, addr, 481)
            return
        self._respond(msg, addr, 200)
        if not call.answered:
            call.ended = True
            self.calls.pop(call.call_id, None)
            terminated = self._response_bytes(call.invite, call.source, 487, to_tag=call.local_tag)
            call.final_response = terminated
            self._send(terminated, call)

    async def _end(self, call: SipCall, bye: bool = False) -> None:
        """End a call; `bye` when the agent hangs up (the caller's BYE needs none back)."""
        if call.ended:
            return
        call.ended = True
        if bye and call.answered:
            self._send(self._bye(call), call)
        self.calls.pop(call.call_id, None)
        for task in call.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if call.rtp is not None:
            await call.rtp.close()
        if call.session is not None:
            await call.session.close()
        self.ended.append(call)
        log.info("call %s ended", call.call_id)

    # -- sending --------------------------------------------------------------------

    def _response_bytes(self, request: SipMessage, addr, status: int, **kwargs) -> bytes:
        response = make_response(request, status, **kwargs)
        top = set_received_rport(request.via[0], *addr)
        for i, (name, _value) in enumerate(response.headers):  # the top Via records where it came from
            if name == "Via":
                response.headers[i] = ("Via", top.to_str())
                break
        return response.to_bytes()

    def _respond(self, request: SipMessage, addr, status: int, **kwargs) -> None:
        data = self._response_bytes(request, addr, status, **kwargs)
        self.transport.sendto(data, response_address(request.via[0], addr))

    def _send(self, data: bytes, call: SipCall) -> None:
        self.transport.sendto(data, response_address(call.invite.via[0], call.source))

    def _bye(self, call: SipCall) -> bytes:
        """The agent's BYE: its side of the dialog is the INVITE's To (with our tag), sent
        where the INVITE came from (the Contact may be a private address behind NAT)."""
        invite = call.invite
        bye = SipMessage(method="BYE", uri=_contact_uri(invite) or invite.uri, headers=[
            ("Via", f"SIP/2.0/UDP {_hostport(self.advertise, self.port)};branch=z9hG4bK{uuid.uuid4().hex[:16]};rport"),
            ("Max-Forwards", "70"),
            ("From", f"{invite.header('To')};tag={call.local_tag}"),
            ("To", invite.header("From")),
            ("Call-ID", call.call_id),
            ("CSeq", "1 BYE"),
        ])
        return bye.to_bytes()

    def _reject_malformed(self, data: bytes, addr, error: Exception) -> None:
        """A 400 when the message names enough to answer it (RFC 3261 21.4.1), else drop it."""
        self.dropped += 1
        text = data[:8192].decode("utf-8", "replace")
        if not re.match(r"[A-Za-z]+ \S+ SIP/2\.0\r?\n", text):
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
        reason = re.sub(r"[\r\n]", " ", str(error))[:100]
        head = ([f"SIP/2.0 400 Bad Request ({reason})"] + [f"{name}: {wanted[name]}" for name in needed]
                + ["Content-Length: 0"])
        self.transport.sendto(("\r\n".join(head) + "\r\n\r\n").encode(), addr)


def _contact_uri(msg: SipMessage) -> str | None:
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


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("SIP request failed", exc_info=task.exception())
