"""Registration (RFC 3261 10): `serve` with sip.register binds its SIP contact to an
address of record at a registrar (a PBX extension, a SIP trunk account), so that calls to
that account reach the agent.

    REGISTER (Expires: sip.register_expires) ─► 401/407 ─► REGISTER with digest credentials
    ─► 200 OK (the granted expiry) ─► again at half of it, or REFRESH_MARGIN_S before its end
    a failure or no answer ─► again after a backoff (RETRY_MIN_S doubling to RETRY_MAX_S)
    shutdown ─► REGISTER with Expires: 0 (the binding is removed)

The state ("registering", "registered", "failed: ...", "unregistered") shows in /health and
as a Prometheus gauge; the log says each change of state once, not each attempt. A
registrar that never answers does not hold up the start: registration runs beside it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING

from signaling.sip.client import resolve
from signaling.sip.endpoint import ALLOW
from signaling.sip.message import SipMessage, SipParseError, SipUri, parse_uri

if TYPE_CHECKING:
    from signaling.sip.endpoint import SipEndpoint

log = logging.getLogger(__name__)

REFRESH_MARGIN_S = 30.0
RETRY_MIN_S, RETRY_MAX_S = 5.0, 300.0
UNREGISTER_WAIT_S = 2.0


class Registration:
    """Keeps one binding of `endpoint`'s contact at `aor` (sip:user@registrar[:port])."""

    def __init__(self, endpoint: SipEndpoint, aor: SipUri, registrar: tuple[str, int], expires: int,
                 contact_host: str) -> None:
        self.endpoint = endpoint
        self.aor = aor
        self.registrar = registrar
        self.expires = expires
        self.contact = f"<sip:{aor.user or 'agent'}@{_hostport(contact_host, endpoint.port)}>"
        self.call_id = f"{uuid.uuid4().hex}@{contact_host}"
        self.tag = uuid.uuid4().hex[:10]
        self.cseq = 0
        self.state = "registering"
        self.granted: int | None = None  # the expiry the registrar granted, seconds
        self.registrations = 0  # successful REGISTERs (refreshes included)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        backoff = RETRY_MIN_S
        while True:
            problem: str | None
            try:
                answer = await self._register(self.expires)
            except Exception as e:  # noqa: BLE001 - a socket error: try again later
                answer, problem = None, f"{type(e).__name__}: {e}"
            else:
                problem = _problem(answer)
            if problem is None:
                assert answer is not None  # a 2xx
                self.granted = _granted(answer, self.contact, self.expires)
                self.registrations += 1
                self._set_state("registered", f"for {self.granted} s")
                backoff = RETRY_MIN_S
                await asyncio.sleep(max(1.0, min(self.granted / 2, self.granted - REFRESH_MARGIN_S)))
            else:
                self._set_state(f"failed: {problem}", f"trying again in {backoff:.0f} s")
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, RETRY_MAX_S)

    async def _register(self, expires: int, timeout: float | None = None) -> SipMessage | None:
        self.cseq += 1
        host = self.aor.host if self.aor.port is None else f"{self.aor.host}:{self.aor.port}"
        aor = f"sip:{self.aor.user}@{host}" if self.aor.user else f"sip:{host}"
        request = SipMessage(method="REGISTER", uri=f"sip:{host}", headers=[
            ("Via", self.endpoint._via()), ("Max-Forwards", "70"), ("From", f"<{aor}>;tag={self.tag}"),
            ("To", f"<{aor}>"), ("Call-ID", self.call_id), ("CSeq", f"{self.cseq} REGISTER"),
            ("Contact", self.contact), ("Expires", str(expires)), ("Allow", ALLOW)])
        kwargs = {} if timeout is None else {"timeout": timeout}
        answer = await self.endpoint._send_request(request, self.registrar, **kwargs)
        if answer is not None:
            self.cseq = max(self.cseq, answer.cseq[0])  # an answered challenge took the next CSeq
        return answer

    def _set_state(self, state: str, detail: str) -> None:
        if state != self.state:
            (log.info if state == "registered" else log.warning)("SIP registration at %s: %s (%s)",
                                                                 self.aor, state, detail)
        self.state = state

    async def stop(self) -> None:
        """Stop refreshing and remove the binding (Expires: 0), waiting a moment for it."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.registrations:
            try:
                answer = await self._register(0, timeout=UNREGISTER_WAIT_S)
                if _problem(answer) is None:
                    log.info("SIP registration at %s: removed", self.aor)
            except Exception as e:  # noqa: BLE001 - shutting down either way
                log.debug("unregistering raised %s", e)
        self.state = "unregistered"


def _problem(answer: SipMessage | None) -> str | None:
    if answer is None:
        return "no answer from the registrar"
    assert answer.status is not None
    if 200 <= answer.status < 300:
        return None
    what = f"{answer.status} {answer.reason or ''}".strip()[:80]
    if answer.status in (401, 407):
        return f"the registrar refused the credentials ({what})"
    return f"the registrar answered {what}"


def _granted(answer: SipMessage, contact: str, asked: int) -> int:
    """The expiry granted to our contact: its Contact's expires parameter, else Expires."""
    ours = contact.strip("<>").split("@")[-1]
    try:
        for value in answer.headers_named("Contact"):
            if ours in value and "expires=" in value.lower():
                return int(value.lower().split("expires=")[1].split(";")[0].split(",")[0].strip())
        header = answer.header("Expires")
        return int(header) if header is not None else asked
    except (ValueError, SipParseError):
        return asked


def parse_registrar(text: str) -> tuple[SipUri, tuple[str, int]]:
    """sip.register: (the address of record, where REGISTERs go). ValueError, one line."""
    try:
        uri = parse_uri(text.strip())
    except SipParseError as e:
        raise ValueError(f"sip.register: bad SIP URI {text!r} ({e}); expected sip:USER@REGISTRAR[:PORT]") from None
    if uri.scheme != "sip":
        raise ValueError(f"sip.register: only sip: URIs, got {text!r}")
    try:
        return uri, resolve(uri)
    except ValueError as e:
        raise ValueError(f"sip.register: {e}") from None


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
