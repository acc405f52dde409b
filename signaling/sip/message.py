"""SIP message syntax (RFC 3261 sections 7, 8.2.6, 18, 20 and 25): parse, inspect, build.

Pure code, no I/O: the user agent, transactions and RTP are built on top of it.
parse_message() is the one door for bytes off the wire. It raises SipParseError (a
ValueError) and nothing else for whatever it cannot accept, so a UDP listener can answer
400 or drop the datagram without guarding against other exceptions; the RFC 4475 torture
messages in tests/signaling/test_sip_message.py say what is accepted. Header values are kept as
received (unfolded, trimmed) and parsed on demand; the headers a response must be routed
and matched with (Via, To, From, Call-ID, CSeq, Contact, Content-Length) are checked up
front, so their accessors cannot fail on a parsed message.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

SIP_VERSION = "SIP/2.0"
MAX_HEADERS = 200
MAX_HEADER_LINE = 8192  # bytes of one header after unfolding
MAX_LINES = 1000  # physical lines, so folding cannot dodge MAX_HEADERS cheaply
DEFAULT_PORT = 5060
DEFAULT_TLS_PORT = 5061

# RFC 3261 7.3.3 compact forms (and a few later ones), all mapped to lower-case long names.
COMPACT = {
    "i": "call-id", "f": "from", "t": "to", "v": "via", "m": "contact", "l": "content-length",
    "c": "content-type", "k": "supported", "s": "subject", "e": "content-encoding", "o": "event",
    "r": "refer-to", "u": "allow-events", "b": "referred-by", "x": "session-expires",
}
# How to_bytes() spells the headers it knows; others keep the name they came with.
_CANONICAL = {n.lower(): n for n in (
    "Accept", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow", "Allow-Events",
    "Authentication-Info", "Authorization", "Call-ID", "Call-Info", "Contact", "Content-Disposition",
    "Content-Encoding", "Content-Language", "Content-Length", "Content-Type", "CSeq", "Date",
    "Error-Info", "Event", "Expires", "From", "In-Reply-To", "Max-Forwards", "MIME-Version",
    "Min-Expires", "Min-SE", "Organization", "P-Asserted-Identity", "Path", "Priority", "Privacy",
    "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Require", "RAck", "Reason", "Record-Route",
    "Refer-To", "Referred-By", "Reply-To", "Require", "Retry-After", "Route", "RSeq", "Server",
    "Service-Route", "Session-Expires", "Subject", "Subscription-State", "Supported", "Timestamp",
    "To", "Unsupported", "User-Agent", "Via", "Warning", "WWW-Authenticate")}
# Headers whose grammar is a comma-separated list (#element). Not the *-Authenticate /
# *-Authorization family (commas inside their credentials) nor Date ("Sat, 15 Oct 2005").
_LIST_HEADERS = frozenset({
    "accept", "accept-encoding", "accept-language", "alert-info", "allow", "allow-events",
    "call-info", "contact", "content-encoding", "content-language", "error-info", "in-reply-to",
    "p-asserted-identity", "path", "proxy-require", "reason", "record-route", "require", "route",
    "service-route", "supported", "unsupported", "via", "warning"})
# A second copy of these makes the message ambiguous (RFC 4475 multi01, mcl01).
_SINGLE = ("to", "from", "call-id", "cseq", "content-length", "max-forwards", "content-type")
_MANDATORY = ("to", "from", "call-id", "cseq", "via")

REASONS = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 415: "Unsupported Media Type",
    416: "Unsupported URI Scheme", 420: "Bad Extension", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here", 491: "Request Pending",
    500: "Server Internal Error", 501: "Not Implemented", 503: "Service Unavailable",
    504: "Server Time-out", 505: "Version Not Supported", 513: "Message Too Large", 603: "Decline",
}

_TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
_TOKEN_RE = re.compile(_TOKEN)
_GEN_VALUE = re.compile(r'[A-Za-z0-9\-.!%*_+`\'~:\[\]]+|"(?:[^"\\]|\\.)*"', re.DOTALL)  # token/host/quoted
_SCHEME_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):(.+)", re.DOTALL)
_URI_FORBIDDEN = re.compile(r'[\x00-\x20\x7f<>"]')
_USER = re.compile(r"[A-Za-z0-9\-_.!~*'()&=+$,;?/%]+")
_PASSWORD = re.compile(r"[A-Za-z0-9\-_.!~*'()&=+$,%]*")
_URI_PARAM = re.compile(r"[A-Za-z0-9\-_.!~*'()\[\]/:&+$%]+")
_URI_HEADER = re.compile(r"[A-Za-z0-9\-_.!~*'()\[\]/?:+$%]*")
_TEL_NUMBER = re.compile(r"\+?[0-9A-Fa-f*#().\-]+")
_HOST = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._\-]*)"
_URI_HOSTPORT = re.compile(_HOST + r"(?::([0-9]{1,5}))?")
_VIA_SENT_BY = re.compile(_HOST + r"(?:[ \t]*:[ \t]*([0-9]{1,5}))?")  # COLON is SWS ":" SWS there
_VIA_PROTOCOL = re.compile(rf"[ \t]*({_TOKEN})[ \t]*/[ \t]*({_TOKEN})[ \t]*/[ \t]*({_TOKEN})[ \t]+(.*)", re.DOTALL)
_DIGITS = re.compile(r"[0-9]{1,10}")
_CSEQ = re.compile(rf"([0-9]{{1,10}})[ \t]+({_TOKEN})")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class SipParseError(ValueError):
    """Malformed SIP that cannot be accepted; str() is one line."""


class UnsupportedUriScheme(SipParseError):
    """A well-formed URI whose scheme is not sip, sips or tel (a request gets 416)."""


class UnsupportedVersion(SipParseError):
    """A start line with a SIP version other than 2.0 (a request gets 505)."""


def _q(value: str) -> str:
    """A value quoted for an error message: one line, bounded."""
    return repr(value if len(value) <= 60 else value[:57] + "...")


def _key(name: str) -> str:
    low = name.strip().lower()
    return COMPACT.get(low, low)


def canonical_name(name: str) -> str:
    """The long, conventionally capitalised spelling of a header name ("v" -> "Via")."""
    return _CANONICAL.get(_key(name), name.strip())


def split_top(value: str, sep: str) -> list[str]:
    """value split at the separators outside quoted strings and <...>, items trimmed.

    Empty items are kept so that strict callers can refuse ",," or ";;"."""
    items: list[str] = []
    start, depth, quoted, i, n = 0, 0, False, 0, len(value)
    while i < n:
        ch = value[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            if depth:
                raise SipParseError(f"nested '<' in {_q(value)}")
            depth = 1
        elif ch == ">":
            if not depth:
                raise SipParseError(f"unbalanced '>' in {_q(value)}")
            depth = 0
        elif ch == sep and not depth:
            items.append(value[start:i].strip(" \t"))
            start = i + 1
        i += 1
    if quoted or depth:
        raise SipParseError(f"unterminated quoted string or '<' in {_q(value)}")
    items.append(value[start:].strip(" \t"))
    return items


def _read_quoted(text: str, start: int) -> tuple[str, int]:
    """text[start] is '"': the unescaped content and the index after the closing quote."""
    out: list[str] = []
    i, n = start + 1, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n:
            out.append(text[i + 1])
            i += 2
        elif ch == '"':
            return "".join(out), i + 1
        else:
            out.append(ch)
            i += 1
    raise SipParseError(f"unterminated quoted string in {_q(text)}")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parse_params(items: Iterable[str], what: str) -> dict[str, str | None]:
    """generic-param list (RFC 3261 25.1): name [SWS "=" SWS value], names case-insensitive."""
    params: dict[str, str | None] = {}
    for item in items:
        name, eq, value = item.partition("=")
        name, value = name.strip(" \t"), value.strip(" \t")
        if not _TOKEN_RE.fullmatch(name):
            raise SipParseError(f"bad {what} parameter {_q(item)}")
        if eq and not _GEN_VALUE.fullmatch(value):
            raise SipParseError(f"bad value of {what} parameter {_q(item)}")
        params[name.lower()] = value if eq else None
    return params


def _params_str(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def _port(digits: str | None, text: str) -> int | None:
    if digits is None:
        return None
    port = int(digits)
    if not 0 < port < 65536:
        raise SipParseError(f"bad port in {_q(text)}")
    return port


def _check_host(host: str, text: str) -> None:
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise SipParseError(f"bad IPv6 reference in {_q(text)}") from None


def _hostport(host: str, port: int | None) -> str:
    return host if port is None else f"{host}:{port}"


def _bare(host: str) -> str:
    """An IPv6 reference without its brackets, as sockets want it."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


# ---------------------------------------------------------------------------- URIs


@dataclass
class SipUri:
    """A sip:, sips: or tel: URI. Values stay escaped as received (%41 is not decoded), so
    str() gives back what was parsed; the scheme and parameter names are lower-cased, being
    case-insensitive. host keeps an IPv6 reference's brackets. A tel: URI's number is in user."""

    scheme: str = "sip"
    user: str | None = None
    host: str = ""
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    password: str | None = None

    def __str__(self) -> str:
        if self.scheme == "tel":
            return f"tel:{self.user}{_params_str(self.params)}"
        out = f"{self.scheme}:"
        if self.user is not None:
            out += self.user + ("" if self.password is None else f":{self.password}") + "@"
        out += _hostport(self.host, self.port) + _params_str(self.params)
        if self.headers:
            out += "?" + "&".join(f"{k}={v}" for k, v in self.headers.items())
        return out


def _uri_params(items: list[str], text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not _URI_PARAM.fullmatch(name) or (eq and not _URI_PARAM.fullmatch(value)):
            raise SipParseError(f"bad URI parameter in {_q(text)}")
        params[name.lower()] = value if eq else None
    return params


def parse_uri(text: str) -> SipUri:
    """A sip/sips/tel URI (RFC 3261 19.1, RFC 3966). Any other well-formed absolute URI raises
    UnsupportedUriScheme; anything malformed (whitespace, <>, a bad host...) SipParseError."""
    match = _SCHEME_URI.fullmatch(text)
    if match is None or _URI_FORBIDDEN.search(text):
        raise SipParseError(f"bad URI {_q(text)}")
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "tel":
        number, *items = rest.split(";")
        if not _TEL_NUMBER.fullmatch(number):
            raise SipParseError(f"bad tel URI {_q(text)}")
        return SipUri("tel", number, "", None, _uri_params(items, text))
    if scheme not in ("sip", "sips"):
        raise UnsupportedUriScheme(f"unsupported URI scheme {scheme!r}")
    user = password = None
    if "@" in rest:
        # '@' can only end the userinfo: params and headers may not hold it unescaped,
        # while the user part may hold ';' and '?' (RFC 4475 semiuri, intmeth).
        userinfo, rest = rest.split("@", 1)
        user, colon, secret = userinfo.partition(":")
        if not _USER.fullmatch(user) or not _PASSWORD.fullmatch(secret):
            raise SipParseError(f"bad user part in {_q(text)}")
        password = secret if colon else None
    rest, question, query = rest.partition("?")
    hostport, *items = rest.split(";")
    match = _URI_HOSTPORT.fullmatch(hostport)
    if match is None:
        raise SipParseError(f"bad host in {_q(text)}")
    _check_host(match.group(1), text)
    headers: dict[str, str] = {}
    if question:
        for item in query.split("&"):
            name, eq, value = item.partition("=")
            if not name or not eq or not _URI_HEADER.fullmatch(name) or not _URI_HEADER.fullmatch(value):
                raise SipParseError(f"bad URI header in {_q(text)}")
            headers[name] = value
    return SipUri(scheme, user, match.group(1), _port(match.group(2), text), _uri_params(items, text),
                  headers, password)


@dataclass
class NameAddr:
    """A To/From/Contact/Route value: optional display name (unescaped), URI, header params."""

    display_name: str | None
    uri: SipUri
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def __str__(self) -> str:
        out = f"<{self.uri}>"
        if self.display_name:
            out = f"{_quote(self.display_name)} {out}"
        return out + _params_str(self.params)


def _split_name_addr(value: str) -> tuple[str | None, str, dict[str, str | None]]:
    """(display name, URI text, header params) of name-addr / addr-spec, URI not parsed."""
    text = value.strip(" \t")
    display: str | None = None
    bracketed: str | None = None
    if text.startswith('"'):
        display, end = _read_quoted(text, 0)
        bracketed = text[end:].lstrip(" \t")
        if not bracketed.startswith("<"):
            raise SipParseError(f"quoted display name without <URI> in {_q(value)}")
    elif "<" in text:
        cut = text.index("<")
        words = text[:cut].split()
        # An unquoted display name is tokens only (RFC 4475 baddn: "Bell, Alexander").
        if any(not _TOKEN_RE.fullmatch(w) for w in words):
            raise SipParseError(f"display name must be quoted in {_q(value)}")
        display = " ".join(words) or None
        bracketed = text[cut:]
    if bracketed is not None:
        close = bracketed.find(">")
        if close < 0:
            raise SipParseError(f"missing '>' in {_q(value)}")
        uri_text, tail = bracketed[1:close], bracketed[close + 1:]
    else:
        # addr-spec: the URI ends at the first ';' (the params after it are header params),
        # so a URI with ',', '?' or ';' of its own must be in <> (RFC 3261 20; 4475 regbadct).
        match = re.match(r"[^;\s]*", text)
        assert match is not None  # it matches the empty string at least
        uri_text = match.group(0)
        tail = text[len(uri_text):]
        if "?" in uri_text or "," in uri_text:
            raise SipParseError(f"URI with headers must be enclosed in <> in {_q(value)}")
    tail = tail.strip(" \t")
    if tail and not tail.startswith(";"):
        raise SipParseError(f"junk after the address in {_q(value)}")
    params = _parse_params(split_top(tail[1:], ";") if tail else [], "header")
    return display, uri_text, params


def parse_name_addr(value: str) -> NameAddr:
    """Parse a name-addr or addr-spec with header params (To, From, Contact, Route...)."""
    display, uri_text, params = _split_name_addr(value)
    return NameAddr(display, parse_uri(uri_text), params)


def _check_name_addr(value: str) -> None:
    """Syntax check that lets unknown URI schemes through: RFC 4475 unksm2 must parse."""
    _, uri_text, _ = _split_name_addr(value)
    try:
        parse_uri(uri_text)
    except UnsupportedUriScheme:
        pass


# ---------------------------------------------------------------------------- Via


@dataclass
class Via:
    """One Via value. params keep their order; names are lower-case, values as received
    (a param without value, e.g. a bare rport, maps to None)."""

    transport: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    def to_str(self) -> str:
        return f"SIP/2.0/{self.transport} {_hostport(self.host, self.port)}{_params_str(self.params)}"


def parse_via(value: str) -> Via:
    """One via-parm: sent-protocol LWS sent-by *(SEMI via-params), LWS allowed around '/', ':', ';', '='."""
    match = _VIA_PROTOCOL.fullmatch(value)
    if match is None:
        raise SipParseError(f"bad Via {_q(value)}")
    name, version, transport, rest = match.groups()
    if name.upper() != "SIP" or version != "2.0":
        raise SipParseError(f"Via is not SIP/2.0: {_q(value)}")
    sent_by, *items = split_top(rest, ";")
    match = _VIA_SENT_BY.fullmatch(sent_by)
    if match is None:
        raise SipParseError(f"bad Via sent-by in {_q(value)}")
    _check_host(match.group(1), value)
    return Via(transport.upper(), match.group(1), _port(match.group(2), value), _parse_params(items, "Via"))


def _same_address(host: str, ip: str) -> bool:
    try:
        return ipaddress.ip_address(_bare(host)) == ipaddress.ip_address(_bare(ip))
    except ValueError:
        return False  # a domain name never equals the source address (RFC 3261 18.2.1)


def set_received_rport(via: Via, source_ip: str, source_port: int) -> Via:
    """The top Via as a server must record it (returns a copy).

    RFC 3261 18.2.1: add received=source when sent-by is a name or another address.
    RFC 3581 4: a valueless rport gets the source port, and then received is added even
    when it equals sent-by."""
    params = dict(via.params)
    if "rport" in params and params["rport"] is None:
        params["rport"] = str(source_port)
        params["received"] = _bare(source_ip)
    elif not _same_address(via.host, source_ip):
        params["received"] = _bare(source_ip)
    return replace(via, params=params)


def response_address(via: Via, source: tuple[str, int] | None = None) -> tuple[str, int]:
    """(host, port) a response to a request with this top Via goes to over UDP.

    RFC 3261 18.2.2: maddr if present, else received (else sent-by), at sent-by's port or the
    default; RFC 3581: with rport, the port rport names. Pass the request's source address
    when set_received_rport() has not been applied to via yet."""
    if source is not None:
        via = set_received_rport(via, *source)
    default = DEFAULT_TLS_PORT if via.transport == "TLS" else DEFAULT_PORT
    port = via.port or default
    maddr = via.params.get("maddr")
    if maddr:
        return _bare(maddr), port
    host = via.params.get("received") or via.host
    rport = via.params.get("rport")
    if rport:
        if not _DIGITS.fullmatch(rport) or not 0 < int(rport) < 65536:
            raise SipParseError(f"bad rport {_q(rport)}")
        port = int(rport)
    return _bare(host), port


# ---------------------------------------------------------------------------- messages


@dataclass
class SipMessage:
    """A request (method, uri) or a response (status, reason). headers is the ordered list of
    (name, value) as received, repeats and compact names included; lookups are
    case-insensitive and understand compact names. uri is the Request-URI text: it may have
    a scheme parse_uri() does not support (that is answered with 416, not 400)."""

    method: str | None = None
    uri: str | None = None
    status: int | None = None
    reason: str | None = None
    version: str = SIP_VERSION
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def is_request(self) -> bool:
        return self.method is not None

    def header(self, name: str) -> str | None:
        """The first value of a header (not split at commas), or None."""
        key = _key(name)
        return next((v for n, v in self.headers if _key(n) == key), None)

    def headers_named(self, name: str) -> list[str]:
        """Every value of a header in order; list headers (Via, Contact, Route, Require...)
        are split at the commas between elements."""
        key = _key(name)
        values = [v for n, v in self.headers if _key(n) == key]
        if key not in _LIST_HEADERS:
            return values
        return [item for v in values for item in split_top(v, ",") if item]

    def add_header(self, name: str, value: str) -> None:
        self.headers.append((name, value))

    def set_header(self, name: str, value: str) -> None:
        """Replace every copy of a header by one value, where the first copy was (or at the end)."""
        key = _key(name)
        at = next((i for i, (n, _) in enumerate(self.headers) if _key(n) == key), len(self.headers))
        self.headers = [h for h in self.headers if _key(h[0]) != key]
        self.headers.insert(at, (name, value))

    @property
    def call_id(self) -> str:
        value = self.header("Call-ID")
        if not value:
            raise SipParseError("missing Call-ID")
        return value

    @property
    def cseq(self) -> tuple[int, str]:
        value = self.header("CSeq")
        if value is None:
            raise SipParseError("missing CSeq")
        return _parse_cseq(value)

    @property
    def via(self) -> list[Via]:
        return [parse_via(v) for v in self.headers_named("Via")]

    @property
    def from_tag(self) -> str | None:
        value = self.header("From")
        return None if value is None else _split_name_addr(value)[2].get("tag")

    @property
    def to_tag(self) -> str | None:
        value = self.header("To")
        return None if value is None else _split_name_addr(value)[2].get("tag")

    def to_bytes(self) -> bytes:
        """Canonical wire form: long header names, CRLF, one Content-Length that matches the body."""
        if self.is_request:
            lines = [f"{self.method} {self.uri} {self.version}"]
        else:
            lines = [f"{self.version} {self.status} {self.reason or ''}"]
        length = f"Content-Length: {len(self.body)}"
        for name, value in self.headers:
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
                raise ValueError(f"line break in header {name!r}")  # would inject headers
            if _key(name) == "content-length":
                if length:
                    lines.append(length)
                length = ""
            else:
                lines.append(f"{canonical_name(name)}: {value}")
        if length:
            lines.append(length)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + self.body


def _parse_cseq(value: str) -> tuple[int, str]:
    match = _CSEQ.fullmatch(value)
    if match is None or int(match.group(1)) >= 2**31:  # RFC 3261 8.1.1.5
        raise SipParseError(f"bad CSeq {_q(value)}")
    return int(match.group(1)), match.group(2)


def _parse_start_line(line: str, msg: SipMessage) -> None:
    if line[:4].upper() == "SIP/":
        version, _, rest = line.partition(" ")
        status, _, reason = rest.partition(" ")
        _check_version(version, line)
        if not re.fullmatch(r"[1-6][0-9][0-9]", status):
            raise SipParseError(f"bad status code in {_q(line)}")
        msg.status, msg.reason = int(status), reason
        return
    # Request-Line = Method SP Request-URI SP SIP-Version: exactly single spaces, nothing
    # after the version (RFC 4475 lwsstart, trws, lwsruri).
    parts = line.split(" ")
    if len(parts) != 3 or not _TOKEN_RE.fullmatch(parts[0]):
        raise SipParseError(f"bad start line {_q(line)}")
    method, uri, version = parts
    _check_version(version, line)
    _check_request_uri(uri)
    msg.method, msg.uri = method, uri


def _check_version(version: str, line: str) -> None:
    if version.upper() == SIP_VERSION:
        return
    if re.fullmatch(r"SIP/[0-9]+\.[0-9]+", version, re.IGNORECASE):
        raise UnsupportedVersion(f"unsupported version in {_q(line)}")
    raise SipParseError(f"bad start line {_q(line)}")


def _check_request_uri(uri: str) -> None:
    try:
        parsed = parse_uri(uri)
    except UnsupportedUriScheme:
        return  # well-formed absoluteURI: the UA answers 416 (RFC 4475 unkscm, novelsc)
    if parsed.headers:
        # Headers are not allowed in a Request-URI (RFC 3261 19.1.1; RFC 4475 escruri).
        raise SipParseError(f"headers in the Request-URI {_q(uri)}")


def _controls_quoted(value: str) -> bool:
    """Whether every control character in value is a quoted-pair inside a quoted string
    ("\\" CHAR, RFC 3261 25.1): RFC 4475 intmeth puts NUL, BEL and DEL in a display name so."""
    quoted = escaped = False
    for ch in value:
        if escaped:
            if ch in "\r\n":
                return False
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif _CONTROL.match(ch):
            return False
    return True


def _header_lines(head: bytes) -> list[tuple[str, str]]:
    """Unfolded (name, value) pairs from the header section (start line excluded)."""
    lines = _LINE_END.split(head)
    if len(lines) > MAX_LINES:
        raise SipParseError(f"more than {MAX_LINES} header lines")
    fields: list[tuple[str, str]] = []
    size = 0  # bytes of the header being unfolded
    for raw in lines:
        line = raw.decode("utf-8", "surrogateescape")
        if line[:1] in (" ", "\t"):
            # Folding: CRLF + whitespace is one SP (RFC 3261 7.3.1).
            if not fields:
                raise SipParseError("continuation line before the first header")
            name, value = fields[-1]
            more = line.strip(" \t")
            fields[-1] = (name, f"{value} {more}" if value and more else value or more)
            size += len(raw)
        else:
            name, colon, value = line.partition(":")
            name = name.rstrip(" \t")
            if not colon:
                raise SipParseError(f"header line without ':' {_q(line)}")
            if not _TOKEN_RE.fullmatch(name):
                raise SipParseError(f"bad header name {_q(name)}")
            if len(fields) == MAX_HEADERS:
                raise SipParseError(f"more than {MAX_HEADERS} headers")
            fields.append((name, value.strip(" \t")))
            size = len(raw)
        if size > MAX_HEADER_LINE:
            raise SipParseError(f"header {_q(fields[-1][0])} longer than {MAX_HEADER_LINE} bytes")
    for name, value in fields:
        if _CONTROL.search(value) and not _controls_quoted(value):
            raise SipParseError(f"control character (NUL, CR...) in header {_q(name)}")
    return fields


def _validate(msg: SipMessage) -> None:
    counts: dict[str, int] = {}
    for name, _ in msg.headers:
        counts[_key(name)] = counts.get(_key(name), 0) + 1
    for key in _SINGLE:
        if counts.get(key, 0) > 1:
            raise SipParseError(f"more than one {canonical_name(key)} header")
    for key in _MANDATORY:
        if not counts.get(key):
            raise SipParseError(f"missing {canonical_name(key)} header")
    if not msg.call_id or any(c in msg.call_id for c in " \t"):
        raise SipParseError(f"bad Call-ID {_q(msg.call_id)}")
    _, method = msg.cseq
    if msg.is_request and method != msg.method:
        raise SipParseError(f"CSeq method {method!r} does not match the request method {msg.method!r}")
    max_forwards = msg.header("Max-Forwards")
    if max_forwards is not None and (not _DIGITS.fullmatch(max_forwards) or int(max_forwards) > 255):
        raise SipParseError(f"bad Max-Forwards {_q(max_forwards)}")
    for value in (v for n, v in msg.headers if _key(n) == "via"):
        for item in split_top(value, ","):
            parse_via(item)  # strict: an empty item (",,") fails here (RFC 4475 badinv01)
    to, from_ = msg.header("To"), msg.header("From")
    assert to is not None and from_ is not None  # mandatory: counted above
    _check_name_addr(to)
    _check_name_addr(from_)
    for value in (v for n, v in msg.headers if _key(n) == "contact"):
        if value != "*":
            for item in split_top(value, ","):
                _check_name_addr(item)


def parse_message(data: bytes, max_size: int = 65535) -> SipMessage:
    """Parse one SIP message from a datagram; raise SipParseError if it is not acceptable.

    The body is Content-Length bytes; bytes after it are ignored and a Content-Length
    larger than what is there is an error (RFC 3261 18.3, UDP). Without Content-Length the
    body is the rest of the datagram (RFC 2543 senders, RFC 4475 inv2543). Stream framing
    (TCP) is not done here."""
    if len(data) > max_size:
        raise SipParseError(f"message of {len(data)} bytes is over the {max_size} byte limit")
    data = bytes(data)
    start = len(data) - len(data.lstrip(b"\r\n"))  # CRLFs before the start line are ignored (7.5)
    end = _HEAD_END.search(data, start)
    if end is None:
        raise SipParseError("no empty line after the headers")
    first, _, head = data[start:end.start()].partition(b"\n")
    first = first.removesuffix(b"\r")
    if not first or re.search(rb"[\x00-\x1f\x7f]", first):  # no quoted-pairs up there
        raise SipParseError("missing or bad start line")
    msg = SipMessage()
    _parse_start_line(first.decode("utf-8", "surrogateescape"), msg)
    msg.headers = _header_lines(head) if head else []
    _validate(msg)
    body = data[end.end():]
    length = msg.header("Content-Length")
    if length is not None:
        if not _DIGITS.fullmatch(length):
            raise SipParseError(f"bad Content-Length {_q(length)}")
        if int(length) > len(body):
            raise SipParseError(f"Content-Length {length} is larger than the {len(body)} body bytes present")
        body = body[:int(length)]
    msg.body = body
    return msg


def make_response(request: SipMessage, status: int, reason: str | None = None, *,
                  to_tag: str | None = None, headers: Iterable[tuple[str, str]] = (),
                  body: bytes = b"", content_type: str | None = None) -> SipMessage:
    """A response to request as RFC 3261 8.2.6 builds it: every Via in order, From, To (with
    to_tag added unless it already has a tag), Call-ID, CSeq; Timestamp on a 100, and
    Record-Route on 101-299 (12.1.1: the dialog's route set). Then headers, Content-Type."""
    if not request.is_request:
        raise ValueError("make_response needs a request")
    if not 100 <= status <= 699:
        raise ValueError(f"bad status code {status}")
    if body and not content_type:
        raise ValueError("a body needs a content_type")
    out: list[tuple[str, str]] = [("Via", v) for n, v in request.headers if _key(n) == "via"]
    for name in ("From", "To", "Call-ID", "CSeq"):
        value = request.header(name)
        if value is None:
            continue
        if name == "To" and to_tag and "tag" not in _split_name_addr(value)[2]:
            value = f"{value};tag={to_tag}"
        out.append((name, value))
    if status == 100 and (timestamp := request.header("Timestamp")) is not None:
        out.append(("Timestamp", timestamp))
    if 101 <= status <= 299:
        out.extend(("Record-Route", v) for n, v in request.headers if _key(n) == "record-route")
    out.extend(headers)
    if content_type:
        out.append(("Content-Type", content_type))
    return SipMessage(status=status, reason=REASONS.get(status, "") if reason is None else reason,
                      headers=out, body=body)
