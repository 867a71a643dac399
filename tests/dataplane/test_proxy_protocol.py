"""PROXY protocol v1/v2 parser (stickyproxy/dataplane/proxy_protocol.py).

Vectors are built by hand from HAProxy's proxy-protocol.txt (§2.1 v1, §2.2 v2, §2.2.7 TLVs);
a slow test puts a real HAProxy (send-proxy, send-proxy-v2, and its v2 health checks) in front
of a recording TCP server and feeds what it sent to the parser.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stickyproxy.dataplane.proxy_protocol import (
    MAX_HEADER_BYTES,
    MAX_V1_BYTES,
    MAX_V2_BYTES,
    MAX_V2_LENGTH,
    MAX_V2_TLV_BYTES,
    V2_SIGNATURE,
    Header,
    Invalid,
    NeedMore,
    crc32c,
    parse,
)
from support.net import IO_TIMEOUT, LOCALHOST, eventually, free_port

SIG = V2_SIGNATURE
assert SIG == bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    return (
        SIG
        + bytes([ver_cmd, fam])
        + struct.pack("!H", len(body) if length is None else length)
        + body
    )


def tcp4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        socket.inet_pton(socket.AF_INET, src)
        + socket.inet_pton(socket.AF_INET, dst)
        + struct.pack("!HH", sport, dport)
    )


def tcp6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


REQUEST = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"

# -- v1 ------------------------------------------------------------------------------------
V1_VALID = [
    # (line, family, source, destination)
    (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        "TCP4",
        ("192.168.0.1", 56324),
        ("192.168.0.11", 443),
    ),
    (
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        "TCP4",
        ("255.255.255.255", 65535),
        ("255.255.255.255", 65535),
    ),
    (b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n", "TCP4", ("0.0.0.0", 0), ("10.0.0.1", 0)),
    (b"PROXY TCP6 ::1 2001:db8::1 1 65535\r\n", "TCP6", ("::1", 1), ("2001:db8::1", 65535)),
    (
        b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::ffff:a00:1 80 8080\r\n",
        "TCP6",
        ("2001:db8::1", 80),
        ("10.0.0.1", 8080),
    ),
    (
        (
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
            b" 65535 65535\r\n"
        ),
        "TCP6",
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
    ),
    # IPv4-mapped, as HAProxy writes a v4 client on a v6 connection: given as the IPv4 client
    (
        b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::2 5000 443\r\n",
        "TCP6",
        ("192.0.2.7", 5000),
        ("2001:db8::2", 443),
    ),
    (b"PROXY TCP6 ::FFFF:C000:0207 ::ffff:0:0 1 2\r\n", "TCP6", ("192.0.2.7", 1), ("0.0.0.0", 2)),
    (
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255 ::1 1 2\r\n",
        "TCP6",
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1),
        ("::1", 2),
    ),
    (b"PROXY UNKNOWN\r\n", "UNKNOWN", None, None),
    # §2.1: after UNKNOWN "the receiver must ignore anything presented before the CRLF"
    (
        (
            b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff"
            b":ffff 65535 65535\r\n"
        ),
        "UNKNOWN",
        None,
        None,
    ),
    (b"PROXY UNKNOWN whatever 1.2.3.4\r\n", "UNKNOWN", None, None),
]


@pytest.mark.parametrize("line,family,source,destination", V1_VALID)
def test_v1_valid(line, family, source, destination):
    got = parse(line + REQUEST)
    assert got == Header(1, False, family, source, destination, len(line))
    assert len(line) <= MAX_V1_BYTES


def test_v1_longest_line_is_107_bytes():
    line = max((v[0] for v in V1_VALID), key=len)
    assert line.startswith(b"PROXY UNKNOWN ffff:")
    assert len(line) == MAX_V1_BYTES == 107
    assert isinstance(parse(line), Header)


V1_INVALID = [
    # (bytes, reason)
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n", "v1: bare CR or LF"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\r\n", "v1: bare CR or LF"),
    (b"PROXY TCP4 192.168.0.1\r192.168.0.11 56324 443\r\n", "v1: bare CR or LF"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\rX", "v1: bare CR or LF"),
    (b"PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\r\n", "v1: malformed line"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \r\n", "v1: malformed line"),
    (b"PROXY  TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", "v1: malformed line"),
    (b"PROXY tcp4 192.168.0.1 192.168.0.11 56324 443\r\n", "v1: malformed line"),
    (b"PROXY TCP5 192.168.0.1 192.168.0.11 56324 443\r\n", "v1: malformed line"),
    (b"PROXY UDP4 192.168.0.1 192.168.0.11 56324 443\r\n", "v1: malformed line"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n", "v1: malformed line"),
    (b"PROXY TCP4\r\n", "v1: malformed line"),
    (b"PROXY \r\n", "v1: malformed line"),
    (b"PROXY UNKNOWNX\r\n", "v1: malformed line"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n", "v1: malformed line"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 00 443\r\n", "v1: malformed line"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 +1 443\r\n", "v1: malformed line"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 -1 443\r\n", "v1: malformed line"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 123456 443\r\n", "v1: malformed line"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n", "v1: port out of range"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 1 99999\r\n", "v1: port out of range"),
    (b"PROXY TCP4 192.168.0.01 192.168.0.11 1 2\r\n", "v1: malformed address"),
    (b"PROXY TCP4 256.1.1.1 192.168.0.11 1 2\r\n", "v1: malformed address"),
    (b"PROXY TCP4 1.2.3 192.168.0.11 1 2\r\n", "v1: malformed address"),
    (b"PROXY TCP4 1.2.3.4.5 192.168.0.11 1 2\r\n", "v1: malformed address"),
    (b"PROXY TCP4 ::1 192.168.0.11 1 2\r\n", "v1: malformed address"),
    (b"PROXY TCP6 192.168.0.1 ::1 1 2\r\n", "v1: malformed address"),
    (b"PROXY TCP6 ::1 ::ffff:01.2.3.4 1 2\r\n", "v1: malformed address"),
    (b"PROXY TCP6 ::1 ::ffff:1.2.3 1 2\r\n", "v1: malformed address"),
    (b"PROXY TCP6 ::1 ::ffff:256.2.3.4 1 2\r\n", "v1: malformed address"),
    (b"PROXY TCP6 ::1 ::ffff:1.2.3.4.5 1 2\r\n", "v1: malformed address"),
    (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "v1: malformed address"),
    (b"PROXY TCP6 12345::1 ::1 1 2\r\n", "v1: malformed address"),
    (b"PROXY TCP6 1:2:3:4:5:6:7 ::1 1 2\r\n", "v1: malformed address"),
    (b"PROXY TCP6 :: : 1 2\r\n", "v1: malformed address"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "v1: malformed line"),
    (b"PROXY TCP4 \xd9\xa1.2.3.4 192.168.0.11 1 2\r\n", "v1: malformed line"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", "v1: malformed line"),
    (b"PROXY TCP4 " + b"1" * 100, "v1: no CRLF within 107 bytes"),
    (b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "v1: no CRLF within 107 bytes"),
    (b"PROXX", "no PROXY protocol header"),
    (b"proxy TCP4", "no PROXY protocol header"),
    (b"PROXYTCP4", "no PROXY protocol header"),
    (REQUEST, "no PROXY protocol header"),
    (b"\x16\x03\x01\x02\x00", "no PROXY protocol header"),  # a TLS ClientHello
]


@pytest.mark.parametrize("data,reason", V1_INVALID)
def test_v1_invalid(data, reason):
    assert parse(data) == Invalid(reason)


def test_v1_line_of_108_bytes_is_refused_even_with_crlf():
    line = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert len(line) == 108
    assert parse(line) == Invalid("v1: no CRLF within 107 bytes")
    assert isinstance(parse(line[:14] + line[15:]), Header)  # 107: the limit itself


@pytest.mark.parametrize("line", [v[0] for v in V1_VALID])
def test_v1_every_prefix_needs_more(line):
    """Byte by byte, a valid line is never decided before its CRLF (§2.1), then it is."""
    for i in range(len(line)):
        assert parse(line[:i]) == NeedMore(MAX_V1_BYTES if i else MAX_HEADER_BYTES), i
    assert isinstance(parse(line), Header)


# -- v2 ------------------------------------------------------------------------------------
V2_VALID = [
    # (bytes, expected header (consumed = len(bytes)))
    (
        v2(0x21, 0x11, tcp4("192.168.0.1", "192.168.0.11", 56324, 443)),
        Header(2, False, "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443), 28),
    ),
    (
        v2(0x21, 0x21, tcp6("2001:db8::1", "::1", 65535, 0)),
        Header(2, False, "TCP6", ("2001:db8::1", 65535), ("::1", 0), 52),
    ),
    (
        v2(0x21, 0x21, tcp6("::ffff:198.51.100.9", "2001:db8::1", 1, 2)),
        Header(2, False, "TCP6", ("198.51.100.9", 1), ("2001:db8::1", 2), 52),
    ),
    # TLVs after the addresses, kept raw: ALPN (0x01), authority (0x02), NOOP padding (0x04),
    # an AWS VPC endpoint TLV (0xEA)
    (
        v2(
            0x21,
            0x11,
            tcp4("10.0.0.1", "10.0.0.2", 1, 2)
            + tlv(0x01, b"h2")
            + tlv(0x02, b"example.com")
            + tlv(0x04, b"\x00" * 3)
            + tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9"),
        ),
        Header(
            2,
            False,
            "TCP4",
            ("10.0.0.1", 1),
            ("10.0.0.2", 2),
            16 + 12 + 5 + 14 + 6 + 26,
            (
                (0x01, b"h2"),
                (0x02, b"example.com"),
                (0x04, b"\x00" * 3),
                (0xEA, b"\x01vpce-08d2bf15fac5001c9"),
            ),
        ),
    ),
    (
        v2(0x21, 0x11, tcp4("10.0.0.1", "10.0.0.2", 1, 2) + tlv(0x05, b"")),
        Header(2, False, "TCP4", ("10.0.0.1", 1), ("10.0.0.2", 2), 31, ((0x05, b""),)),
    ),
    # LOCAL: a health check from the balancer; family ignored, length skipped (§2.2)
    (v2(0x20, 0x00, b""), Header(2, True, "UNKNOWN", None, None, 16)),
    (v2(0x20, 0x11, tcp4("1.1.1.1", "2.2.2.2", 3, 4)), Header(2, True, "UNKNOWN", None, None, 28)),
    (v2(0x20, 0x12, b"\x00" * 5), Header(2, True, "UNKNOWN", None, None, 21)),
    (v2(0x20, 0xFF, b""), Header(2, True, "UNKNOWN", None, None, 16)),
    # PROXY with UNSPEC: addresses ignored whatever their length
    (v2(0x21, 0x00, b""), Header(2, False, "UNKNOWN", None, None, 16)),
    (v2(0x21, 0x00, b"\x01" * 40), Header(2, False, "UNKNOWN", None, None, 56)),
    # UNIX stream and datagram: valid, no client address
    (
        v2(0x21, 0x31, b"/run/a".ljust(108, b"\x00") + b"/run/b".ljust(108, b"\x00")),
        Header(2, False, "UNKNOWN", None, None, 232),
    ),
    (
        v2(0x21, 0x32, b"\x00" * 216 + tlv(0x01, b"x")),
        Header(2, False, "UNKNOWN", None, None, 236, ((0x01, b"x"),)),
    ),
    # the largest header accepted
    (
        v2(
            0x21,
            0x11,
            tcp4("10.0.0.1", "10.0.0.2", 1, 2) + tlv(0x04, b"\x00" * (MAX_V2_LENGTH - 12 - 3)),
        ),
        Header(
            2,
            False,
            "TCP4",
            ("10.0.0.1", 1),
            ("10.0.0.2", 2),
            MAX_V2_BYTES,
            ((0x04, b"\x00" * (MAX_V2_LENGTH - 15)),),
        ),
    ),
]


@pytest.mark.parametrize("data,header", V2_VALID)
def test_v2_valid(data, header):
    assert parse(data + REQUEST) == header
    assert header.consumed == len(data)


@pytest.mark.parametrize("data,header", V2_VALID[:6])
def test_v2_every_prefix_needs_more(data, header):
    for i in range(1, len(data)):
        got = parse(data[:i])
        assert isinstance(got, NeedMore), i
        assert got.at_most == (len(data) if i >= 16 else MAX_V2_BYTES)
        assert got.at_most <= MAX_HEADER_BYTES
    assert parse(data) == header


V2_INVALID = [
    (SIG[:5] + b"\x01", "no PROXY protocol header"),
    (SIG[:11] + b"\x0b", "no PROXY protocol header"),
    (b"\r\n\r\nGET", "no PROXY protocol header"),
    (SIG + b"\x11", "v2: unsupported version"),
    (SIG + b"\x31", "v2: unsupported version"),
    (SIG + b"\x22", "v2: unknown command"),
    (SIG + b"\x2f", "v2: unknown command"),
    (SIG + b"\x21\x12", "v2: UDP refused"),
    (SIG + b"\x21\x22", "v2: UDP refused"),
    (SIG + b"\x21\x13", "v2: unknown family or protocol"),
    (SIG + b"\x21\x41", "v2: unknown family or protocol"),
    (SIG + b"\x21\x01", "v2: unknown family or protocol"),
    (SIG + b"\x21\x10", "v2: unknown family or protocol"),
    (v2(0x21, 0x11, b"", MAX_V2_LENGTH + 1), "v2: header too long"),
    (v2(0x20, 0x00, b"", 0xFFFF), "v2: header too long"),
    (
        v2(0x21, 0x11, tcp4("1.1.1.1", "2.2.2.2", 3, 4)[:11]),
        "v2: length shorter than its addresses",
    ),
    (v2(0x21, 0x11, b"", 0), "v2: length shorter than its addresses"),
    (v2(0x21, 0x21, tcp4("1.1.1.1", "2.2.2.2", 3, 4)), "v2: length shorter than its addresses"),
    (v2(0x21, 0x31, b"\x00" * 215), "v2: length shorter than its addresses"),
    (v2(0x21, 0x11, tcp4("1.1.1.1", "2.2.2.2", 3, 4) + b"\x01"), "v2: malformed TLV"),
    (v2(0x21, 0x11, tcp4("1.1.1.1", "2.2.2.2", 3, 4) + b"\x01\x00"), "v2: malformed TLV"),
    (v2(0x21, 0x11, tcp4("1.1.1.1", "2.2.2.2", 3, 4) + b"\x01\x00\x02x"), "v2: malformed TLV"),
    (
        v2(0x21, 0x11, tcp4("1.1.1.1", "2.2.2.2", 3, 4) + tlv(1, b"ab") + b"\x02\x00\x05ab"),
        "v2: malformed TLV",
    ),
    (v2(0x21, 0x21, tcp6("::1", "::2", 3, 4) + b"\x00"), "v2: malformed TLV"),
]


@pytest.mark.parametrize("data,reason", V2_INVALID)
def test_v2_invalid(data, reason):
    """Refused as soon as the offending byte arrives, and with every byte after it."""
    assert parse(data) == Invalid(reason)
    assert parse(data + REQUEST) == Invalid(reason)


def with_crc(header_without_crc_value: bytes) -> bytes:
    """A v2 header whose last TLV is a CRC32C with a zero value, with that value filled in."""
    assert header_without_crc_value[-7:-4] == b"\x03\x00\x04"
    return header_without_crc_value[:-4] + struct.pack("!I", crc32c(header_without_crc_value))


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 / the CRC catalogue's check
    assert crc32c(b"") == 0


ADDR4 = tcp4("10.1.2.3", "10.4.5.6", 40000, 443)
CRC_ZERO = tlv(0x03, b"\x00" * 4)


@pytest.mark.parametrize(
    "data,expected",
    [
        (
            with_crc(v2(0x21, 0x11, ADDR4 + CRC_ZERO)),
            Header(2, False, "TCP4", ("10.1.2.3", 40000), ("10.4.5.6", 443), 35),
        ),
        (
            with_crc(v2(0x21, 0x11, ADDR4 + tlv(0x05, b"id") + CRC_ZERO)),
            Header(2, False, "TCP4", ("10.1.2.3", 40000), ("10.4.5.6", 443), 40),
        ),
        (v2(0x21, 0x11, ADDR4 + CRC_ZERO), Invalid("v2: CRC32C mismatch")),
        (v2(0x21, 0x11, ADDR4 + tlv(0x03, b"\x00" * 3)), Invalid("v2: malformed TLV")),
        (
            with_crc(v2(0x21, 0x11, ADDR4 + tlv(0x03, b"abcd") + CRC_ZERO)),
            Invalid("v2: malformed TLV"),
        ),
    ],
)
def test_v2_crc32c(data, expected):
    got = parse(data)
    if isinstance(expected, Header):
        assert isinstance(got, Header)
        assert got.tlvs[-1][0] == 0x03
        got = Header(got.version, got.local, got.family, got.source, got.destination, got.consumed)
    assert got == expected


def test_v2_crc32c_covers_every_byte():
    good = with_crc(v2(0x21, 0x11, ADDR4 + CRC_ZERO))
    crc_type = len(good) - 7  # flipping it makes another TLV: no CRC left to check
    for i in range(16, len(good) - 4):  # past the signature, up to the CRC's value
        if i == crc_type:
            continue
        flipped = bytearray(good)
        flipped[i] ^= 0x01
        assert isinstance(parse(bytes(flipped)), Invalid), i


# Headers HAProxy 2.6.12 sent to a recording server (test_headers_from_a_real_haproxy), kept
# so that the parser meets a real sender's bytes in every run, HAProxy installed or not.
RECORDED = [
    (
        b"PROXY TCP4 127.0.0.1 127.0.0.1 41732 44135\r\n",
        ("TCP4", False, ("127.0.0.1", 41732), ("127.0.0.1", 44135)),
    ),
    (
        b"\r\n\r\n\x00\r\nQUIT\n!\x11\x00\x0c\x7f\x00\x00\x01\x7f\x00\x00\x01\xe6\xb2\xa7\xf3",
        ("TCP4", False, ("127.0.0.1", 59058), ("127.0.0.1", 42995)),
    ),
    (
        b"\r\n\r\n\x00\r\nQUIT\n!\x11\x00#\x7f\x00\x00\x01\x7f\x00\x00\x01\xd3\xd2\xca\t"
        b"\x03\x00\x04\xb4\r\x82\xd3\x05\x00\rreq-127.0.0.1",
        ("TCP4", False, ("127.0.0.1", 54226), ("127.0.0.1", 51721)),
    ),
    (b"PROXY UNKNOWN\r\n", ("UNKNOWN", False, None, None)),
    (b"\r\n\r\n\x00\r\nQUIT\n \x00\x00\x00", ("UNKNOWN", True, None, None)),
    (b"PROXY TCP6 ::1 ::1 60250 35631\r\n", ("TCP6", False, ("::1", 60250), ("::1", 35631))),
    (
        b"PROXY TCP6 ::ffff:127.0.0.1 ::ffff:127.0.0.1 51374 18771\r\n",
        ("TCP6", False, ("127.0.0.1", 51374), ("127.0.0.1", 18771)),
    ),
    (
        b"\r\n\r\n\x00\r\nQUIT\n!!\x00$" + b"\x00" * 15 + b"\x01" + b"\x00" * 15 + b"\x01"
        b"\x8c\xb0\x85\xc9",
        ("TCP6", False, ("::1", 36016), ("::1", 34249)),
    ),
]


@pytest.mark.parametrize("data,expected", RECORDED)
def test_headers_recorded_from_haproxy(data, expected):
    got = parse(data + REQUEST)
    assert isinstance(got, Header)
    assert (got.family, got.local, got.source, got.destination) == expected
    assert got.consumed == len(data)


def test_v2_length_decides_before_the_body_arrives():
    assert parse(v2(0x21, 0x11, b"", MAX_V2_LENGTH + 1)[:16]) == Invalid("v2: header too long")
    assert parse(v2(0x21, 0x11, b"", 200)[:16]) == NeedMore(216)


def test_bounds_are_consistent():
    assert MAX_V2_BYTES == 16 + 216 + MAX_V2_TLV_BYTES
    assert MAX_HEADER_BYTES == max(MAX_V1_BYTES, MAX_V2_BYTES)


def test_need_more_never_asks_past_the_bound():
    """Whatever arrives, a caller buffering up to ``at_most`` gets a decision there."""
    for data in [v[0] for v in V1_VALID] + [v[0] for v in V2_VALID]:
        for i in range(len(data) + 1):
            got = parse(data[:i])
            if isinstance(got, NeedMore):
                assert i < got.at_most <= MAX_HEADER_BYTES
    junk = b"PROXY " + b"a" * 200
    assert parse(junk[:MAX_V1_BYTES]) == Invalid("v1: no CRLF within 107 bytes")


STARTS = [
    (b"PROXY ", True),
    (b"PROXY TCP4 1.2.3.4", True),
    (b"PROXY UNKNOWN\r\n", True),
    (SIG, True),
    (SIG + b"\x21", True),
    (b"P", None),
    (b"PROXY", None),
    (b"\r", None),
    (b"\r\n", None),
    (b"\r\n\r\n\x00", None),
    (SIG[:-1], None),
    (b"", None),
    (b"G", False),
    (b"GET / HTTP/1.1\r\n", False),
    (b"PRI * HTTP/2.0", False),
    (b"PO", False),
    (b"POST /", False),
    (b"PUT /", False),
    (b"PATCH /", False),
    (b"PROXY/", False),
    (b"PROXYTCP4", False),
    (b"\r\n\r\n\x01", False),
    (b"\r\nGET", False),
    (b"\x16\x03\x01", False),
]


@pytest.mark.parametrize("data,expected", STARTS)
def test_what_can_start_a_header(data, expected):
    """parse dismisses as "no header" exactly the first bytes that can start neither a v1
    nor a v2 header (True: a whole prefix; None: a strict prefix of one, or nothing)."""
    no_header = parse(data) == Invalid("no PROXY protocol header")
    assert no_header is (expected is False), data


# -- properties -------------------------------------------------------------------------------
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ipv4s = st.ip_addresses(v=4)
ipv6s = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None)
ports = st.integers(0, 0xFFFF)
tlv_lists = st.lists(
    st.tuples(st.integers(0, 255).filter(lambda k: k != 0x03), st.binary(max_size=40)), max_size=5
)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda b: b"PROXY " + b),
        st.binary(max_size=300).map(lambda b: SIG + b),
    )
)
def test_any_bytes_get_a_decision_within_the_bound(data):
    got = parse(data)
    assert isinstance(got, NeedMore | Header | Invalid)
    if isinstance(got, NeedMore):
        assert len(data) < got.at_most <= MAX_HEADER_BYTES
    if isinstance(got, Header):
        assert 0 < got.consumed <= len(data)
        assert parse(data[: got.consumed]) == got


@FUZZ
@given(
    st.one_of(st.tuples(st.just(0x11), ipv4s, ipv4s), st.tuples(st.just(0x21), ipv6s, ipv6s)),
    ports,
    ports,
    tlv_lists,
)
def test_v2_round_trip(addresses, sport, dport, tlvs):
    fam, src, dst = addresses
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    body += b"".join(tlv(kind, value) for kind, value in tlvs)
    data = v2(0x21, fam, body)
    assert parse(data + REQUEST) == Header(
        2,
        False,
        "TCP4" if fam == 0x11 else "TCP6",
        (str(src), sport),
        (str(dst), dport),
        len(data),
        tuple(tlvs),
    )


@FUZZ
@given(
    st.one_of(st.tuples(st.just("TCP4"), ipv4s, ipv4s), st.tuples(st.just("TCP6"), ipv6s, ipv6s)),
    ports,
    ports,
    st.booleans(),
)
def test_v1_round_trip(addresses, sport, dport, exploded):
    family, src, dst = addresses
    text = (lambda a: a.exploded) if exploded else str
    line = f"PROXY {family} {text(src)} {text(dst)} {sport} {dport}\r\n".encode()
    assert parse(line + REQUEST) == Header(
        1, False, family, (str(src), sport), (str(dst), dport), len(line)
    )


# -- differential: what a real HAProxy sends ----------------------------------------------------
HAPROXY = shutil.which("haproxy")


class Recorder:
    """A TCP server on loopback keeping each connection's bytes until the peer closes."""

    def __init__(self) -> None:
        self.conns: list[bytearray] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, LOCALHOST, 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        self.conns.append(buf)
        try:
            while chunk := await reader.read(65536):
                buf += chunk
                if buf.endswith(b"\r\n\r\n"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        except ConnectionError:
            pass
        finally:
            writer.close()


def _haproxy_config(fronts: dict[str, tuple[str, int]], backend_port: int, check_port: int) -> str:
    """One frontend per entry of ``fronts`` (a host and port, or a UNIX socket path and 0),
    each relaying to the recorder with the PROXY protocol its name starts with."""
    lines = [
        "global",
        "  maxconn 64",
        "defaults",
        "  mode tcp",
        "  timeout connect 2s",
        "  timeout client 5s",
        "  timeout server 5s",
    ]
    for name, (host, port) in fronts.items():
        if port == 0:
            bind = f"unix@{host}"
        else:
            bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines += [f"frontend f_{name}", f"  bind {bind}", f"  default_backend b_{name}"]
        option = "send-proxy" if name.startswith("v1") else "send-proxy-v2"
        if name.startswith("v2tlv"):
            lines += ["  unique-id-format req-%[src]"]
            option += " proxy-v2-options unique-id,crc32c"
        lines += [f"backend b_{name}", f"  server s {LOCALHOST}:{backend_port} {option}"]
    # a v2 health check: HAProxy sends LOCAL (no addresses) on its own connections
    lines += [
        "listen checked",
        f"  bind {LOCALHOST}:{free_port()}",
        (f"  server c {LOCALHOST}:{check_port} check send-proxy-v2 check-send-proxy inter 200ms"),
    ]
    return "\n".join(lines) + "\n"


async def _send_through(host: str, port: int) -> tuple[str, int] | None:
    """One request through a frontend; the client's address (None over a UNIX socket)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + IO_TIMEOUT
    while True:
        try:
            if port == 0:
                reader, writer = await asyncio.open_unix_connection(host)
            else:
                reader, writer = await asyncio.open_connection(host.removeprefix("::ffff:"), port)
            break
        except OSError:
            if loop.time() > end:
                raise
            await asyncio.sleep(0.05)
    local = writer.get_extra_info("sockname")
    writer.write(REQUEST)
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
    writer.close()
    return None if port == 0 else (local[0], local[1])


def _loopback6_port() -> int | None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            return s.getsockname()[1]
    except OSError:
        return None


@pytest.mark.slow
@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
async def test_headers_from_a_real_haproxy(tmp_path: Path):
    """HAProxy's send-proxy and send-proxy-v2 over IPv4, IPv6 and a UNIX socket, with TLVs,
    and its v2 health checks: every header parses (its CRC32C checked), to the addresses of
    the connection."""
    assert HAPROXY is not None
    recorder, checks = Recorder(), Recorder()
    backend_port, check_port = await recorder.start(), await checks.start()
    fronts = {
        "v1": (LOCALHOST, free_port()),
        "v2": (LOCALHOST, free_port()),
        "v2tlv": (LOCALHOST, free_port()),
        "v1unix": (str(tmp_path / "v1.sock"), 0),
        "v2unix": (str(tmp_path / "v2.sock"), 0),
    }
    # IPv4 clients of an IPv6 socket: HAProxy writes IPv4-mapped addresses
    for name in ("v1map", "v2map"):
        fronts[name] = ("::ffff:127.0.0.1", free_port())
    for name in ("v1six", "v2six"):
        port = _loopback6_port()
        if port is not None:
            fronts[name] = ("::1", port)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(_haproxy_config(fronts, backend_port, check_port))
    check = await asyncio.create_subprocess_exec(
        HAPROXY, "-c", "-q", "-f", str(cfg), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(check.communicate(), IO_TIMEOUT)
    assert check.returncode == 0, err.decode()
    proc = await asyncio.create_subprocess_exec(
        HAPROXY,
        "-db",
        "-f",
        str(cfg),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for name, (host, port) in fronts.items():
            before = len(recorder.conns)
            client = await _send_through(host, port)

            def arrived(before: int = before) -> bool:
                return len(recorder.conns) > before and recorder.conns[before].endswith(REQUEST)

            await eventually(arrived, what=name)
            data = bytes(recorder.conns[before])
            got = parse(data)
            assert isinstance(got, Header), (name, data)
            assert data[got.consumed :] == REQUEST, name
            assert got.version == (1 if name.startswith("v1") else 2), name
            if port == 0:
                # a UNIX client has no address to give: HAProxy sends v1 UNKNOWN, v2 LOCAL,
                # and the real peer's address stands
                assert got.local is (got.version == 2), got
                assert (got.family, got.source, got.destination) == ("UNKNOWN", None, None), got
            else:
                assert not got.local
                assert got.family == ("TCP6" if ":" in host else "TCP4"), name
                assert got.source == client, name
                assert got.destination == (host.removeprefix("::ffff:"), port), name
            tlv_kinds = {kind for kind, _ in got.tlvs}
            if name == "v2tlv":
                assert tlv_kinds == {0x03, 0x05}, got.tlvs  # CRC32C, unique id
                assert client is not None
                assert dict(got.tlvs)[0x05] == b"req-" + client[0].encode()
                assert len(dict(got.tlvs)[0x03]) == 4
            else:
                assert not tlv_kinds, got.tlvs
            # every strict prefix of what HAProxy sent is undecided
            for i in range(got.consumed):
                assert isinstance(parse(data[:i]), NeedMore), (name, i)
        await eventually(lambda: checks.conns and len(checks.conns[0]) >= 16, what="a health check")
        health = parse(bytes(checks.conns[0]))
        assert isinstance(health, Header) and health.local and health.source is None, health
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), IO_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        assert recorder.server is not None and checks.server is not None
        recorder.server.close()
        checks.server.close()
