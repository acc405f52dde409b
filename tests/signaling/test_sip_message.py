"""SIP message syntax (RFC 3261), the RFC 4475 torture messages, fuzzing, and SDP offer/answer.

The torture messages are written out as in RFC 4475 (with its <repeat> expanded). Each
is either parsed with its key fields checked, or refused with a SipParseError whose
message names the reason, so a refusal for some other cause fails the test. Where
RFC 4475 leaves the choice to the element, the test says which one this parser makes.
"""

from __future__ import annotations

import random
import time
from urllib.parse import unquote

import pytest

from signaling.sip.message import (
    MAX_HEADER_LINE,
    MAX_HEADERS,
    REASONS,
    SipMessage,
    SipParseError,
    SipUri,
    UnsupportedUriScheme,
    UnsupportedVersion,
    canonical_name,
    make_response,
    parse_message,
    parse_name_addr,
    parse_uri,
    parse_via,
    response_address,
    set_received_rport,
    split_top,
)
from signaling.sip.sdp import NoCommonCodec, SdpError, answer_audio, codec_from_answer, make_offer, parse_sdp


def wire(text: bytes) -> bytes:
    """A message written with LF line ends (and a leading newline) as it is sent: CRLF."""
    return text.removeprefix(b"\n").replace(b"\n", b"\r\n")


def rfc_sdp(address: bytes, timing: bytes = b"0 0") -> bytes:
    """The SDP body most RFC 4475 messages carry (150 bytes with a 9-character address)."""
    return wire(b"""
v=0
o=mhandley 29739 7272939 IN IP4 %s
s=-
c=IN IP4 %s
t=%s
m=audio 49217 RTP/AVP 0 12
m=video 3227 RTP/AVP 31
a=rtpmap:31 LPC
""" % (address, address, timing))


OFFER_SDP = wire(b"""
v=0
o=alice 2890844526 2890844526 IN IP4 192.0.2.10
s=-
c=IN IP4 192.0.2.10
t=0 0
m=audio 49170 RTP/AVP 0 8 9 101
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:9 G722/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=ptime:20
a=sendrecv
""")


def invite(body: bytes = OFFER_SDP) -> bytes:
    """A softphone's INVITE in canonical form: to_bytes() gives back exactly these bytes."""
    return wire(b"""
INVITE sip:agent@192.0.2.1:5060 SIP/2.0
Via: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK776asdhds;rport
Max-Forwards: 70
From: "Alice" <sip:alice@example.com>;tag=1928301774
To: <sip:agent@192.0.2.1>
Call-ID: a84b4c76e66710@pc33.example.com
CSeq: 314159 INVITE
Contact: <sip:alice@192.0.2.10:5062>
Content-Type: application/sdp
Content-Length: %d

""" % len(body)) + body


def options(*extra: bytes, method: bytes = b"OPTIONS") -> bytes:
    """A minimal valid request with extra header lines."""
    lines = [method + b" sip:agent@example.com SIP/2.0",
             b"Via: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bKopt1",
             b"From: <sip:a@example.com>;tag=1", b"To: <sip:agent@example.com>",
             b"Call-ID: opt1@192.0.2.7", b"CSeq: 1 " + method, *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


# ---------------------------------------------------------------------------- ordinary messages


def test_invite_with_sdp_parses_and_reserialises_byte_for_byte():
    data = invite()
    msg = parse_message(data)
    assert msg.is_request and msg.method == "INVITE" and msg.uri == "sip:agent@192.0.2.1:5060"
    assert msg.version == "SIP/2.0" and msg.status is None
    assert msg.call_id == "a84b4c76e66710@pc33.example.com"
    assert msg.cseq == (314159, "INVITE")
    assert msg.from_tag == "1928301774" and msg.to_tag is None
    assert msg.header("max-forwards") == "70"
    assert [name for name, _ in msg.headers][:3] == ["Via", "Max-Forwards", "From"]
    (via,) = msg.via
    assert (via.transport, via.host, via.port, via.branch) == ("UDP", "192.0.2.10", 5062, "z9hG4bK776asdhds")
    assert via.params == {"branch": "z9hG4bK776asdhds", "rport": None}
    sender = parse_name_addr(msg.header("From"))
    assert sender.display_name == "Alice" and sender.uri.user == "alice" and sender.tag == "1928301774"
    uri = parse_uri(msg.uri)
    assert (uri.scheme, uri.user, uri.host, uri.port) == ("sip", "agent", "192.0.2.1", 5060)
    assert msg.body == OFFER_SDP
    assert msg.to_bytes() == data
    assert parse_sdp(msg.body.decode()).media[0].formats == [0, 8, 9, 101]


def test_to_bytes_writes_long_names_crlf_and_a_content_length_that_fits():
    data = wire(b"""
OPTIONS sip:agent@example.com SIP/2.0
v: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK1
f: <sip:a@example.com>;tag=1
t: <sip:agent@example.com>
i: x1@192.0.2.7
l: 5
CSeq: 2 OPTIONS
Content-Length: 5

hello
""")
    with pytest.raises(SipParseError, match="more than one Content-Length"):
        parse_message(data)
    msg = parse_message(data.replace(b"Content-Length: 5\r\n", b""))
    assert msg.body == b"hello"
    msg.body = b"a longer body"
    out = msg.to_bytes()
    assert out.count(b"Content-Length") == 1 and b"Content-Length: 13\r\n" in out
    assert out.startswith(b"OPTIONS sip:agent@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK1\r\n"
                          b"From: <sip:a@example.com>;tag=1\r\nTo: <sip:agent@example.com>\r\nCall-ID: x1@192.0.2.7\r\n")
    assert out.endswith(b"\r\n\r\na longer body")
    again = parse_message(out)
    assert again.body == b"a longer body" and again.call_id == "x1@192.0.2.7"
    # A message built in code gets a Content-Length too, and refuses header injection.
    built = SipMessage(method="BYE", uri="sip:a@example.com", headers=[("Call-ID", "c1")])
    assert built.to_bytes() == b"BYE sip:a@example.com SIP/2.0\r\nCall-ID: c1\r\nContent-Length: 0\r\n\r\n"
    built.add_header("Subject", "hi\r\nVia: evil")
    with pytest.raises(ValueError):
        built.to_bytes()


def test_set_header_replaces_every_copy_in_place():
    msg = parse_message(options(b"Supported: a", b"Subject: x", b"k: c"))
    msg.set_header("Supported", "timer")
    assert msg.headers_named("Supported") == ["timer"]
    assert [n for n, _ in msg.headers][5:] == ["Supported", "Subject"]
    msg.set_header("Expires", "60")
    assert msg.headers[-1] == ("Expires", "60")


def test_compact_header_names_and_case_insensitive_lookup():
    data = wire(b"""
MESSAGE sip:agent@example.com SIP/2.0
v: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bKc1
f: <sip:a@example.com>;tag=1
T: <sip:agent@example.com>
i: compact@192.0.2.7
CSeq: 7 MESSAGE
m: <sip:a@192.0.2.7>
k: 100rel
s: hello
e: gzip
o: refer
r: <sip:c@example.com>
c: text/plain
L: 2

hi
""")
    msg = parse_message(data)
    expect = {"Via": "SIP/2.0/UDP 192.0.2.7;branch=z9hG4bKc1", "From": "<sip:a@example.com>;tag=1",
              "To": "<sip:agent@example.com>", "Call-ID": "compact@192.0.2.7", "Contact": "<sip:a@192.0.2.7>",
              "Supported": "100rel", "Subject": "hello", "Content-Encoding": "gzip", "Event": "refer",
              "Refer-To": "<sip:c@example.com>", "Content-Type": "text/plain", "Content-Length": "2"}
    for name, value in expect.items():
        assert msg.header(name) == value, name
        assert msg.header(name.upper()) == value and msg.header(name.lower()) == value
    assert msg.header("i") == msg.header("CALL-ID") == msg.call_id
    assert msg.header("l") == "2" and msg.body == b"hi"
    assert msg.header("X-Absent") is None and msg.headers_named("X-Absent") == []
    assert canonical_name("v") == "Via" and canonical_name("cseq") == "CSeq" and canonical_name("X-Foo") == "X-Foo"
    out = msg.to_bytes()
    assert b"\r\nSupported: 100rel\r\n" in out and b"\r\nRefer-To: <sip:c@example.com>\r\n" in out
    assert parse_message(out).call_id == "compact@192.0.2.7"


def test_folded_headers_are_unfolded_with_one_space():
    data = wire(b"""
OPTIONS sip:agent@example.com SIP/2.0
Via: SIP/2.0/UDP
 192.0.2.7
\t;branch=z9hG4bKfold
From: <sip:a@example.com>
   ;tag=1
To:
 <sip:agent@example.com>
Call-ID: fold@192.0.2.7
CSeq: 3
\tOPTIONS
Subject: one
  two\t
\t three
Content-Length: 0

""")
    msg = parse_message(data)
    assert msg.header("Subject") == "one two three"
    assert msg.header("To") == "<sip:agent@example.com>"
    assert msg.cseq == (3, "OPTIONS") and msg.from_tag == "1"
    assert msg.via[0].host == "192.0.2.7" and msg.via[0].branch == "z9hG4bKfold"
    with pytest.raises(SipParseError, match="continuation line"):
        parse_message(b"OPTIONS sip:a@example.com SIP/2.0\r\n folded: first\r\n\r\n")


def test_multiple_via_in_one_header_and_across_headers():
    data = options(b"Via: SIP/2.0/TCP proxy1.example.com:5070;branch=z9hG4bKp1;received=198.51.100.1,"
                   b" SIP/2.0/UDP [2001:db8::7];branch=z9hG4bKp2",
                   b"v: SIP/2.0/TLS proxy3.example.com;branch=z9hG4bKp3")
    msg = parse_message(data)
    hosts = [(v.transport, v.host, v.port) for v in msg.via]
    assert hosts == [("UDP", "192.0.2.7", None), ("TCP", "proxy1.example.com", 5070),
                     ("UDP", "[2001:db8::7]", None), ("TLS", "proxy3.example.com", None)]
    assert msg.via[1].params == {"branch": "z9hG4bKp1", "received": "198.51.100.1"}
    assert len(msg.headers_named("Via")) == 4
    response = parse_message(make_response(msg, 200).to_bytes())
    assert [v.branch for v in response.via] == ["z9hG4bKopt1", "z9hG4bKp1", "z9hG4bKp2", "z9hG4bKp3"]


def test_headers_named_splits_lists_respecting_quotes_and_brackets():
    msg = parse_message(options(
        b'Contact: "Doe, John" <sip:j,d@192.0.2.7;transport=udp>;q=0.5, <sip:k@192.0.2.8>,',
        b"  sip:l@192.0.2.9;expires=60",
        b"Require: timer,100rel",
        b"Date: Sat, 13 Nov 2010 23:29:00 GMT",
        b'Authorization: Digest username="a", realm="b, c", nonce="n"',
        b'Warning: 399 host "one, two", 399 host "three"'))
    contacts = msg.headers_named("Contact")
    assert contacts == ['"Doe, John" <sip:j,d@192.0.2.7;transport=udp>;q=0.5', "<sip:k@192.0.2.8>",
                        "sip:l@192.0.2.9;expires=60"]
    first = parse_name_addr(contacts[0])
    assert first.display_name == "Doe, John" and first.uri.user == "j,d" and first.params == {"q": "0.5"}
    assert first.uri.params == {"transport": "udp"}
    assert msg.headers_named("require") == ["timer", "100rel"]
    assert msg.headers_named("Date") == ["Sat, 13 Nov 2010 23:29:00 GMT"]  # not a list header
    assert len(msg.headers_named("Authorization")) == 1  # commas inside credentials
    assert msg.headers_named("Warning") == ['399 host "one, two"', '399 host "three"']


def test_ipv6_references_in_via_and_uris():
    data = wire(b"""
INVITE sip:agent@[2001:db8::1]:5060;transport=udp SIP/2.0
Via: SIP/2.0/UDP [2001:db8::9]:5070;branch=z9hG4bKv6;rport
From: <sip:alice@[2001:db8::9]>;tag=6
To: <sip:agent@[2001:db8::1]>
Call-ID: v6@2001:db8::9
CSeq: 1 INVITE
Contact: <sip:alice@[2001:db8::9]:5070;maddr=[2001:db8::10]>
Content-Length: 0

""")
    msg = parse_message(data)
    uri = parse_uri(msg.uri)
    assert (uri.host, uri.port, uri.params) == ("[2001:db8::1]", 5060, {"transport": "udp"})
    assert str(uri) == msg.uri
    via = msg.via[0]
    assert (via.host, via.port) == ("[2001:db8::9]", 5070)
    assert response_address(via, ("2001:db8::9", 5070)) == ("2001:db8::9", 5070)
    assert set_received_rport(via, "2001:db8::9", 40000).params == {
        "branch": "z9hG4bKv6", "rport": "40000", "received": "2001:db8::9"}
    assert parse_name_addr(msg.header("Contact")).uri.params["maddr"] == "[2001:db8::10]"
    for bad in (b"[2001:db8::zz]", b"[2001:db8::1"):
        with pytest.raises(SipParseError):
            parse_message(data.replace(b"[2001:db8::9]:5070;branch", bad + b":5070;branch"))


def test_body_length_rules_for_datagrams():
    # Bytes after Content-Length are ignored (RFC 3261 18.3), fewer are an error.
    msg = parse_message(invite() + b"trailing junk")
    assert msg.body == OFFER_SDP
    with pytest.raises(SipParseError, match="larger than"):
        parse_message(invite()[:-1])
    # Without Content-Length the body is the rest of the datagram; 0 means no body.
    assert parse_message(options(b"Content-Type: text/plain") + b"rest").body == b"rest"
    assert parse_message(options(b"Content-Length: 0") + b"rest").body == b""
    assert parse_message(options(b"Content-Length: 0")).body == b""
    # CRLFs before the start line are skipped (RFC 3261 7.5), as are LF-only line ends.
    assert parse_message(b"\r\n\r\n" + options()).cseq == (1, "OPTIONS")
    assert parse_message(options(b"Content-Length: 2").replace(b"\r\n", b"\n") + b"ok").body == b"ok"


@pytest.mark.parametrize("value", [b"-1", b"+5", b"abc", b"5 5", b"0x10", b"", b"99999999999", b"\xd9\xa3"])
def test_invalid_content_length_values(value):
    with pytest.raises(SipParseError, match="Content-Length"):
        parse_message(options(b"Content-Length: " + value) + b"12345")


@pytest.mark.parametrize("missing", [b"Via", b"From", b"To", b"Call-ID", b"CSeq"])
def test_missing_mandatory_header(missing):
    lines = [line for line in options().split(b"\r\n") if not line.startswith(missing + b":")]
    with pytest.raises(SipParseError, match="missing"):
        parse_message(b"\r\n".join(lines))


def test_max_forwards_may_be_absent_but_must_be_valid():
    assert parse_message(options()).header("Max-Forwards") is None
    assert parse_message(options(b"Max-Forwards: 255")).header("Max-Forwards") == "255"
    for bad in (b"256", b"-1", b"seventy", b"1 2"):
        with pytest.raises(SipParseError, match="Max-Forwards"):
            parse_message(options(b"Max-Forwards: " + bad))


def test_cseq_number_and_method():
    assert parse_message(options().replace(b"CSeq: 1 ", b"CSeq: 2147483647 ")).cseq == (2**31 - 1, "OPTIONS")
    for bad in (b"CSeq: 2147483648 OPTIONS", b"CSeq: -1 OPTIONS", b"CSeq: OPTIONS", b"CSeq: 1",
                b"CSeq: 1 OPTIONS extra", b"CSeq: 1.5 OPTIONS"):
        with pytest.raises(SipParseError, match="CSeq"):
            parse_message(options().replace(b"CSeq: 1 OPTIONS", bad))
    with pytest.raises(SipParseError, match="does not match"):
        parse_message(options().replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 options"))  # methods are case-sensitive
    assert parse_message(options(method=b"FOOBAR")).method == "FOOBAR"  # unknown methods are fine


def test_nul_and_control_bytes_are_refused():
    for line in (b"Subject: a\x00b", b"Subject: a\rb", b"Subject: a\x07", b"Subject: a\\\x00b",
                 b'Subject: "a\x00b"', b'Subject: "a\\\rb"', b"X-Id: x\x7f"):
        with pytest.raises(SipParseError, match="control character"):
            parse_message(options(line))
    with pytest.raises(SipParseError, match="bad header name"):
        parse_message(options(b"X-A\x00: b"))
    with pytest.raises(SipParseError, match="start line"):
        parse_message(options().replace(b"OPTIONS sip", b"OPTIONS\x00 sip", 1))
    # As a quoted-pair in a quoted string it is legal (RFC 4475 intmeth), and a body may hold any byte.
    msg = parse_message(options(b'Contact: "a\\\x00b" <sip:a@192.0.2.7>', b'Subject: "\\\x07"'))
    assert parse_name_addr(msg.header("Contact")).display_name == "a\x00b"
    assert parse_message(options(b"Content-Length: 3") + b"\x00\r\x7f").body == b"\x00\r\x7f"


def test_size_and_count_limits():
    with pytest.raises(SipParseError, match="limit"):
        parse_message(options() + b"x" * 65536)
    with pytest.raises(SipParseError, match="limit"):
        parse_message(options(), max_size=100)
    fill = MAX_HEADERS - 5  # options() has five
    assert parse_message(options(*[b"X-Fill: %d" % i for i in range(fill)]))
    with pytest.raises(SipParseError, match="more than 200 headers"):
        parse_message(options(*[b"X-Fill: %d" % i for i in range(fill + 1)]))
    assert parse_message(options(b"X-Long: " + b"a" * (MAX_HEADER_LINE - 8)))  # 8192 bytes in all
    with pytest.raises(SipParseError, match="longer than"):
        parse_message(options(b"X-Long: " + b"a" * (MAX_HEADER_LINE - 7)))
    with pytest.raises(SipParseError, match="longer than"):  # folding does not get around it
        parse_message(options(b"X-Long: a", *[b" " + b"a" * 100] * 90))


@pytest.mark.parametrize("data, match", [
    (b"", "no empty line"),
    (b"\r\n\r\n", "no empty line"),
    (b"OPTIONS sip:a@example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n", "no empty line"),
    (b"HELLO\r\n\r\n", "bad start line"),
    (b"OPTIONS sip:a@example.com\r\n\r\n", "bad start line"),
    (b"OPTIONS sip:a@example.com HTTP/1.1\r\n\r\n", "bad start line"),
    (b"SIP/2.0 20 OK\r\n\r\n", "status code"),
    (b"SIP/2.0 700 Nope\r\n\r\n", "status code"),
    (b"SIP/2.0 abc OK\r\n\r\n", "status code"),
    (b"OPTIONS sip:a@example.com SIP/2.0\r\nNo colon here\r\n\r\n", "without ':'"),
    (b"OPTIONS sip:a@example.com SIP/2.0\r\nBad Name: x\r\n\r\n", "bad header name"),
    (b"OPTIONS sip:a@example.com SIP/2.0\r\n: x\r\n\r\n", "bad header name"),
    (b"OPTIONS sip:a@example.com SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n\r\n", "missing"),
])
def test_malformed_messages(data, match):
    with pytest.raises(SipParseError, match=match):
        parse_message(data)


def test_wrong_version_is_its_own_error():
    for data in (options().replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1), b"SIP/1.0 200 OK\r\n\r\n"):
        with pytest.raises(UnsupportedVersion):
            parse_message(data)
    assert parse_message(options().replace(b"SIP/2.0\r\n", b"sip/2.0\r\n", 1)).version == "SIP/2.0"


def test_responses_parse():
    data = wire(b"""
SIP/2.0 486 Busy Here
Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKr1;received=198.51.100.4;rport=6000
From: <sip:agent@example.com>;tag=a1
To: <sip:bob@example.com>;tag=b2
Call-ID: out1@192.0.2.1
CSeq: 2 INVITE
Content-Length: 0

""")
    msg = parse_message(data)
    assert not msg.is_request and (msg.status, msg.reason) == (486, "Busy Here")
    assert msg.method is None and msg.uri is None and msg.to_tag == "b2" and msg.cseq == (2, "INVITE")
    assert msg.to_bytes() == data
    assert parse_message(b"SIP/2.0 200\r\n" + data.split(b"\r\n", 1)[1]).reason == ""


# ---------------------------------------------------------------------------- Via, rport, received


def test_parse_via_and_to_str():
    via = parse_via("SIP / 2.0 / udp  host.example.com : 5080 ; branch = z9hG4bK1 ; rport ; maddr=239.1.1.1")
    assert (via.transport, via.host, via.port) == ("UDP", "host.example.com", 5080)
    assert via.params == {"branch": "z9hG4bK1", "rport": None, "maddr": "239.1.1.1"}
    assert via.to_str() == "SIP/2.0/UDP host.example.com:5080;branch=z9hG4bK1;rport;maddr=239.1.1.1"
    assert parse_via(via.to_str()) == via
    for bad in ("SIP/2.0/UDP", "SIP/2.0 UDP host", "SIP/3.0/UDP host", "SIP/2.0/UDP host;;branch=x",
                "SIP/2.0/UDP host;branch=", "SIP/2.0/UDP host:0", "SIP/2.0/UDP host:70000",
                "SIP/2.0/UDP ho st", "SIP/2.0/UDP host, SIP/2.0/UDP other", "SIP/2.0/UDP [zz::1]"):
        with pytest.raises(SipParseError):
            parse_via(bad)


def test_received_is_added_when_sent_by_differs_from_the_source():
    via = parse_via("SIP/2.0/UDP 192.0.2.7:5062;branch=z9hG4bK1")
    assert set_received_rport(via, "192.0.2.7", 5062).params == {"branch": "z9hG4bK1"}  # same address
    natted = set_received_rport(via, "198.51.100.9", 40001)
    assert natted.params == {"branch": "z9hG4bK1", "received": "198.51.100.9"}
    assert via.params == {"branch": "z9hG4bK1"}  # the input is not changed
    named = set_received_rport(parse_via("SIP/2.0/UDP pc33.example.com;branch=z9hG4bK2"), "192.0.2.7", 5060)
    assert named.params["received"] == "192.0.2.7"  # a domain name always gets received (18.2.1)
    # Responses: to received at sent-by's port (or 5060) without rport.
    assert response_address(natted) == ("198.51.100.9", 5062)
    assert response_address(named) == ("192.0.2.7", 5060)
    assert response_address(via) == ("192.0.2.7", 5062)
    assert response_address(parse_via("SIP/2.0/UDP pc33.example.com")) == ("pc33.example.com", 5060)
    assert response_address(parse_via("SIP/2.0/TLS pc33.example.com")) == ("pc33.example.com", 5061)


def test_rport_is_filled_with_the_source_port():
    via = parse_via("SIP/2.0/UDP 10.0.0.5:5060;rport;branch=z9hG4bKnat")
    done = set_received_rport(via, "198.51.100.9", 40001)
    assert done.params == {"rport": "40001", "branch": "z9hG4bKnat", "received": "198.51.100.9"}
    assert done.to_str() == "SIP/2.0/UDP 10.0.0.5:5060;rport=40001;branch=z9hG4bKnat;received=198.51.100.9"
    assert response_address(done) == ("198.51.100.9", 40001)
    assert response_address(via, ("198.51.100.9", 40001)) == ("198.51.100.9", 40001)
    # With rport the source address is recorded even when sent-by already equals it (RFC 3581 4).
    same = set_received_rport(parse_via("SIP/2.0/UDP 192.0.2.7;rport"), "192.0.2.7", 5070)
    assert same.params == {"rport": "5070", "received": "192.0.2.7"}
    # An rport that already has a value is left alone; without rport the port is sent-by's.
    kept = set_received_rport(parse_via("SIP/2.0/UDP 10.0.0.5;rport=7000"), "198.51.100.9", 40001)
    assert kept.params == {"rport": "7000", "received": "198.51.100.9"}
    assert response_address(parse_via("SIP/2.0/UDP 10.0.0.5:5070"), ("198.51.100.9", 40001)) == ("198.51.100.9", 5070)
    # maddr wins (RFC 3261 18.2.2).
    assert response_address(parse_via("SIP/2.0/UDP 10.0.0.5;maddr=239.255.255.1;rport")) == ("239.255.255.1", 5060)
    with pytest.raises(SipParseError):
        response_address(parse_via("SIP/2.0/UDP 10.0.0.5;rport=99999"))


# ---------------------------------------------------------------------------- responses


def test_make_response_copies_headers_per_rfc3261_8_2_6():
    msg = parse_message(options(b"v: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp, SIP/2.0/TCP edge.example.com",
                                b"Timestamp: 54", b"Record-Route: <sip:proxy.example.com;lr>",
                                b"Contact: <sip:a@192.0.2.7>", b"Content-Length: 0"))
    response = make_response(msg, 200, to_tag="as83kd9bs")
    assert (response.status, response.reason, response.is_request) == (200, "OK", False)
    assert response.headers == [
        ("Via", "SIP/2.0/UDP 192.0.2.7;branch=z9hG4bKopt1"),
        ("Via", "SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp, SIP/2.0/TCP edge.example.com"),
        ("From", "<sip:a@example.com>;tag=1"),
        ("To", "<sip:agent@example.com>;tag=as83kd9bs"),
        ("Call-ID", "opt1@192.0.2.7"),
        ("CSeq", "1 OPTIONS"),
        ("Record-Route", "<sip:proxy.example.com;lr>"),
    ]
    wire_bytes = response.to_bytes()
    assert wire_bytes.startswith(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bKopt1\r\n")
    assert wire_bytes.endswith(b"Content-Length: 0\r\n\r\n")
    again = parse_message(wire_bytes)
    assert again.to_tag == "as83kd9bs" and again.cseq == (1, "OPTIONS") and len(again.via) == 3
    # 100 Trying copies Timestamp and leaves Record-Route; a To that has a tag keeps it.
    trying = make_response(msg, 100)
    assert trying.header("Timestamp") == "54" and trying.header("Record-Route") is None
    assert trying.reason == "Trying" and trying.to_tag is None
    tagged = parse_message(options().replace(b"To: <sip:agent@example.com>", b"To: <sip:agent@example.com>;tag=old"))
    assert make_response(tagged, 200, to_tag="new").header("To") == "<sip:agent@example.com>;tag=old"
    assert make_response(msg, 486, to_tag="x").header("Record-Route") is None


def test_make_response_reasons_headers_and_body():
    request = parse_message(invite())
    for code in (100, 180, 183, 200, 400, 403, 404, 405, 408, 481, 486, 487, 488, 500, 501, 503):
        assert make_response(request, code).reason == REASONS[code] != ""
    assert make_response(request, 488).reason == "Not Acceptable Here"
    assert make_response(request, 487).reason == "Request Terminated"
    assert make_response(request, 699).reason == ""
    assert make_response(request, 200, "Fine").reason == "Fine"
    answer = b"v=0\r\n"
    ok = make_response(request, 200, to_tag="t1", headers=[("Contact", "<sip:agent@192.0.2.1>"), ("Allow", "INVITE, ACK")],
                       body=answer, content_type="application/sdp")
    names = [n for n, _ in ok.headers]
    assert names == ["Via", "From", "To", "Call-ID", "CSeq", "Contact", "Allow", "Content-Type"]
    out = ok.to_bytes()
    assert b"\r\nContent-Type: application/sdp\r\nContent-Length: 5\r\n\r\nv=0\r\n" in out
    assert parse_message(out).body == answer
    with pytest.raises(ValueError):
        make_response(request, 200, body=b"x")  # a body needs its type
    with pytest.raises(ValueError):
        make_response(request, 99)
    with pytest.raises(ValueError):
        make_response(ok, 200)


# ---------------------------------------------------------------------------- URIs and addresses


@pytest.mark.parametrize("text", [
    "sip:alice@atlanta.com",
    "sip:alice:secretword@atlanta.com;transport=tcp",
    "sips:alice@atlanta.com?subject=project%20x&priority=urgent",
    "sip:+1-212-555-1212:1234@gateway.com;user=phone",
    "sip:alice@192.0.2.4:5061",
    "sip:atlanta.com;method=REGISTER?to=alice%40atlanta.com",
    "sip:alice;day=tuesday@atlanta.com",
    "sip:[2001:db8::10]:5070;lr;maddr=[2001:db8::1]",
    "sip:example.com",
    "tel:+1-201-555-0123;phone-context=example.com",
])
def test_uri_round_trip(text):
    uri = parse_uri(text)
    assert str(uri) == text
    assert parse_uri(str(uri)) == uri


def test_uri_fields():
    uri = parse_uri("sip:alice:pw@atlanta.com:5070;transport=TCP;lr?subject=a%20b&x=1")
    assert (uri.scheme, uri.user, uri.password, uri.host, uri.port) == ("sip", "alice", "pw", "atlanta.com", 5070)
    assert uri.params == {"transport": "TCP", "lr": None}
    assert uri.headers == {"subject": "a%20b", "x": "1"}
    upper = parse_uri("SIP:ALICE@AtLanTa.CoM;Transport=udp")
    assert (upper.scheme, upper.user, upper.host, upper.params) == ("sip", "ALICE", "AtLanTa.CoM", {"transport": "udp"})
    tel = parse_uri("tel:+358-555-1234567;postd=pp22")
    assert (tel.scheme, tel.user, tel.host, tel.params) == ("tel", "+358-555-1234567", "", {"postd": "pp22"})
    assert str(SipUri(user="bob", host="biloxi.com", params={"transport": "udp"})) == "sip:bob@biloxi.com;transport=udp"
    assert str(parse_uri("sip:user;par=u%40example.net@example.com")) == "sip:user;par=u%40example.net@example.com"


@pytest.mark.parametrize("text", ["mailto:a@example.com", "http://www.example.com", "isbn:2983792873",
                                  "soap.beep://192.0.2.103:3002"])
def test_unknown_uri_schemes_are_their_own_error(text):
    with pytest.raises(UnsupportedUriScheme, match="unsupported URI scheme"):
        parse_uri(text)


@pytest.mark.parametrize("text", ["", "sip:", "sip:alice@", "sip: alice@example.com", "sip:alice@example.com ",
                                  "<sip:alice@example.com>", "sip:al ice@example.com", "sip:alice@exa mple.com",
                                  "sip:alice@example.com:0", "sip:alice@example.com:65536", "sip:alice@example.com:x",
                                  "sip:alice@example.com;", "sip:alice@example.com;a=", "sip:alice@example.com?",
                                  "sip:alice@example.com?x", "sip:a\"b@example.com", "sip:alice@[::g]", "tel:abc def",
                                  "tel:", "1sip:a@b", "sip:@example.com", "sip:alice@example.com;a=b;;c"])
def test_malformed_uris(text):
    with pytest.raises(SipParseError):
        parse_uri(text)


def test_parse_name_addr_forms():
    quoted = parse_name_addr('"Mr. \\"Big\\" Watson" <sip:watson@bell-telephone.com> ;tag=a48s; q = 0.7')
    assert quoted.display_name == 'Mr. "Big" Watson' and quoted.tag == "a48s" and quoted.params["q"] == "0.7"
    assert str(quoted) == '"Mr. \\"Big\\" Watson" <sip:watson@bell-telephone.com>;tag=a48s;q=0.7'
    assert parse_name_addr(str(quoted)) == quoted
    tokens = parse_name_addr("Bob  Smith <sips:bob@biloxi.com>")
    assert tokens.display_name == "Bob Smith" and tokens.uri.scheme == "sips" and tokens.params == {}
    bare = parse_name_addr("sip:+12125551212@phone2net.com;tag=887s;user=phone")
    assert bare.display_name is None and bare.uri.params == {}  # params after an addr-spec are header params
    assert bare.params == {"tag": "887s", "user": "phone"}
    inside = parse_name_addr("<sip:+12125551212@phone2net.com;user=phone>;tag=887s")
    assert inside.uri.params == {"user": "phone"} and inside.params == {"tag": "887s"}
    assert parse_name_addr('"" <sip:a@b.com>').display_name == ""
    for bad in ('"unterminated <sip:a@b.com>', "Bell, Alexander <sip:a@b.com>", "<sip:a@b.com", "<sip:a@b.com> junk",
                "sip:a@b.com?x=y", "<sip:a@b.com>;", "<sip:a@b.com>;=x", '"a" sip:a@b.com',
                "< sip:a@b.com>", "", "<<sip:a@b.com>>"):
        with pytest.raises(SipParseError):
            parse_name_addr(bad)
    assert parse_name_addr("<sip:a@b.com>;tag").tag is None  # a valueless tag param is still a param


# ---------------------------------------------------------------------------- RFC 4475 3.1.1: valid messages

WSINV = wire(rb"""
INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0
TO :
 sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n
from   : "J Rosenberg \\\""       <sip:jdrosen@example.com>
  ;
  tag = 98asjd8
MaX-fOrWaRdS: 0068
Call-ID: wsinv.ndaksdj@192.0.2.1
Content-Length   : 150
cseq: 0009
  INVITE
Via  : SIP  /   2.0
 /UDP
    192.0.2.2;branch=390skdjuw
s :
NewFangledHeader:   newfangled value
 continued newfangled value
UnknownHeaderWithUnusualValue: ;;,,;;,;
Content-Type: application/sdp
Route:
 <sip:services.example.com;lr;unknownwith=value;unknown-no-value>
v:  SIP  / 2.0  / TCP     spindle.example.com   ;
  branch  =   z9hG4bK9ikj8  ,
 SIP  /    2.0   / UDP  192.168.255.111   ; branch=
 z9hG4bK30239
m:"Quoted string \"\"" <sip:jdrosen@example.com> ; newparam =
      newvalue ;
  secondparam ; q = 0.33

v=0
o=mhandley 29739 7272939 IN IP4 192.0.2.3
s=-
c=IN IP4 192.0.2.4
t=0 0
m=audio 49217 RTP/AVP 0 12
m=video 3227 RTP/AVP 31
a=rtpmap:31 LPC
""")


def test_rfc4475_wsinv_short_tortuous_invite():
    msg = parse_message(WSINV)
    assert msg.method == "INVITE" and msg.uri == "sip:vivekg@chair-dnrc.example.com;unknownparam"
    assert parse_uri(msg.uri).params == {"unknownparam": None}
    to = parse_name_addr(msg.header("To"))
    assert str(to.uri) == "sip:vivekg@chair-dnrc.example.com" and to.tag == "1918181833n" and to.display_name is None
    sender = parse_name_addr(msg.header("From"))
    assert sender.display_name == 'J Rosenberg \\"' and sender.tag == "98asjd8"
    assert msg.header("Max-Forwards") == "0068" and msg.cseq == (9, "INVITE")
    assert msg.call_id == "wsinv.ndaksdj@192.0.2.1"
    assert [(v.transport, v.host, v.branch) for v in msg.via] == [
        ("UDP", "192.0.2.2", "390skdjuw"), ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239")]
    assert msg.header("Subject") == ""
    assert msg.header("newfangledheader") == "newfangled value continued newfangled value"
    assert msg.header("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    (contact,) = [parse_name_addr(c) for c in msg.headers_named("Contact")]
    assert contact.display_name == 'Quoted string ""' and str(contact.uri) == "sip:jdrosen@example.com"
    assert contact.params == {"newparam": "newvalue", "secondparam": None, "q": "0.33"}
    assert msg.headers_named("Route") == ["<sip:services.example.com;lr;unknownwith=value;unknown-no-value>"]
    assert len(msg.headers) == 14 and len(msg.body) == 150
    assert [m.media for m in parse_sdp(msg.body.decode()).media] == ["audio", "video"]
    again = parse_message(msg.to_bytes())  # canonical form keeps every value
    assert again.via == msg.via and again.header("From") == msg.header("From") and again.body == msg.body


INTMETH = wire(
    b"!interesting-Method0123456789_*+`.%indeed'~ sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    b":&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com SIP/2.0\n"
    b"Via: SIP/2.0/TCP host1.example.com;branch=z9hG4bK-.!%66*_+`'~\n"
    b'To: "BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f" <sip:1_unusual.URI~(to-be!sure)&isn\'t+it$/crazy?,/;;*@example.com>\n'
    b"From: token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;fromParam''~+*_!.-%="
    b'"\xd1\x80\xd0\xb0\xd0\xb1\xd0\xbe\xd1\x82\xd0\xb0\xd1\x8e\xd1\x89\xd0\xb8\xd0\xb9";tag=_token~1\'+`*%!-.\n'
    b"Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{\n"
    b"CSeq: 139122385 !interesting-Method0123456789_*+`.%indeed'~\n"
    b"Max-Forwards: 255\n"
    b"extensionHeader-!.%*+_`'~:\xef\xbb\xbf\xe5\xa4\xa7\xe5\x81\x9c\xe9\x9b\xbb\n"
    b"Content-Length: 0\n\n")


def test_rfc4475_intmeth_wide_range_of_valid_characters():
    msg = parse_message(INTMETH)
    method = "!interesting-Method0123456789_*+`.%indeed'~"
    assert msg.method == method and msg.cseq == (139122385, method)
    uri = parse_uri(msg.uri)
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)" and uri.host == "example.com"
    assert str(uri) == msg.uri
    assert msg.via[0].branch == "z9hG4bK-.!%66*_+`'~"
    to = parse_name_addr(msg.header("To"))
    assert to.display_name == "BEL:\x07 NUL:\x00 DEL:\x7f" and to.uri.user == uri.user
    sender = parse_name_addr(msg.header("From"))
    assert sender.display_name == "token1~` token2'+_ token3*%!.-"
    assert sender.params == {"fromparam''~+*_!.-%": '"работающий"', "tag": "_token~1'+`*%!-."}
    assert msg.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert msg.header("extensionHeader-!.%*+_`'~") == "\ufeff大停電"
    assert msg.header("Max-Forwards") == "255" and msg.body == b""
    assert parse_message(msg.to_bytes()).header("To") == msg.header("To")  # NUL survives as a quoted-pair


def test_rfc4475_esc01_valid_use_of_escapes():
    msg = parse_message(wire(b"""
INVITE sip:sips%3Auser%40example.com@example.net SIP/2.0
To: sip:%75se%72@example.com
From: <sip:I%20have%20spaces@example.net>;tag=938
Max-Forwards: 87
i: esc01.239409asdfakjkn23onasd0-3234
CSeq: 234234 INVITE
Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bKkdjuw
C: application/sdp
Contact:
  <sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31>
Content-Length: 150

""") + rfc_sdp(b"192.0.2.1"))
    uri = parse_uri(msg.uri)
    assert uri.host == "example.net" and unquote(uri.user) == "sips:user@example.com"  # not a sips URI
    assert unquote(parse_name_addr(msg.header("To")).uri.user) == "user"
    assert unquote(parse_name_addr(msg.header("From")).uri.user) == "I have spaces"
    contact = parse_name_addr(msg.header("Contact")).uri
    assert unquote(contact.user) == "caller"
    assert {unquote(k): unquote(v or "") for k, v in contact.params.items()} == {"lr": "", "name": "value%41"}
    assert msg.call_id == "esc01.239409asdfakjkn23onasd0-3234" and msg.header("Content-Type") == "application/sdp"
    assert len(msg.body) == 150


def test_rfc4475_escnull_escaped_nulls_in_uris():
    msg = parse_message(wire(b"""
REGISTER sip:example.com SIP/2.0
To: sip:null-%00-null@example.com
From: sip:null-%00-null@example.com;tag=839923423
Max-Forwards: 70
Call-ID: escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd
CSeq: 14398234 REGISTER
Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bKkdjuw
Contact: <sip:%00@host5.example.com>
Contact: <sip:%00%00@host5.example.com>
L:0

"""))
    assert unquote(parse_name_addr(msg.header("To")).uri.user) == "null-\x00-null"
    assert [parse_name_addr(c).uri.user for c in msg.headers_named("Contact")] == ["%00", "%00%00"]
    assert msg.from_tag == "839923423" and msg.body == b""


def test_rfc4475_esc02_escaped_method_and_header_name_are_distinct_tokens():
    msg = parse_message(wire(b"""
RE%47IST%45R sip:registrar.example.com SIP/2.0
To: "%Z%45" <sip:resource@example.com>
From: "%Z%45" <sip:resource@example.com>;tag=f232jadfj23
Call-ID: esc02.asdfnqwo34rq23i34jrjasdcnl23nrlknsdf
Via: SIP/2.0/TCP host.example.com;branch=z9hG4bK209%fzsnel234
CSeq: 29344 RE%47IST%45R
Max-Forwards: 70
Contact: <sip:alias1@host1.example.com>
C%6Fntact: <sip:alias2@host2.example.com>
Contact: <sip:alias3@host3.example.com>
l: 0

"""))
    assert msg.method == "RE%47IST%45R" and msg.cseq == (29344, "RE%47IST%45R")  # not REGISTER
    assert parse_name_addr(msg.header("To")).display_name == "%Z%45"
    assert msg.via[0].branch == "z9hG4bK209%fzsnel234"
    assert msg.headers_named("Contact") == ["<sip:alias1@host1.example.com>", "<sip:alias3@host3.example.com>"]
    assert msg.header("C%6Fntact") == "<sip:alias2@host2.example.com>"


def test_rfc4475_lwsdisp_no_lws_between_display_name_and_laquot():
    msg = parse_message(wire(b"""
OPTIONS sip:user@example.com SIP/2.0
To: sip:user@example.com
From: caller<sip:caller@example.com>;tag=323
Max-Forwards: 70
Call-ID: lwsdisp.1234abcd@funky.example.com
CSeq: 60 OPTIONS
Via: SIP/2.0/UDP funky.example.com;branch=z9hG4bKkdjuw
l: 0

"""))
    sender = parse_name_addr(msg.header("From"))
    assert sender.display_name == "caller" and str(sender.uri) == "sip:caller@example.com" and sender.tag == "323"


def longreq() -> bytes:
    vias = b"".join(b"%s: SIP/2.0/TCP sip%d.example.com\n" % (name, n) for name, n in zip(
        [b"Via", b"v", b"V", b"Via", b"ViA", b"VIa", b"VIA", b"via", b"viA", b"vIa", b"vIA", b"V ", b"v ", b"V  ",
         b"v  ", b"Via ", b"Via  "] + [b"Via"] * 16, range(33, 0, -1)))
    return wire(
        b"INVITE sip:user@example.com SIP/2.0\n"
        b'To: "I have a user name of ' + b"extreme" * 10 + b' proportion"<sip:user@example.com:6000;unknownparam1=very'
        + b"long" * 20 + b"value;longparam" + b"name" * 25 + b"=shortvalue;very" + b"long" * 25
        + b"ParameterNameWithNoValue>\n"
        b"F: sip:" + b"amazinglylongcallername" * 5 + b"@example.net;tag=12" + b"982" * 50 + b"424;unknownheaderparam"
        + b"name" * 20 + b"=unknowheaderparam" + b"value" * 15 + b";unknownValueless" + b"paramname" * 10 + b"\n"
        b"Call-ID: longreq.one" + b"really" * 20 + b"longcallid\n"
        b"CSeq: 3882340 INVITE\n"
        b"Unknown-" + b"Long" * 20 + b"-Name: unknown-" + b"long" * 20 + b"-value; unknown-" + b"long" * 20
        + b"-parameter-name = unknown-" + b"long" * 20 + b"-parameter-value\n"
        + vias +
        b"Via: SIP/2.0/TCP host.example.com;received=192.0.2.5;branch=very" + b"long" * 50 + b"branchvalue\n"
        b"Max-Forwards: 70\n"
        b"Contact: <sip:" + b"amazinglylongcallername" * 5 + b"@host5.example.net>\n"
        b"Content-Type: application/sdp\n"
        b"l: 150\n\n") + rfc_sdp(b"192.0.2.1")


def test_rfc4475_longreq_long_values_in_header_fields():
    msg = parse_message(longreq())
    assert len(msg.via) == 34
    assert [v.host for v in msg.via[:33]] == [f"sip{n}.example.com" for n in range(33, 0, -1)]
    assert msg.via[-1].params == {"received": "192.0.2.5", "branch": "very" + "long" * 50 + "branchvalue"}
    to = parse_name_addr(msg.header("To"))
    assert to.display_name == "I have a user name of " + "extreme" * 10 + " proportion"
    assert to.uri.port == 6000 and to.uri.params["longparam" + "name" * 25] == "shortvalue"
    assert to.uri.params["very" + "long" * 25 + "parameternamewithnovalue"] is None
    sender = parse_name_addr(msg.header("From"))
    assert sender.uri.user == "amazinglylongcallername" * 5 and sender.tag == "12" + "982" * 50 + "424"
    assert msg.call_id == "longreq.one" + "really" * 20 + "longcallid"
    assert msg.header("Unknown-" + "Long" * 20 + "-Name").startswith("unknown-longlong")
    assert len(msg.body) == 150


def test_rfc4475_dblreq_extra_bytes_after_the_body_are_ignored():
    msg = parse_message(wire(b"""
REGISTER sip:example.com SIP/2.0
To: sip:j.user@example.com
From: sip:j.user@example.com;tag=43251j3j324
Max-Forwards: 8
I: dblreq.0ha0isndaksdj99sdfafnl3lk233412
Contact: sip:j.user@host.example.com
CSeq: 8 REGISTER
Via: SIP/2.0/UDP 192.0.2.125;branch=z9hG4bKkdjuw23492
Content-Length: 0

INVITE sip:joe@example.com SIP/2.0
t: sip:joe@example.com
From: sip:caller@example.net;tag=141334
Max-Forwards: 8
Call-ID: dblreq.0ha0isnda977644900765@192.0.2.15
CSeq: 8 INVITE
Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw380234
Content-Type: application/sdp
Content-Length: 150

v=0
o=mhandley 29739 7272939 IN IP4 192.0.2.15
s=-
c=IN IP4 192.0.2.15
t=0 0
m=audio 49217 RTP/AVP 0 12
m =video 3227 RTP/AVP 31
a=rtpmap:31 LPC
"""))
    assert msg.method == "REGISTER" and msg.call_id == "dblreq.0ha0isndaksdj99sdfafnl3lk233412"
    assert msg.body == b"" and msg.cseq == (8, "REGISTER")


def test_rfc4475_semiuri_semicolons_in_the_uri_user_part():
    msg = parse_message(wire(b"""
OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0
To: sip:j_user@example.com
From: sip:caller@example.org;tag=33242
Max-Forwards: 3
Call-ID: semiuri.0ha0isndaksdj
CSeq: 8 OPTIONS
Accept: application/sdp, application/pkcs7-mime,
        multipart/mixed, multipart/signed,
        message/sip, message/sipfrag
Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKkdjuw
l: 0

"""))
    uri = parse_uri(msg.uri)
    assert (uri.user, uri.host, uri.params) == ("user;par=u%40example.net", "example.com", {})
    assert msg.headers_named("Accept") == ["application/sdp", "application/pkcs7-mime", "multipart/mixed",
                                           "multipart/signed", "message/sip", "message/sipfrag"]


def test_rfc4475_transports_variety_of_transport_types():
    msg = parse_message(wire(b"""
OPTIONS sip:user@example.com SIP/2.0
To: sip:user@example.com
From: <sip:caller@example.com>;tag=323
Max-Forwards: 70
Call-ID:  transports.kijh4akdnaqjkwendsasfdj
Accept: application/sdp
CSeq: 60 OPTIONS
Via: SIP/2.0/UDP t1.example.com;branch=z9hG4bKkdjuw
Via: SIP/2.0/SCTP t2.example.com;branch=z9hG4bKklasjdhf
Via: SIP/2.0/TLS t3.example.com;branch=z9hG4bK2980unddj
Via: SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en
Via: SIP/2.0/TCP t5.example.com;branch=z9hG4bK0a9idfnee
l: 0

"""))
    assert [v.transport for v in msg.via] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]
    assert msg.call_id == "transports.kijh4akdnaqjkwendsasfdj"


MPART01_BINARY = bytes.fromhex("""
30 82 01 52 06 09 2A 86 0D 0A
48 86 F7 0D 01 07 02 A0 82 01 43 30 82 01 3F 02
01 01 31 09 30 07 06 05 2B 0E 03 02 1A 30 0B 06
09 2A 86 48 86 F7 0D 01 07 01 31 82 01 20 30 82
01 1C 02 01 01 30 7C 30 70 31 0B 30 09 06 03 55
04 06 13 02 55 53 31 13 30 11 06 03 55 04 08 13
0A 43 61 6C 69 66 6F 72 6E 69 61 31 11 30 0F 06
03 55 04 07 13 08 53 61 6E 20 4A 6F 73 65 31 0E
30 0C 06 03 55 04 0A 13 05 73 69 70 69 74 31 29
30 27 06 03 55 04 0B 13 20 53 69 70 69 74 20 54
65 73 74 20 43 65 72 74 69 66 69 63 61 74 65 20
41 75 74 68 6F 72 69 74 79 02 08 01 95 00 71 02
33 01 13 30 07 06 05 2B 0E 03 02 1A 30 0D 06 09
2A 86 48 86 F7 0D 01 01 01 05 00 04 81 80 8E F4
66 F9 48 F0 52 2D D2 E5 97 8E 9D 95 AA E9 F2 FE
15 A0 66 59 71 62 92 E8 DA 2A A8 D8 35 0A 68 CE
FF AE 3C BD 2B FF 16 75 DD D5 64 8E 59 3D D6 47
28 F2 62 20 F7 E9 41 74 9E 33 0D 9A 15 ED AB DB
93 D1 0C 42 10 2E 7B 72 89 D2 9C C0 C9 AE 2E FB
C7 C0 CF F9 17 2F 3B 02 7E 4F C0 27 E1 54 6D E4
B6 AA 3A BB 3E 66 CC CB 5D D6 C6 4B 83 83 14 9C
B8 E6 FF 18 2D 94 4F E5 7B 65 BC 99 D0 05
""")  # the signature, with the CRLF after its first 8 bytes that Content-Length 553 counts


def test_rfc4475_mpart01_multipart_body_with_binary_part():
    body = wire(b"""
--7a9cbec02ceef655
Content-Type: text/plain
Content-Transfer-Encoding: binary

Hello
--7a9cbec02ceef655
Content-Type: application/octet-stream
Content-Transfer-Encoding: binary

""") + MPART01_BINARY + b"--7a9cbec02ceef655--\r\n"
    assert len(body) == 553
    msg = parse_message(wire(b"""
MESSAGE sip:kumiko@example.org SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-d87543-4dade06d0bdb11ee-1--d87543-;rport
Max-Forwards: 70
Route: <sip:127.0.0.1:5080>
Identity: r5mwreLuyDRYBi/0TiPwEsY3rEVsk/G2WxhgTV1PF7hHuLIK0YWVKZhKv9Mj8UeXqkMVbnVq37CD+813gvYjcBUaZngQmXc9WNZSDNGCzA+fWl9MEUHWIZo1CeJebdY/XlgKeTa0Olvq0rt70Q5jiSfbqMJmQFteeivUhkMWYUA=
Contact: <sip:fluffy@127.0.0.1:5070>
To: <sip:kumiko@example.org>
From: <sip:fluffy@example.com>;tag=2fb0dcc9
Call-ID: 3d9485ad0c49859b@Zmx1ZmZ5LW1hYy0xNi5sb2NhbA..
CSeq: 1 MESSAGE
Content-Transfer-Encoding: binary
Content-Type: multipart/mixed;boundary=7a9cbec02ceef655
Date: Sat, 15 Oct 2005 04:44:56 GMT
User-Agent: SIPimp.org/0.2.5 (curses)
Content-Length: 553

""") + body)
    assert msg.body == body and msg.method == "MESSAGE"
    assert msg.via[0].params == {"branch": "z9hG4bK-d87543-4dade06d0bdb11ee-1--d87543-", "rport": None}
    assert msg.via[0].port == 5070 and msg.header("Date") == "Sat, 15 Oct 2005 04:44:56 GMT"
    assert parse_message(msg.to_bytes()).body == body


def test_rfc4475_unreason_unusual_reason_phrase():
    phrase = (b"= 2**3 * 5**2 \xd0\xbd\xd0\xbe \xd1\x81\xd1\x82\xd0\xbe \xd0\xb4\xd0\xb5\xd0\xb2\xd1\x8f\xd0\xbd\xd0"
              b"\xbe\xd1\x81\xd1\x82\xd0\xbe \xd0\xb4\xd0\xb5\xd0\xb2\xd1\x8f\xd1\x82\xd1\x8c - \xd0\xbf\xd1\x80\xd0"
              b"\xbe\xd1\x81\xd1\x82\xd0\xbe\xd0\xb5")
    msg = parse_message(b"SIP/2.0 200 " + phrase + b"\r\n" + wire(b"""
Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923
Call-ID: unreason.1234ksdfak3j2erwedfsASdf
CSeq: 35 INVITE
From: sip:user@example.com;tag=11141343
To: sip:user@example.edu;tag=2229
Content-Length: 154
Content-Type: application/sdp
Contact: <sip:user@host198.example.com>

""") + rfc_sdp(b"192.0.2.198"))
    assert msg.status == 200 and msg.reason == "= 2**3 * 5**2 но сто девяносто девять - простое"
    assert len(msg.body) == 154 and msg.to_tag == "2229"
    assert msg.to_bytes().startswith(b"SIP/2.0 200 " + phrase + b"\r\n")


def test_rfc4475_noreason_empty_reason_phrase():
    msg = parse_message(b"SIP/2.0 100 \r\n" + wire(b"""
Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe
Call-ID: noreason.asndj203insdf99223ndf
CSeq: 35 INVITE
From: <sip:user@example.com>;tag=39ansfi3
To: <sip:user@example.edu>;tag=902jndnke3
Content-Length: 0
Contact: <sip:user@host105.example.com>

"""))
    assert (msg.status, msg.reason) == (100, "") and msg.call_id == "noreason.asndj203insdf99223ndf"
    assert msg.to_bytes().startswith(b"SIP/2.0 100 \r\n")


# ---------------------------------------------------------------------------- RFC 4475 3.1.2 / 3.3: refused

INVALID = {
    # 3.1.2.1: empty Via params and list items, empty Contact params.
    "badinv01": (wire(b"""
INVITE sip:user@example.com SIP/2.0
To: sip:j.user@example.com
From: sip:caller@example.net;tag=134161461246
Max-Forwards: 7
Call-ID: badinv01.0ha0isndaksdjasdf3234nas
CSeq: 8 INVITE
Via: SIP/2.0/UDP 192.0.2.15;;,;,,
Contact: "Joe" <sip:joe@example.org>;;;;
Content-Length: 152
Content-Type: application/sdp

""") + rfc_sdp(b"192.0.2.15"), "bad Via parameter"),
    # 3.1.2.2: Content-Length 9999, body of 154: over UDP the message is refused.
    "clerr": (wire(b"""
INVITE sip:user@example.com SIP/2.0
Max-Forwards: 80
To: sip:j.user@example.com
From: sip:caller@example.net;tag=93942939o2
Contact: <sip:caller@hungry.example.net>
Call-ID: clerr.0ha0isndaksdjweiafasdk3
CSeq: 8 INVITE
Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bK-39234-23523
Content-Type: application/sdp
Content-Length: 9999

""") + rfc_sdp(b"192.0.2.155"), "larger than the 154 body bytes"),
    # 3.1.2.3
    "ncl": (wire(b"""
INVITE sip:user@example.com SIP/2.0
Max-Forwards: 254
To: sip:j.user@example.com
From: sip:caller@example.net;tag=32394234
Call-ID: ncl.0ha0isndaksdj2193423r542w35
CSeq: 0 INVITE
Via: SIP/2.0/UDP 192.0.2.53;branch=z9hG4bKkdjuw
Contact: <sip:caller@example53.example.net>
Content-Type: application/sdp
Content-Length: -999

""") + rfc_sdp(b"192.0.2.53"), "bad Content-Length '-999'"),
    # 3.1.2.4: CSeq over 2**32 (and Max-Forwards over 255, checked separately below).
    "scalar02": (wire(b"""
REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bK342sdfoi3
To: <sip:user@example.com>
From: <sip:user@example.com>;tag=239232jh3
CSeq: 36893488147419103232 REGISTER
Call-ID: scalar02.23o0pd9vanlq3wnrlnewofjas9ui32
Max-Forwards: 300
Expires: """ + b"1" + b"0" * 100 + b"""
Contact: <sip:user@host129.example.com>
  ;expires=280297596632815
Content-Length: 0

"""), "bad CSeq"),
    # 3.1.2.5: a response is dropped, not answered.
    "scalarlg": (wire(b"""
SIP/2.0 503 Service Unavailable
Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bKzzxdiwo34sw;received=192.0.2.129
To: <sip:user@example.com>
From: <sip:other@example.net>;tag=2easdjfejw
CSeq: 9292394834772304023312 OPTIONS
Call-ID: scalarlg.noase0of0234hn2qofoaf0232aewf2394r
Retry-After: 949302838503028349304023988
Warning: 1812 overture "In Progress"
Content-Length: 0

"""), "bad CSeq"),
    # 3.1.2.6
    "quotbal": (wire(b"""
INVITE sip:user@example.com SIP/2.0
To: "Mr. J. User <sip:j.user@example.com>
From: sip:caller@example.net;tag=93334
Max-Forwards: 10
Call-ID: quotbal.aksdj
Contact: <sip:caller@host59.example.net>
CSeq: 8 INVITE
Via: SIP/2.0/UDP 192.0.2.59:5050;branch=z9hG4bKkdjuw39234
Content-Type: application/sdp
Content-Length: 152

""") + rfc_sdp(b"192.0.2.15"), "unterminated quoted string"),
    # 3.1.2.7
    "ltgtruri": (wire(b"""
INVITE <sip:user@example.com> SIP/2.0
To: sip:user@example.com
From: sip:caller@example.net;tag=39291
Max-Forwards: 23
Call-ID: ltgtruri.1@192.0.2.5
CSeq: 1 INVITE
Via: SIP/2.0/UDP 192.0.2.5
Contact: <sip:caller@host5.example.net>
Content-Type: application/sdp
Content-Length: 159

""") + rfc_sdp(b"192.0.2.5", b"3149328700 0"), "bad URI '<sip:user@example.com>'"),
    # 3.1.2.8
    "lwsruri": (wire(b"""
INVITE sip:user@example.com; lr SIP/2.0
To: sip:user@example.com;tag=3xfe-9921883-z9f
From: sip:caller@example.net;tag=231413434
Max-Forwards: 5
Call-ID: lwsruri.asdfasdoeoi2323-asdfwrn23-asd834rk423
CSeq: 2130706432 INVITE
Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKkdjuw2395
Contact: <sip:caller@host1.example.net>
Content-Type: application/sdp
Content-Length: 159

""") + rfc_sdp(b"192.0.2.1", b"3149328700 0"), "bad start line"),
    # 3.1.2.9
    "lwsstart": (wire(b"""
INVITE  sip:user@example.com  SIP/2.0
Max-Forwards: 8
To: sip:user@example.com
From: sip:caller@example.net;tag=8814
Call-ID: lwsstart.dfknq234oi243099adsdfnawe3@example.com
CSeq: 1893884 INVITE
Via: SIP/2.0/UDP host1.example.com;branch=z9hG4bKkdjuw3923
Contact: <sip:caller@host1.example.net>
Content-Type: application/sdp
Content-Length: 150

""") + rfc_sdp(b"192.0.2.1"), "bad start line"),
    # 3.1.2.10: RFC 4475 lets a liberal element ignore the trailing SPs; we refuse them.
    "trws": (b"OPTIONS sip:remote-target@example.com SIP/2.0  " + wire(b"""
Via: SIP/2.0/TCP host1.examle.com;branch=z9hG4bK299342093
To: <sip:remote-target@example.com>
From: <sip:local-resource@example.com>;tag=329429089
Call-ID: trws.oicu34958239neffasdhr2345r
Accept: application/sdp
CSeq: 238923 OPTIONS
Max-Forwards: 70
Content-Length: 0

"""), "bad start line"),
    # 3.1.2.11: headers are not allowed in a Request-URI.
    "escruri": (wire(b"""
INVITE sip:user@example.com?Route=%3Csip:example.com%3E SIP/2.0
To: sip:user@example.com
From: sip:caller@example.net;tag=341518
Max-Forwards: 7
Contact: <sip:caller@host39923.example.net>
Call-ID: escruri.23940-asdfhj-aje3br-234q098w-fawerh2q-h4n5
CSeq: 149209342 INVITE
Via: SIP/2.0/UDP host-of-the-hour.example.com;branch=z9hG4bKkdjuw
Content-Type: application/sdp
Content-Length: 150

""") + rfc_sdp(b"192.0.2.1"), "headers in the Request-URI"),
    # 3.1.2.13: RFC 4475 allows either 400 or treating Route as a header param; we give 400.
    "regbadct": (wire(b"""
REGISTER sip:example.com SIP/2.0
To: sip:user@example.com
From: sip:user@example.com;tag=998332
Max-Forwards: 70
Call-ID: regbadct.k345asrl3fdbv@10.0.0.1
CSeq: 1 REGISTER
Via: SIP/2.0/UDP 135.180.130.133:5060;branch=z9hG4bKkdjuw
Contact: sip:user@example.com?Route=%3Csip:sip.example.com%3E
l: 0

"""), "enclosed in <>"),
    # 3.1.2.14: RFC 4475 allows ignoring the spaces; we refuse.
    "badaspec": (wire(b"""
OPTIONS sip:user@example.org SIP/2.0
Via: SIP/2.0/UDP host4.example.com:5060;branch=z9hG4bKkdju43234
Max-Forwards: 70
From: "Bell, Alexander" <sip:a.g.bell@example.com>;tag=433423
To: "Watson, Thomas" < sip:t.watson@example.org >
Call-ID: badaspec.sdf0234n2nds0a099u23h3hnnw009cdkne3
Accept: application/sdp
CSeq: 3923239 OPTIONS
l: 0

"""), "bad URI ' sip:t.watson@example.org '"),
    # 3.1.2.15
    "baddn": (wire(b"""
OPTIONS sip:t.watson@example.org SIP/2.0
Via:     SIP/2.0/UDP c.example.com:5060;branch=z9hG4bKkdjuw
Max-Forwards:      70
From:    Bell, Alexander <sip:a.g.bell@example.com>;tag=43
To:      Watson, Thomas <sip:t.watson@example.org>
Call-ID: baddn.31415@c.example.com
Accept: application/sdp
CSeq:    3923239 OPTIONS
l: 0

"""), "display name must be quoted"),
    # 3.1.2.16: UnsupportedVersion (a SipParseError), so the UA can answer 505.
    "badvers": (wire(b"""
OPTIONS sip:t.watson@example.org SIP/7.0
Via:     SIP/7.0/UDP c.example.com;branch=z9hG4bKkdjuw
Max-Forwards:     70
From:    A. Bell <sip:a.g.bell@example.com>;tag=qweoiqpe
To:      T. Watson <sip:t.watson@example.org>
Call-ID: badvers.31417@c.example.com
CSeq:    1 OPTIONS
l: 0

"""), "unsupported version"),
    # 3.1.2.17
    "mismatch01": (wire(b"""
OPTIONS sip:user@example.com SIP/2.0
To: sip:j.user@example.com
From: sip:caller@example.net;tag=34525
Max-Forwards: 6
Call-ID: mismatch01.dj0234sxdfl3
CSeq: 8 INVITE
Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKkdjuw
l: 0

"""), "does not match"),
    # 3.1.2.18: RFC 4475 expects 400 here rather than 501.
    "mismatch02": (wire(b"""
NEWMETHOD sip:user@example.com SIP/2.0
To: sip:j.user@example.com
From: sip:caller@example.net;tag=34525
Max-Forwards: 6
Call-ID: mismatch02.dj0234sxdfl3
CSeq: 8 INVITE
Contact: <sip:caller@host.example.net>
Via: SIP/2.0/UDP host.example.net;branch=z9hG4bKkdjuw
Content-Type: application/sdp
l: 138

v=0
o=mhandley 29739 7272939 IN IP4 192.0.2.1
c=IN IP4 192.0.2.1
m=audio 49217 RTP/AVP 0 12
m=video 3227 RTP/AVP 31
a=rtpmap:31 LPC
"""), "does not match"),
    # 3.1.2.19
    "bigcode": (wire(b"""
SIP/2.0 4294967301 better not break the receiver
Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe
Call-ID: bigcode.asdof3uj203asdnf3429uasdhfas3ehjasdfas9i
CSeq: 353494 INVITE
From: <sip:user@example.com>;tag=39ansfi3
To: <sip:user@example.edu>;tag=902jndnke3
Content-Length: 0
Contact: <sip:user@host105.example.com>

"""), "bad status code"),
    # 3.3.1: no To, From or Call-ID.
    "insuf": (wire(b"""
INVITE sip:user@example.com SIP/2.0
CSeq: 193942 INVITE
Via: SIP/2.0/UDP 192.0.2.95;branch=z9hG4bKkdj.insuf
Content-Type: application/sdp
l: 152

""") + rfc_sdp(b"192.0.2.95"), "missing To header"),
    # 3.3.8: two To, From, Call-ID, CSeq and Max-Forwards.
    "multi01": (wire(b"""
INVITE sip:user@company.com SIP/2.0
Contact: <sip:caller@host25.example.net>
Via: SIP/2.0/UDP 192.0.2.25;branch=z9hG4bKkdjuw
Max-Forwards: 70
CSeq: 5 INVITE
Call-ID: multi01.98asdh@192.0.2.1
CSeq: 59 INVITE
Call-ID: multi01.98asdh@192.0.2.2
From: sip:caller@example.com;tag=3413415
To: sip:user@example.com
To: sip:other@example.net
From: sip:caller@example.net;tag=2923420123
Content-Type: application/sdp
l: 154
Contact: <sip:caller@host36.example.net>
Max-Forwards: 5

""") + rfc_sdp(b"192.0.2.25"), "more than one To header"),
    # 3.3.9
    "mcl01": (wire(b"""
OPTIONS sip:user@example.com SIP/2.0
Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bK293423
To: sip:user@example.com
From: sip:other@example.net;tag=3923942
Call-ID: mcl01.fhn2323orihawfdoa3o4r52o3irsdf
CSeq: 15932 OPTIONS
Content-Length: 13
Max-Forwards: 60
Content-Length: 5
Content-Type: text/plain

There's no way to know how many octets are supposed to be here.
"""), "more than one Content-Length"),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_rfc4475_invalid_messages_are_refused(name):
    data, reason = INVALID[name]
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_rfc4475_badvers_is_unsupported_version_and_scalar02_checks_each_field():
    with pytest.raises(UnsupportedVersion):
        parse_message(INVALID["badvers"][0])
    fixed_cseq = INVALID["scalar02"][0].replace(b"36893488147419103232", b"1")
    with pytest.raises(SipParseError, match="Max-Forwards '300'"):
        parse_message(fixed_cseq)
    assert parse_message(fixed_cseq.replace(b"Max-Forwards: 300", b"Max-Forwards: 70")).cseq == (1, "REGISTER")
    assert parse_message(INVALID["clerr"][0].replace(b"9999", b"154")).body.startswith(b"v=0")


# ---------------------------------------------------------------------------- RFC 4475: accepted, answered later


def test_rfc4475_badbranch_bare_magic_cookie_is_a_valid_branch():
    msg = parse_message(wire(b"""
OPTIONS sip:user@example.com SIP/2.0
To: sip:user@example.com
From: sip:caller@example.org;tag=33242
Max-Forwards: 3
Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK
Accept: application/sdp
Call-ID: badbranch.sadonfo23i420jv0as0derf3j3n
CSeq: 8 OPTIONS
l: 0

"""))
    assert msg.via[0].branch == "z9hG4bK"


def test_rfc4475_baddate_is_accepted_because_date_is_not_interpreted():
    msg = parse_message(wire(b"""
INVITE sip:user@example.com SIP/2.0
To: sip:user@example.com
From: sip:caller@example.net;tag=2234923
Max-Forwards: 70
Call-ID: baddate.239423mnsadf3j23lj42--sedfnm234
CSeq: 1392934 INVITE
Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKkdjuw
Date: Fri, 01 Jan 2010 16:00:00 EST
Contact: <sip:caller@host5.example.net>
Content-Type: application/sdp
Content-Length: 150

""") + rfc_sdp(b"192.0.2.5"))
    assert msg.header("Date") == "Fri, 01 Jan 2010 16:00:00 EST"


@pytest.mark.parametrize("uri, call_id", [
    (b"nobodyKnowsThisScheme:totallyopaquecontent", b"unkscm.nasdfasser0q239nwsdfasdkl34"),
    (b"soap.beep://192.0.2.103:3002", b"novelsc.asdfasser0q239nwsdfasdkl34"),
])
def test_rfc4475_unkscm_novelsc_parse_and_the_request_uri_gets_416(uri, call_id):
    msg = parse_message(wire(b"""
OPTIONS %s SIP/2.0
To: sip:user@example.com
From: sip:caller@example.net;tag=384
Max-Forwards: 3
Call-ID: %s
CSeq: 3923423 OPTIONS
Via: SIP/2.0/TCP host9.example.com;branch=z9hG4bKkdjuw39234
Content-Length: 0

""" % (uri, call_id)))
    assert msg.uri == uri.decode() and msg.call_id == call_id.decode()
    with pytest.raises(UnsupportedUriScheme):
        parse_uri(msg.uri)


def test_rfc4475_unksm2_unknown_schemes_in_headers_parse_and_the_registrar_refuses():
    msg = parse_message(wire(b"""
REGISTER sip:example.com SIP/2.0
To: isbn:2983792873
From: <http://www.example.com>;tag=3234233
Call-ID: unksm2.daksdj@hyphenated-host.example.com
CSeq: 234902 REGISTER
Max-Forwards: 70
Via: SIP/2.0/UDP 192.0.2.21:5060;branch=z9hG4bKkdjuw
Contact: <name:John_Smith>
l: 0

"""))
    assert msg.from_tag == "3234233" and msg.to_tag is None
    for name in ("To", "From", "Contact"):
        with pytest.raises(UnsupportedUriScheme):
            parse_name_addr(msg.header(name))
    assert make_response(msg, 400, to_tag="r1").header("To") == "isbn:2983792873;tag=r1"


def test_rfc4475_bext01_require_and_proxy_require_lists_for_a_420():
    msg = parse_message(wire(b"""
OPTIONS sip:user@example.com SIP/2.0
To: sip:j_user@example.com
From: sip:caller@example.net;tag=242etr
Max-Forwards: 6
Call-ID: bext01.0ha0isndaksdj
Require: nothingSupportsThis, nothingSupportsThisEither
Proxy-Require: noProxiesSupportThis, norDoAnyProxiesSupportThis
CSeq: 8 OPTIONS
Via: SIP/2.0/TLS fold-and-staple.example.com;branch=z9hG4bKkdjuw
Content-Length: 0

"""))
    assert msg.headers_named("Require") == ["nothingSupportsThis", "nothingSupportsThisEither"]
    assert msg.headers_named("Proxy-Require") == ["noProxiesSupportThis", "norDoAnyProxiesSupportThis"]


def test_rfc4475_invut_regaut01_sdp01_parse_for_415_401_406():
    invut = parse_message(wire(b"""
INVITE sip:user@example.com SIP/2.0
Contact: <sip:caller@host5.example.net>
To: sip:j.user@example.com
From: sip:caller@example.net;tag=8392034
Max-Forwards: 70
Call-ID: invut.0ha0isndaksdjadsfij34n23d
CSeq: 235448 INVITE
Via: SIP/2.0/UDP somehost.example.com;branch=z9hG4bKkdjuw
Content-Type: application/unknownformat
Content-Length: 40

<audio>
 <pcmu port="443"/>
</audio>
"""))
    assert invut.header("Content-Type") == "application/unknownformat" and len(invut.body) == 40
    regaut = parse_message(wire(b"""
REGISTER sip:example.com SIP/2.0
To: sip:j.user@example.com
From: sip:j.user@example.com;tag=87321hj23128
Max-Forwards: 8
Call-ID: regaut01.0ha0isndaksdj
CSeq: 9338 REGISTER
Via: SIP/2.0/TCP 192.0.2.253;branch=z9hG4bKkdjuw
Authorization: NoOneKnowsThisScheme opaque-data=here
Content-Length:0

"""))
    assert regaut.header("Authorization") == "NoOneKnowsThisScheme opaque-data=here"
    sdp01 = parse_message(wire(b"""
INVITE sip:user@example.com SIP/2.0
To: sip:j_user@example.com
Contact: <sip:caller@host15.example.net>
From: sip:caller@example.net;tag=234
Max-Forwards: 5
Call-ID: sdp01.ndaksdj9342dasdd
Accept: text/nobodyKnowsThis
CSeq: 8 INVITE
Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw
Content-Length: 150
Content-Type: application/sdp

""") + rfc_sdp(b"192.0.2.5"))
    assert sdp01.headers_named("Accept") == ["text/nobodyKnowsThis"]


def test_rfc4475_bcast_response_with_broadcast_via_parses_and_has_two_vias():
    msg = parse_message(wire(b"""
SIP/2.0 200 OK
Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923
Via: SIP/2.0/UDP 255.255.255.255;branch=z9hG4bK1saber23
Call-ID: bcast.0384840201234ksdfak3j2erwedfsASdf
CSeq: 35 INVITE
From: sip:user@example.com;tag=11141343
To: sip:user@example.edu;tag=2229
Content-Length: 154
Content-Type: application/sdp
Contact: <sip:user@host28.example.com>

""") + rfc_sdp(b"192.0.2.198"))
    # A UAC drops a response with more than one Via (RFC 3261 8.1.3.3); that is the UA's rule.
    assert [v.host for v in msg.via] == ["192.0.2.198", "255.255.255.255"]


def test_rfc4475_zeromf_max_forwards_zero_is_valid():
    msg = parse_message(wire(b"""
OPTIONS sip:user@example.com SIP/2.0
To: sip:user@example.com
From: sip:caller@example.net;tag=3ghsd41
Call-ID: zeromf.jfasdlfnm2o2l43r5u0asdfas
CSeq: 39234321 OPTIONS
Via: SIP/2.0/UDP host1.example.com;branch=z9hG4bKkdjuw2349i
Max-Forwards: 0
Content-Length: 0

"""))
    assert msg.header("Max-Forwards") == "0"


def test_rfc4475_cparam01_cparam02_regescrt_contact_params_and_escaped_headers():
    cparam01 = parse_message(wire(b"""
REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP saturn.example.com:5060;branch=z9hG4bKkdjuw
Max-Forwards: 70
From: sip:watson@example.com;tag=DkfVgjkrtMwaerKKpe
To: sip:watson@example.com
Call-ID: cparam01.70710@saturn.example.com
CSeq: 2 REGISTER
Contact: sip:+19725552222@gw1.example.net;unknownparam
l: 0

"""))
    bare = parse_name_addr(cparam01.header("Contact"))  # without <> the param is the Contact's
    assert bare.uri.params == {} and bare.params == {"unknownparam": None}
    cparam02 = parse_message(wire(b"""
REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP saturn.example.com:5060;branch=z9hG4bKkdjuw
Max-Forwards: 70
From: sip:watson@example.com;tag=838293
To: sip:watson@example.com
Call-ID: cparam02.70710@saturn.example.com
CSeq: 3 REGISTER
Contact: <sip:+19725552222@gw1.example.net;unknownparam>
l: 0

"""))
    inside = parse_name_addr(cparam02.header("Contact"))  # inside <> it is the URI's
    assert inside.uri.params == {"unknownparam": None} and inside.params == {}
    regescrt = parse_message(wire(b"""
REGISTER sip:example.com SIP/2.0
To: sip:user@example.com
From: sip:user@example.com;tag=8
Max-Forwards: 70
Call-ID: regescrt.k345asrl3fdbv@192.0.2.1
CSeq: 14398234 REGISTER
Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bKkdjuw
M: <sip:user@example.com?Route=%3Csip:sip.example.com%3E>
L:0

"""))
    escaped = parse_name_addr(regescrt.header("Contact"))
    assert escaped.uri.headers == {"Route": "%3Csip:sip.example.com%3E"}
    assert unquote(escaped.uri.headers["Route"]) == "<sip:sip.example.com>"


def test_rfc4475_inv2543_rfc2543_syntax_is_accepted():
    msg = parse_message(wire(b"""
INVITE sip:UserB@example.com SIP/2.0
Via: SIP/2.0/UDP iftgw.example.com
From: <sip:+13035551111@ift.client.example.net;user=phone>
Record-Route: <sip:UserB@example.com;maddr=ss1.example.com>
To: sip:+16505552222@ss1.example.net;user=phone
Call-ID: inv2543.1717@ift.client.example.com
CSeq: 56 INVITE
Content-Type: application/sdp

v=0
o=mhandley 29739 7272939 IN IP4 192.0.2.5
s=-
c=IN IP4 192.0.2.5
t=0 0
m=audio 49217 RTP/AVP 0
"""))
    # No Max-Forwards, no branch, no From tag, no Content-Length: the body is the rest.
    assert msg.via[0].branch is None and msg.from_tag is None and msg.header("Max-Forwards") is None
    assert msg.body.endswith(b"m=audio 49217 RTP/AVP 0\r\n")
    _, codec = answer_audio(parse_sdp(msg.body.decode()), "192.0.2.1", 30000, 1)
    assert codec.name == "PCMU" and (codec.remote_ip, codec.remote_port) == ("192.0.2.5", 49217)
    response = make_response(msg, 200, to_tag="x")
    assert response.header("To") == "sip:+16505552222@ss1.example.net;user=phone;tag=x"
    assert response.header("Record-Route") == "<sip:UserB@example.com;maddr=ss1.example.com>"


# ---------------------------------------------------------------------------- fuzzing

SPECIALS = [b"\r\n", b"\r\n ", b"\n", b":", b",", b";", b"<", b">", b'"', b"\\", b"\x00", b" ", b"=", b"@",
            b"[", b"]", b"%", b"\xff", b"\r", b"\t", b"?", b"/", b"0", b"9" * 12, b"-"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.randint(1, 3)):
        if not data:
            break
        op = rng.randrange(6)
        at = rng.randrange(len(data))
        if op == 0:
            data = data[:at]
        elif op == 1:
            data = data[:at] + bytes([rng.randrange(256)]) + data[at + 1:]
        elif op == 2:
            data = data[:at] + rng.choice(SPECIALS) + data[at:]
        elif op == 3:
            data = data[:at] + data[at + rng.randint(1, 20):]
        elif op == 4:
            lines = data.split(b"\r\n")
            line = rng.randrange(len(lines))
            lines.insert(line, lines[line])
            data = b"\r\n".join(lines)
        else:
            data = data[:at] + rng.choice(SPECIALS) + data[at + 1:]
    return data


def sip_like(rng: random.Random) -> bytes:
    pieces = [b"INVITE", b"SIP/2.0", b"sip:", b"Via:", b"v:", b"To:", b"From:", b"CSeq:", b"Call-ID:", b"l:",
              b"Content-Length:", b"<sip:a@b>", b"tag=", b"branch=z9hG4bK", b"1", b"-1", b"\"", b"\\", b";", b",",
              b"rport", b"[::1]", b"SIP/2.0/UDP", b"200", b"OK"]
    lines = [b" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 5))) for _ in range(rng.randint(1, 12))]
    return b"\r\n".join(lines) + rng.choice([b"", b"\r\n\r\n", b"\r\n\r\nbody"])


def exercise(msg: SipMessage) -> None:
    """Everything a parsed message offers works, or raises SipParseError only."""
    assert msg.via and msg.cseq and msg.call_id  # checked at parse time: must not raise
    assert msg.from_tag != "" and msg.to_tag != ""
    for name, value in msg.headers:
        for parse, arg in ((msg.headers_named, name), (parse_name_addr, value), (parse_uri, value)):
            try:
                parse(arg)
            except SipParseError:
                pass
    again = parse_message(msg.to_bytes())

    def comparable(m: SipMessage) -> list[tuple[str, str]]:
        return [(canonical_name(n), v) for n, v in m.headers if canonical_name(n) != "Content-Length"]

    assert comparable(again) == comparable(msg) and again.body == msg.body
    assert (again.method, again.uri, again.status, again.reason) == (msg.method, msg.uri, msg.status, msg.reason)


def test_fuzz_garbage_and_mutations_raise_only_sip_parse_error():
    rng = random.Random(4475)
    seeds = [invite(), WSINV, INTMETH, longreq(), INVALID["badinv01"][0], options(b"Contact: *")]
    garbage = [bytes(rng.randrange(256) for _ in range(rng.randrange(120))) for _ in range(1000)]
    cases = garbage[:500] + [b"INVITE sip:a@b.example SIP/2.0\r\n" + g + b"\r\n\r\n" for g in garbage[500:]]
    cases += [sip_like(rng) for _ in range(1000)]
    cases += [mutate(rng, rng.choice(seeds)) for _ in range(3000)]
    parsed = 0
    started = time.perf_counter()
    for data in cases:
        try:
            msg = parse_message(data)
        except SipParseError:
            continue
        parsed += 1
        exercise(msg)
    elapsed = time.perf_counter() - started
    assert parsed > 300  # the mutations must leave plenty of messages that still parse
    assert elapsed < 4.0, f"{len(cases)} messages took {elapsed:.2f} s"


VALUE_SEEDS = ['"Mr. \\"Big\\" W" <sip:w@bell.example.com:5070;transport=tcp?subject=x>;tag=a48s;q=0.7',
               "caller<sip:user;par=u%40example.net@[2001:db8::1];lr>", "sip:+1-212@gw.example.com;user=phone;tag=1",
               "tel:+1-201-555-0123;phone-context=example.com", "<sip:a,b@x.example.com>, <sip:c@y.example.com>",
               "SIP/2.0/UDP 10.0.0.5:5060;rport=40000;branch=z9hG4bK1;received=192.0.2.7;maddr=239.1.1.1",
               "SIP / 2.0 / TLS [2001:db8::9]:5061 ; branch = z9hG4bK2 ; rport"]
VALUE_PIECES = ['"', "\\", "<", ">", "@", ":", "99999", "0", ";", "=", ",", " ", "[", "]", "?", "&", "/", "%",
                "\x00", "\u00e9", "sip:", "rport", "rport=", "received=", "maddr="]


def mutate_text(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(text) + 1)
        op = rng.randrange(4)
        if op == 0:
            text = text[:at]
        elif op == 1:
            text = text[:at] + text[at + rng.randint(1, 8):]
        elif op == 2:
            text = text[:at] + rng.choice(VALUE_PIECES) + text[at:]
        else:
            text = text[:at] + rng.choice(VALUE_PIECES) + text[at + 1:]
    return text


def test_fuzz_value_parsers_raise_only_sip_parse_error():
    rng = random.Random(3261)
    parsers = (parse_name_addr, parse_uri, parse_via, lambda v: response_address(parse_via(v), ("192.0.2.1", 5060)),
               lambda v: split_top(v, ","))
    accepted = 0
    for _ in range(3000):
        value = mutate_text(rng, rng.choice(VALUE_SEEDS))
        for parse in parsers:
            try:
                parse(value)
                accepted += 1
            except SipParseError:
                pass
    assert accepted > 3000


# ---------------------------------------------------------------------------- SDP

SOFTPHONE_OFFER = """v=0\r
o=- 3891334461 3891334461 IN IP4 192.168.1.20\r
s=Softphone\r
c=IN IP4 192.168.1.20\r
t=0 0\r
m=audio 8000 RTP/AVP 9 8 0 101\r
a=rtpmap:9 G722/8000\r
a=rtpmap:8 PCMA/8000\r
a=rtpmap:0 PCMU/8000\r
a=rtpmap:101 telephone-event/8000\r
a=fmtp:101 0-16\r
a=ptime:20\r
a=sendrecv\r
"""


def test_parse_typical_softphone_offer():
    offer = parse_sdp(SOFTPHONE_OFFER)
    assert offer.origin.session_id == 3891334461 and offer.session_name == "Softphone"
    assert offer.connection == "192.168.1.20"
    (audio,) = offer.media
    assert (audio.media, audio.port, audio.proto, audio.formats) == ("audio", 8000, "RTP/AVP", [9, 8, 0, 101])
    assert audio.rtpmap == {9: ("G722", 8000, 1), 8: ("PCMA", 8000, 1), 0: ("PCMU", 8000, 1),
                            101: ("telephone-event", 8000, 1)}
    assert audio.fmtp == {101: "0-16"} and audio.ptime == 20 and audio.direction == "sendrecv"
    assert audio.connection is None and offer.address_for(audio) == "192.168.1.20"


def test_answer_picks_pcmu_and_keeps_telephone_event():
    answer, codec = answer_audio(parse_sdp(SOFTPHONE_OFFER), "192.0.2.1", 30000, 42)
    assert (codec.name, codec.payload_type, codec.clock_rate, codec.dtmf_payload_type) == ("PCMU", 0, 8000, 101)
    assert (codec.remote_ip, codec.remote_port, codec.ptime, codec.direction) == ("192.168.1.20", 8000, 20, "sendrecv")
    assert answer == ("v=0\r\no=- 42 42 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
                      "m=audio 30000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
                      "a=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n")
    parsed = parse_sdp(answer)
    assert parsed.media[0].formats == [0, 101] and parsed.connection == "192.0.2.1"


def test_answer_keeps_the_offers_payload_numbers():
    offer = SOFTPHONE_OFFER.replace("RTP/AVP 9 8 0 101", "RTP/AVP 8 96").replace("a=rtpmap:101", "a=rtpmap:96") \
        .replace("a=fmtp:101 0-16", "a=fmtp:96 0-15")
    answer, codec = answer_audio(parse_sdp(offer), "192.0.2.1", 30000, 1)
    assert (codec.name, codec.payload_type, codec.dtmf_payload_type) == ("PCMA", 8, 96)
    assert "m=audio 30000 RTP/AVP 8 96\r\n" in answer and "a=fmtp:96 0-15\r\n" in answer
    dynamic = SOFTPHONE_OFFER.replace("RTP/AVP 9 8 0 101", "RTP/AVP 97 101").replace("a=rtpmap:0 PCMU", "a=rtpmap:97 PCMU")
    _, codec = answer_audio(parse_sdp(dynamic), "192.0.2.1", 30000, 1)
    assert (codec.name, codec.payload_type) == ("PCMU", 97)
    no_dtmf = SOFTPHONE_OFFER.replace(" 101\r", "\r").replace("a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\n", "")
    answer, codec = answer_audio(parse_sdp(no_dtmf), "192.0.2.1", 30000, 1)
    assert codec.dtmf_payload_type is None and "telephone-event" not in answer and "m=audio 30000 RTP/AVP 0\r\n" in answer


def test_opus_only_offer_has_no_common_codec():
    offer = SOFTPHONE_OFFER.replace("RTP/AVP 9 8 0 101", "RTP/AVP 111 101").replace(
        "a=rtpmap:9 G722/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000", "a=rtpmap:111 opus/48000/2")
    assert parse_sdp(offer).media[0].rtpmap[111] == ("opus", 48000, 2)
    with pytest.raises(NoCommonCodec):
        answer_audio(parse_sdp(offer), "192.0.2.1", 30000, 1)
    assert issubclass(NoCommonCodec, SdpError)
    savp = SOFTPHONE_OFFER.replace("RTP/AVP", "RTP/SAVP")  # no SRTP here
    with pytest.raises(NoCommonCodec):
        answer_audio(parse_sdp(savp), "192.0.2.1", 30000, 1)


@pytest.mark.parametrize("offered, answered", [("sendrecv", "sendrecv"), ("sendonly", "recvonly"),
                                               ("recvonly", "sendonly"), ("inactive", "inactive")])
def test_answer_direction(offered, answered):
    answer, codec = answer_audio(parse_sdp(SOFTPHONE_OFFER.replace("a=sendrecv", f"a={offered}")), "192.0.2.1", 30000, 1)
    assert codec.direction == answered and answer.endswith(f"a={answered}\r\n")
    session_level = SOFTPHONE_OFFER.replace("a=sendrecv\r\n", "").replace("t=0 0\r\n", f"t=0 0\r\na={offered}\r\n")
    assert parse_sdp(session_level).media[0].direction == offered
    assert answer_audio(parse_sdp(session_level), "192.0.2.1", 30000, 1)[1].direction == answered


def test_audio_and_video_offer_rejects_video_with_port_zero():
    offer = SOFTPHONE_OFFER + ("m=video 8002 RTP/AVP 96 97\r\na=rtpmap:96 H264/90000\r\na=rtpmap:97 VP8/90000\r\n"
                               "m=image 8004 udptl t38\r\n")
    parsed = parse_sdp(offer)
    assert [m.media for m in parsed.media] == ["audio", "video", "image"]
    assert parsed.media[2].formats == [] and parsed.media[2].fmt == ["t38"]
    answer, codec = answer_audio(parsed, "192.0.2.1", 30000, 7)
    assert codec.name == "PCMU"
    m_lines = [line for line in answer.split("\r\n") if line.startswith("m=")]
    assert m_lines == ["m=audio 30000 RTP/AVP 0 101", "m=video 0 RTP/AVP 96 97", "m=image 0 udptl t38"]
    # A rejected or second audio stream gets port 0; media-level c= and the offer's t= are used.
    two = ("v=0\r\no=- 1 1 IN IP4 192.0.2.9\r\ns=-\r\nt=3149328700 0\r\n"
           "m=audio 0 RTP/AVP 0\r\nc=IN IP4 192.0.2.9\r\n"
           "m=audio 7000 RTP/AVP 8\r\nc=IN IP4 192.0.2.10\r\n"
           "m=audio 7002 RTP/AVP 0\r\nc=IN IP4 192.0.2.11\r\n")
    answer, codec = answer_audio(parse_sdp(two), "2001:db8::1", 30000, 9)
    assert (codec.name, codec.remote_ip, codec.remote_port) == ("PCMA", "192.0.2.10", 7000)
    assert [line for line in answer.split("\r\n") if line.startswith(("m=", "c=", "o=", "t="))] == [
        "o=- 9 9 IN IP6 2001:db8::1", "c=IN IP6 2001:db8::1", "t=3149328700 0",
        "m=audio 0 RTP/AVP 0", "m=audio 30000 RTP/AVP 8", "m=audio 0 RTP/AVP 0"]


def test_rfc4475_body_answer_accepts_audio_and_rejects_video():
    answer, codec = answer_audio(parse_sdp(rfc_sdp(b"192.0.2.4")), "192.0.2.1", 30000, 3)
    assert (codec.name, codec.remote_ip, codec.remote_port) == ("PCMU", "192.0.2.4", 49217)
    assert "m=audio 30000 RTP/AVP 0\r\n" in answer and "m=video 0 RTP/AVP 31\r\n" in answer


def test_make_offer_and_read_the_answer():
    offer = make_offer("192.0.2.1", 30000, 99)
    parsed = parse_sdp(offer)
    (audio,) = parsed.media
    assert (audio.port, audio.formats, audio.ptime, audio.direction) == (30000, [0, 8, 101], 20, "sendrecv")
    assert audio.rtpmap == {0: ("PCMU", 8000, 1), 8: ("PCMA", 8000, 1), 101: ("telephone-event", 8000, 1)}
    assert audio.fmtp == {101: "0-16"} and parsed.origin.session_id == 99 and parsed.connection == "192.0.2.1"
    remote = ("v=0\r\no=- 5 5 IN IP4 203.0.113.5\r\ns=-\r\nc=IN IP4 203.0.113.5\r\nt=0 0\r\n"
              "m=audio 40000 RTP/AVP 8 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendonly\r\n")
    codec = codec_from_answer(parse_sdp(remote))
    assert (codec.name, codec.payload_type, codec.dtmf_payload_type) == ("PCMA", 8, 101)
    assert (codec.remote_ip, codec.remote_port, codec.direction) == ("203.0.113.5", 40000, "recvonly")
    with pytest.raises(NoCommonCodec):
        codec_from_answer(parse_sdp(remote.replace("m=audio 40000", "m=audio 0")))


GOOD_SDP = "v=0\r\no=- 1 1 IN IP4 192.0.2.9\r\ns=-\r\nc=IN IP4 192.0.2.9\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0\r\n"


@pytest.mark.parametrize("text", [
    "",
    GOOD_SDP.replace("v=0\r\n", ""),
    GOOD_SDP.replace("v=0", "v=1"),
    GOOD_SDP.replace("o=- 1 1 IN IP4 192.0.2.9\r\n", ""),
    GOOD_SDP.replace("s=-\r\n", ""),
    GOOD_SDP.replace("c=IN IP4 192.0.2.9\r\n", ""),
    GOOD_SDP.replace("m=audio 7000 RTP/AVP 0\r\n", ""),
    GOOD_SDP.replace("7000", "70000"),
    GOOD_SDP.replace("7000", "-1"),
    GOOD_SDP.replace("7000", "abc"),
    GOOD_SDP.replace("RTP/AVP 0", "RTP/AVP PCMU"),
    GOOD_SDP.replace("RTP/AVP 0", "RTP/AVP 128"),
    GOOD_SDP.replace("RTP/AVP 0", "RTP/AVP"),
    GOOD_SDP.replace("o=- 1 1 IN IP4 192.0.2.9", "o=- 1 IN IP4 192.0.2.9"),
    GOOD_SDP.replace("o=- 1 1", "o=- x 1"),
    GOOD_SDP.replace("c=IN IP4 192.0.2.9", "c=IN IP4"),
    GOOD_SDP.replace("c=IN IP4", "c=XX IP4"),
    GOOD_SDP + "a=rtpmap:x PCMU/8000\r\n",
    GOOD_SDP + "a=rtpmap:PCMU/8000\r\n",
    GOOD_SDP + "a=fmtp:abc 0-15\r\n",
    GOOD_SDP + "a=ptime:soon\r\n",
    GOOD_SDP + "a=ptime:0\r\n",
    GOOD_SDP + "a=ptime:inf\r\n",
    GOOD_SDP + "a=ptime:1e400\r\n",
    GOOD_SDP + "a=rtpmap:\r\n",
    GOOD_SDP + "m =video 3227 RTP/AVP 31\r\n",
    GOOD_SDP + "nonsense\r\n",
    GOOD_SDP.replace("m=audio 7000", "m=audio 7000/x"),
])
def test_malformed_sdp(text):
    with pytest.raises(SdpError) as info:
        parse_sdp(text)
    assert "\n" not in str(info.value)
    assert parse_sdp(GOOD_SDP).media[0].port == 7000


def test_sdp_bytes_and_extra_lines():
    parsed = parse_sdp((GOOD_SDP + "a=rtcp:7001\r\nb=AS:64\r\ni=info\r\n").encode())
    assert parsed.media[0].attributes == [("rtcp", "7001")]
    # An rtpmap without a clock rate (RFC 4475 bodies: "a=rtpmap:31 LPC") is kept raw, not used.
    loose = parse_sdp(GOOD_SDP + "a=rtpmap:0 PCMU\r\na=rtpmap:8 PCMA/fast\r\na=rtpmap:9\tG722/8000\r\na=ptime:30.0\r\n")
    assert loose.media[0].rtpmap == {9: ("G722", 8000, 1)} and loose.media[0].ptime == 30
    assert loose.media[0].attributes == [("rtpmap", "0 PCMU"), ("rtpmap", "8 PCMA/fast")]
    with pytest.raises(SdpError, match="UTF-8"):
        parse_sdp(b"v=0\r\ns=\xff\r\n")
    assert parse_sdp(GOOD_SDP.replace("\r\n", "\n")).media[0].formats == [0]  # LF-only senders


def test_fuzz_sdp_raises_only_sdp_error():
    rng = random.Random(4566)
    seeds = [SOFTPHONE_OFFER.encode(), make_offer("192.0.2.1", 4000, 1).encode(), rfc_sdp(b"192.0.2.4")]
    for _ in range(1500):
        data = mutate(rng, rng.choice(seeds))
        try:
            offer = parse_sdp(data)
        except SdpError:
            continue
        try:
            answer, codec = answer_audio(offer, "192.0.2.1", 30000, 1)
        except NoCommonCodec:
            continue
        assert parse_sdp(answer).media and codec.name in ("PCMU", "PCMA")
