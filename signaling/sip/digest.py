"""SIP digest authentication, the client side (RFC 3261 22, with RFC 7616's algorithms as
RFC 8760 brings them to SIP): MD5, SHA-256 and SHA-512-256 (and their -sess forms),
qop=auth with a cnonce and a count per nonce, or no qop (RFC 2069's form).

A server (a registrar or a UAS) challenges with 401 and WWW-Authenticate, a proxy with
407 and Proxy-Authenticate; the client sends the request again (CSeq + 1) with an
Authorization or Proxy-Authorization header answering each challenge. `stale=true` means
the nonce ran out, not that the password is wrong: answer the new nonce once more.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field

ALGORITHMS = {"MD5": "md5", "SHA-256": "sha256", "SHA-512-256": "sha512_256"}
# Where a challenge is, and where its answer goes: 401 (a server) and 407 (a proxy).
ANSWER_HEADER = {"WWW-Authenticate": "Authorization", "Proxy-Authenticate": "Proxy-Authorization"}
CHALLENGE_HEADER = {401: "WWW-Authenticate", 407: "Proxy-Authenticate"}
_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]+)\s*(?:,|$)')


class DigestError(ValueError):
    """A challenge that cannot be answered; str() is one line."""


@dataclass(frozen=True)
class Challenge:
    """One digest challenge (a WWW-Authenticate or Proxy-Authenticate value)."""
    header: str  # "WWW-Authenticate" or "Proxy-Authenticate"
    realm: str
    nonce: str
    algorithm: str = "MD5"
    qop: tuple[str, ...] = ()
    opaque: str | None = None
    stale: bool = False

    @property
    def answer_header(self) -> str:
        return ANSWER_HEADER[self.header]


def parse_challenge(header: str, value: str) -> Challenge:
    """A challenge header's value, `Digest realm="...", nonce="...", ...`."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise DigestError(f"{header}: the {scheme or 'empty'} scheme is not supported, only Digest")
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if m is None:
            raise DigestError(f"{header}: cannot read {rest[pos:pos + 40]!r}")
        raw = m.group(2)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
        pos = m.end()
    for name in ("realm", "nonce"):
        if name not in params:
            raise DigestError(f"{header}: no {name}")
    algorithm = params.get("algorithm", "MD5")
    base = algorithm.upper().removesuffix("-SESS")
    if base not in ALGORITHMS:
        raise DigestError(f"{header}: algorithm {algorithm} is not supported (MD5, SHA-256, SHA-512-256)")
    qop = tuple(q.strip().lower() for q in params["qop"].split(",")) if "qop" in params else ()
    if qop and "auth" not in qop:
        raise DigestError(f"{header}: qop {params['qop']} is not supported, only auth")
    return Challenge(header, params["realm"], params["nonce"], algorithm, qop, params.get("opaque"),
                     params.get("stale", "").lower() == "true")


@dataclass
class DigestClient:
    """Answers challenges with one user's credentials; counts the uses of each nonce."""
    username: str
    password: str = field(repr=False)
    _counts: dict[str, int] = field(default_factory=dict, repr=False)

    def answer(self, challenge: Challenge, method: str, uri: str, cnonce: str | None = None) -> str:
        """The Authorization (or Proxy-Authorization) value for a request."""
        algorithm = challenge.algorithm
        base = algorithm.upper().removesuffix("-SESS")

        def h(text: str) -> str:
            return hashlib.new(ALGORITHMS[base], text.encode()).hexdigest()

        cnonce = cnonce or secrets.token_hex(8)
        ha1 = h(f"{self.username}:{challenge.realm}:{self.password}")
        if algorithm.upper().endswith("-SESS"):
            ha1 = h(f"{ha1}:{challenge.nonce}:{cnonce}")
        ha2 = h(f"{method}:{uri}")
        fields = [("username", _quote(self.username)), ("realm", _quote(challenge.realm)),
                  ("nonce", _quote(challenge.nonce)), ("uri", _quote(uri))]
        if challenge.qop:
            count = self._counts[challenge.nonce] = self._counts.get(challenge.nonce, 0) + 1
            nc = f"{count:08x}"
            response = h(f"{ha1}:{challenge.nonce}:{nc}:{cnonce}:auth:{ha2}")
            fields += [("response", _quote(response)), ("algorithm", algorithm), ("cnonce", _quote(cnonce)),
                       ("qop", "auth"), ("nc", nc)]
        else:
            fields += [("response", _quote(h(f"{ha1}:{challenge.nonce}:{ha2}"))), ("algorithm", algorithm)]
        if challenge.opaque is not None:
            fields.append(("opaque", _quote(challenge.opaque)))
        return "Digest " + ", ".join(f"{k}={v}" for k, v in fields)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
