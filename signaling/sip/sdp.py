"""SDP for telephone calls: RFC 4566 syntax and RFC 3264 offer/answer, audio with G.711.

The agent speaks PCMU or PCMA at 8 kHz in 20 ms packets, with RFC 4733 telephone-event
for DTMF when the peer offers it. answer_audio() takes a softphone's or trunk's offer and
makes the answer; make_offer() and codec_from_answer() are the outbound side. Pure code:
the RTP layer uses the Codec these return.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
ANSWER_DIRECTION = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}
STATIC_PAYLOADS = {0: ("PCMU", 8000, 1), 8: ("PCMA", 8000, 1)}  # RFC 3551 table 4, the ones we speak
PREFERRED = ("PCMU", "PCMA")
PTIME_MS = 20
DTMF_EVENTS = "0-16"  # digits, *, #, A-D and flash (RFC 4733 3.2)
OFFER_DTMF_PT = 101

_LINE = re.compile(r"([a-z])=(.*)")
_RTPMAP = re.compile(r"([0-9]{1,3})[ \t]+([^/\s]+)/([0-9]{1,6})(?:/([0-9]{1,2}))?[ \t]*")
_PTIME = re.compile(r"[0-9]{1,4}(?:\.[0-9]{1,3})?")
_FMTP = re.compile(r"([0-9]{1,3})(?:[ \t]+(.*))?")


class SdpError(ValueError):
    """Malformed or unusable SDP; str() is one line."""


class NoCommonCodec(SdpError):
    """No audio stream offers PCMU or PCMA over RTP/AVP: the INVITE gets 488."""


@dataclass
class Origin:
    """An SDP o= line."""
    username: str
    session_id: int
    session_version: int
    nettype: str
    addrtype: str
    address: str


@dataclass
class MediaDescription:
    """One m= section. formats are the payload types of an RTP stream (empty for other
    protocols, whose raw tokens stay in fmt); direction is the effective one, session-level
    attribute applied; connection is the section's own c= address, if any."""

    media: str
    port: int
    proto: str
    fmt: list[str]
    formats: list[int] = field(default_factory=list)
    port_count: int = 1
    rtpmap: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    fmtp: dict[int, str] = field(default_factory=dict)
    ptime: int | None = None
    direction: str = "sendrecv"
    connection: str | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list)


@dataclass
class SessionDescription:
    """A parsed SDP body: its origin, connection and media sections."""
    origin: Origin
    session_name: str
    connection: str | None
    media: list[MediaDescription]
    timing: str = "0 0"
    direction: str | None = None  # session-level direction attribute
    attributes: list[tuple[str, str | None]] = field(default_factory=list)

    def address_for(self, media: MediaDescription) -> str | None:
        return media.connection or self.connection


@dataclass(kw_only=True)
class Codec:
    """What RTP needs to talk to the peer: the negotiated audio format and where to send it.
    direction is this side's, as put in the answer (recvonly: do not send)."""

    name: str
    payload_type: int
    remote_ip: str
    remote_port: int
    clock_rate: int = 8000
    dtmf_payload_type: int | None = None
    ptime: int = PTIME_MS
    direction: str = "sendrecv"


def _int(text: str, low: int, high: int, what: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 20) or not low <= int(text) <= high:
        raise SdpError(f"bad {what} {text[:40]!r}")
    return int(text)


def _connection(value: str) -> str:
    parts = value.split()
    if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise SdpError(f"bad c= line {value[:60]!r}")
    return parts[2].split("/")[0]  # drop a multicast TTL / address count


def _origin(value: str) -> Origin:
    parts = value.split()
    if len(parts) != 6:
        raise SdpError(f"bad o= line {value[:60]!r}")
    return Origin(parts[0], _int(parts[1], 0, 2**64, "o= session id"),
                  _int(parts[2], 0, 2**64, "o= version"), parts[3], parts[4], parts[5])


def _media(value: str) -> MediaDescription:
    parts = value.split()
    if len(parts) < 4:
        raise SdpError(f"bad m= line {value[:60]!r}")
    media, port_text, proto, fmt = parts[0], parts[1], parts[2], parts[3:]
    port, _, count = port_text.partition("/")
    section = MediaDescription(media, _int(port, 0, 65535, "m= port"), proto, fmt,
                               port_count=_int(count, 1, 65535, "m= port count") if count else 1)
    if "RTP/" in proto.upper():
        section.formats = [_int(pt, 0, 127, "payload type") for pt in fmt]
    return section


def _attribute(section: MediaDescription | None, sdp_attrs: list, value: str) -> str | None:
    """Record one a= line; returns a direction attribute's name."""
    name, colon, arg = value.partition(":")
    if name in DIRECTIONS:
        return name
    if section is None:
        sdp_attrs.append((name, arg if colon else None))
        return None
    if name == "rtpmap":
        _int(re.split(r"[ \t]", arg, maxsplit=1)[0], 0, 127, "rtpmap payload type")
        match = _RTPMAP.fullmatch(arg)
        if match is None:
            # No usable clock rate ("a=rtpmap:31 LPC" in RFC 4475's bodies): keep it raw,
            # it can only concern a format we would not pick anyway.
            section.attributes.append((name, arg))
            return None
        pt, encoding, rate, channels = match.groups()
        section.rtpmap[int(pt)] = (encoding, int(rate), int(channels) if channels else 1)
    elif name == "fmtp":
        match = _FMTP.fullmatch(arg)
        if match is None:
            raise SdpError(f"bad fmtp {arg[:60]!r}")
        section.fmtp[_int(match.group(1), 0, 127, "fmtp payload type")] = (match.group(2) or "").strip()
    elif name == "ptime":
        if not _PTIME.fullmatch(arg) or not 0 < float(arg) <= 1000:
            raise SdpError(f"bad ptime {arg[:40]!r}")
        section.ptime = int(float(arg))
    else:
        section.attributes.append((name, arg if colon else None))
    return None


def parse_sdp(text: str | bytes) -> SessionDescription:
    """Parse an SDP body; SdpError for anything we cannot use (RFC 4566 5: v=, o=, s=, a c=
    at session level or in every media section, at least one m=)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise SdpError("SDP is not UTF-8") from None
    lines = [line.strip() for line in re.split(r"\r?\n", text)]
    lines = [line for line in lines if line]
    if not lines or lines[0] != "v=0":
        raise SdpError("SDP does not start with v=0")
    origin: Origin | None = None
    name: str | None = None
    connection: str | None = None
    timing = "0 0"
    direction: str | None = None
    attrs: list[tuple[str, str | None]] = []
    media: list[MediaDescription] = []
    media_direction: dict[int, str] = {}
    for line in lines[1:]:
        match = _LINE.fullmatch(line)
        if match is None:
            raise SdpError(f"bad SDP line {line[:60]!r}")
        kind, value = match.groups()
        section = media[-1] if media else None
        if kind == "m":
            media.append(_media(value))
        elif kind == "a":
            found = _attribute(section, attrs, value)
            if found and section is None:
                direction = found
            elif found:
                media_direction[len(media) - 1] = found
        elif kind == "c":
            if section is None:
                connection = _connection(value)
            else:
                section.connection = _connection(value)
        elif section is None and kind == "o":
            origin = _origin(value)
        elif section is None and kind == "s":
            name = value
        elif section is None and kind == "t":
            timing = value
        # Other lines (i, u, e, p, b, z, k, r...) do not matter for a G.711 call.
    if origin is None or name is None:
        raise SdpError("SDP without o= or s= line")
    if not media:
        raise SdpError("SDP without m= line")
    for index, section in enumerate(media):
        section.direction = media_direction.get(index, direction or "sendrecv")
        if section.port and not (section.connection or connection):
            raise SdpError(f"no c= line for the {section.media} stream")
    return SessionDescription(origin, name, connection, media, timing, direction, attrs)


def _ip_kind(ip: str) -> str:
    return "IP6" if ipaddress.ip_address(ip).version == 6 else "IP4"


def _session_lines(local_ip: str, session_id: int, timing: str = "0 0") -> list[str]:
    kind = _ip_kind(local_ip)
    return ["v=0", f"o=- {session_id} {session_id} IN {kind} {local_ip}", "s=-",
            f"c=IN {kind} {local_ip}", f"t={timing}"]


def _choose(section: MediaDescription) -> tuple[str, int, int | None] | None:
    """(codec name, payload type, telephone-event payload type) we accept in this stream."""
    if section.media != "audio" or section.port == 0 or section.proto.upper() != "RTP/AVP":
        return None  # RTP/SAVP etc. would need SRTP; a zero port is a stream already rejected
    for name in PREFERRED:
        for pt in section.formats:
            encoding = section.rtpmap.get(pt) or STATIC_PAYLOADS.get(pt)
            if encoding and encoding[0].upper() == name and encoding[1] == 8000 and encoding[2] == 1:
                dtmf = next((p for p in section.formats
                             if (m := section.rtpmap.get(p)) and m[0].lower() == "telephone-event"
                             and m[1] == 8000), None)
                return name, pt, dtmf
    return None


def answer_audio(offer: SessionDescription, local_ip: str, local_port: int,
                 session_id: int) -> tuple[str, Codec]:
    """The answer to an offer (RFC 3264 6): the first audio stream with PCMU (preferred) or
    PCMA is accepted with the offer's payload type numbers, telephone-event if offered, ptime
    20 and the mirrored direction; every other stream is rejected with port 0. Raises
    NoCommonCodec when no stream can be accepted."""
    codec: Codec | None = None
    lines = _session_lines(local_ip, session_id, offer.timing)
    for section in offer.media:
        chosen = None if codec is not None else _choose(section)
        if chosen is None:
            lines.append(f"m={section.media} 0 {section.proto} {' '.join(section.fmt)}")
            continue
        name, pt, dtmf = chosen
        direction = ANSWER_DIRECTION[section.direction]
        remote_ip = offer.address_for(section)
        assert remote_ip is not None  # parse_sdp refuses a stream with a port and no c= line
        codec = Codec(name=name, payload_type=pt, dtmf_payload_type=dtmf, direction=direction,
                      remote_ip=remote_ip, remote_port=section.port)
        lines.append(f"m=audio {local_port} RTP/AVP {pt}" + ("" if dtmf is None else f" {dtmf}"))
        lines.append(f"a=rtpmap:{pt} {name}/8000")
        if dtmf is not None:
            lines.append(f"a=rtpmap:{dtmf} telephone-event/8000")
            if section.fmtp.get(dtmf):
                lines.append(f"a=fmtp:{dtmf} {section.fmtp[dtmf]}")
        lines += [f"a=ptime:{PTIME_MS}", f"a={direction}"]
    if codec is None:
        raise NoCommonCodec("no audio stream offers PCMU or PCMA over RTP/AVP")
    return "\r\n".join(lines) + "\r\n", codec


def make_offer(local_ip: str, local_port: int, session_id: int) -> str:
    """An offer for an outbound call: PCMU, PCMA, telephone-event, 20 ms, sendrecv."""
    lines = _session_lines(local_ip, session_id) + [
        f"m=audio {local_port} RTP/AVP 0 8 {OFFER_DTMF_PT}",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        f"a=rtpmap:{OFFER_DTMF_PT} telephone-event/8000",
        f"a=fmtp:{OFFER_DTMF_PT} {DTMF_EVENTS}",
        f"a=ptime:{PTIME_MS}",
        "a=sendrecv",
    ]
    return "\r\n".join(lines) + "\r\n"


def codec_from_answer(answer: SessionDescription) -> Codec:
    """The Codec an answer to make_offer() settled on: its first accepted audio stream.
    direction is ours: the answer's sendonly means we only receive."""
    for section in answer.media:
        chosen = _choose(section)
        if chosen is not None:
            name, pt, dtmf = chosen
            remote_ip = answer.address_for(section)
            assert remote_ip is not None  # parse_sdp refuses a stream with a port and no c= line
            return Codec(name=name, payload_type=pt, dtmf_payload_type=dtmf,
                         direction=ANSWER_DIRECTION[section.direction],
                         remote_ip=remote_ip, remote_port=section.port)
    raise NoCommonCodec("the answer accepts no PCMU or PCMA audio stream")
