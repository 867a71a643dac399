"""PROXY protocol v1 and v2 headers (HAProxy's proxy-protocol.txt): a pure, incremental parser.

``parse(data)`` takes every byte received on a connection so far and returns one of:

- ``NeedMore(at_most)``: no decision yet; the header is at most ``at_most`` bytes long in
  total, so a caller never buffers more than that before calling again;
- ``Header``: a complete, valid header of ``consumed`` bytes; the bytes after it belong to
  the proxied protocol (HTTP here);
- ``Invalid(reason)``: not a valid header; the connection must be closed (spec §2: "Any
  sequence which does not exactly match the protocol must be discarded and cause the receiver
  to abort the connection").

The parser never looks past the header, keeps no state between calls (the caller keeps the
bytes), and decides as early as the bytes allow: a wrong first byte, a signature mismatch, a
bad v2 version/command/family or an oversized v2 length is reported without waiting for more.

What it accepts (strictly, spec §2.1 and §2.2):

- v1: ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` with exactly one space
  between fields, IPv4 as four decimal numbers without leading zeros, IPv6 as hexadecimal
  groups with at most one ``::`` (an IPv4-mapped tail allowed, no zone), ports 0..65535
  without leading zeros, the address family matching the keyword, and CRLF (not a bare CR or
  LF) within the first 107 bytes. ``PROXY UNKNOWN`` followed by anything up to CRLF is
  accepted as ``family="UNKNOWN"`` with no addresses: use the real peer's. IPv4-mapped IPv6
  addresses (v1 and v2; HAProxy writes ``TCP6 ::ffff:127.0.0.1 ...`` for a v4 client of a v6
  socket) are given as IPv4 text (``10.0.0.1``); the family stays ``TCP6``.
- v2: the 12-byte signature, version 2, command LOCAL (0) or PROXY (1), then:
  TCP over IPv4 (0x11) and IPv6 (0x21) give addresses; UNSPEC (0x00) and UNIX (0x31, 0x32)
  are ``family="UNKNOWN"`` (use the real peer's); UDP (0x12, 0x22) is refused (this listener
  is TCP); any other family/protocol byte is refused. The length must cover the addresses and
  be at most ``MAX_V2_LENGTH``. What follows the addresses is TLVs (§2.2.7), which must fill
  the rest exactly and are returned raw as ``(type, value)`` pairs; a CRC32C TLV (0x03,
  §2.2.5) must be single, 4 bytes, and match the header, else the header is refused.
  LOCAL (the load balancer's own connection, e.g. a health check) returns ``local=True`` and
  no addresses, whatever the family byte says (§2.2: "the family ... is ignored").

Used by ``dataplane/client.py`` ``ProxyHeaderProtocol`` (``listen.proxy_protocol``): a
connection from a peer in ``listen.trusted_proxies`` must start with a header, parsed here
as its bytes arrive (never more than ``MAX_HEADER_BYTES`` held, within
``timeouts.client_header``; the spec asks for at least 3 s, docs/fleet.md); ``Invalid`` or
no header in time closes it without an answer; a ``Header`` with a source address makes
that address the connection's peer. Other peers are never asked for a header (the spec
forbids guessing, §2): their bytes go to llhttp, which answers one that sends a header 400.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Final

# v1 line, CRLF included, at its longest: "PROXY UNKNOWN" with two full IPv6 addresses and two
# 5-digit ports (spec §2.1, "107 chars").
MAX_V1_BYTES: Final = 107
# The fixed part of a v2 header: signature, version/command, family/protocol, length (§2.2).
V2_FIXED_BYTES: Final = 16
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
# Largest TLV area accepted after the addresses: load balancers send tens to a few hundred
# bytes (AWS VPC endpoint id, Azure link id, HAProxy's SSL and unique-id TLVs); this bounds
# what one connection may make the proxy hold before its first HTTP byte.
MAX_V2_TLV_BYTES: Final = 2048
# Largest v2 address block: two AF_UNIX paths of 108 bytes (§2.2).
MAX_V2_ADDRESS_BYTES: Final = 216
MAX_V2_LENGTH: Final = MAX_V2_ADDRESS_BYTES + MAX_V2_TLV_BYTES
MAX_V2_BYTES: Final = V2_FIXED_BYTES + MAX_V2_LENGTH
# Most bytes ever buffered before a decision, whichever version arrives.
MAX_HEADER_BYTES: Final = max(MAX_V1_BYTES, MAX_V2_BYTES)

V1_PREFIX: Final = b"PROXY "

# v2 byte 13 (version << 4 | command) and byte 14 (family << 4 | protocol).
_V2_LOCAL: Final = 0x20
_V2_PROXY: Final = 0x21
_TCP4: Final = 0x11
_UDP4: Final = 0x12
_TCP6: Final = 0x21
_UDP6: Final = 0x22
_UNSPEC: Final = 0x00
_UNIX_STREAM: Final = 0x31
_UNIX_DGRAM: Final = 0x32
# Address block length by family/protocol byte (§2.2: 2*4+2*2, 2*16+2*2, 2*108).
_ADDRESS_BYTES: Final = {_TCP4: 12, _TCP6: 36, _UNIX_STREAM: 216, _UNIX_DGRAM: 216}

# A TLV is type (1 byte), length (2 bytes, network order), value (§2.2.7).
_TLV_HEAD: Final = 3
# §2.2.5: a CRC-32C of the whole header, 4 bytes, network order.
_PP2_TYPE_CRC32C: Final = 0x03

# One v1 TCP line: exactly one space between fields; ports decimal, no leading zero (§2.1).
_V1_TCP = re.compile(
    rb"PROXY (TCP[46]) ([0-9A-Fa-f:.]{1,45}) ([0-9A-Fa-f:.]{1,45}) "
    rb"(0|[1-9][0-9]{0,4}) (0|[1-9][0-9]{0,4})\r\n"
)
# IPv4 as four decimal numbers 0..255 without leading zeros (§2.1).
_V1_IPV4 = re.compile(
    rb"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}"
    rb"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
)
# IPv6 as hexadecimal groups and colons (§2.1), and, as inet_pton accepts and HAProxy's own
# sender writes for a v4 client on a v6 connection, an IPv4-mapped tail (::ffff:1.2.3.4);
# no zone. The count of groups and the single "::" are checked by ipaddress.
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:]{2,39}|[0-9A-Fa-f:]{2,33}(?:\.[0-9]{1,3}){3}")


@dataclass(frozen=True, slots=True)
class NeedMore:
    """No decision yet: call again with more bytes; the header is at most ``at_most`` bytes."""

    at_most: int


@dataclass(frozen=True, slots=True)
class Header:
    """A complete, valid header of ``consumed`` bytes.

    ``source`` and ``destination`` are ``(address, port)`` with the address in Python's
    canonical text form (``ipaddress``), or None when the header carries no usable address
    (``local``, or ``family == "UNKNOWN"``): then the real peer address stands.
    """

    version: int
    local: bool
    family: str  # "TCP4", "TCP6" or "UNKNOWN"
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    consumed: int
    tlvs: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Invalid:
    """Not a valid header: close the connection. ``reason`` is short and fixed."""

    reason: str


Result = NeedMore | Header | Invalid


def parse(data: bytes) -> Result:
    """Parse the PROXY header at the start of ``data`` (everything received so far)."""
    if not data:
        return NeedMore(MAX_HEADER_BYTES)
    first = data[0]
    if first == V1_PREFIX[0]:
        return _parse_v1(data)
    if first == V2_SIGNATURE[0]:
        return _parse_v2(data)
    return Invalid("no PROXY protocol header")


def _parse_v1(data: bytes) -> Result:
    head = data[: len(V1_PREFIX)]
    if head != V1_PREFIX[: len(head)]:
        return Invalid("no PROXY protocol header")
    window = data[:MAX_V1_BYTES]
    end = window.find(b"\r\n")
    # a CR or LF anywhere but in the final CRLF is malformed (§2.1: no bare CR or LF); a CR
    # as the last byte received may still be followed by its LF
    before = window[:end] if end >= 0 else window.removesuffix(b"\r")
    if b"\r" in before or b"\n" in before:
        return Invalid("v1: bare CR or LF")
    if end < 0:
        if len(data) >= MAX_V1_BYTES:
            return Invalid("v1: no CRLF within 107 bytes")
        return NeedMore(MAX_V1_BYTES)
    line = window[: end + 2]
    if line.startswith(b"PROXY UNKNOWN") and (len(line) == 15 or line[13:14] == b" "):
        # §2.1: "the receiver must ignore anything presented before the CRLF"
        return Header(1, False, "UNKNOWN", None, None, len(line))
    m = _V1_TCP.fullmatch(line)
    if m is None:
        return Invalid("v1: malformed line")
    family, src, dst, sport, dport = m.groups()
    ports = int(sport), int(dport)
    if ports[0] > 0xFFFF or ports[1] > 0xFFFF:
        return Invalid("v1: port out of range")
    source = _v1_address(src, family)
    destination = _v1_address(dst, family)
    if source is None or destination is None:
        return Invalid("v1: malformed address")
    return Header(
        1, False, family.decode("ascii"), (source, ports[0]), (destination, ports[1]), len(line)
    )


def _v1_address(text: bytes, family: bytes) -> str | None:
    try:
        if family == b"TCP4":
            if _V1_IPV4.fullmatch(text) is None:
                return None
            return str(ipaddress.IPv4Address(text.decode("ascii")))
        if _V1_IPV6.fullmatch(text) is None:
            return None
        return _v6_text(ipaddress.IPv6Address(text.decode("ascii")))
    except ValueError:
        return None


def _v6_text(address: ipaddress.IPv6Address) -> str:
    """Compressed text; an IPv4-mapped address (RFC 4291 §2.5.5.2) as the IPv4 client it
    stands for, so X-Forwarded-For and client-ip routing name one client one way."""
    mapped = address.ipv4_mapped
    return str(mapped) if mapped is not None else str(address)


def _parse_v2(data: bytes) -> Result:
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] != V2_SIGNATURE[:n]:
        return Invalid("no PROXY protocol header")
    if len(data) > 12:
        ver_cmd = data[12]
        if ver_cmd >> 4 != 2:
            return Invalid("v2: unsupported version")
        if ver_cmd not in (_V2_LOCAL, _V2_PROXY):
            return Invalid("v2: unknown command")
    else:
        return NeedMore(MAX_V2_BYTES)
    local = ver_cmd == _V2_LOCAL
    if len(data) > 13 and not local:
        fam = data[13]
        if fam in (_UDP4, _UDP6):
            return Invalid("v2: UDP refused")
        if fam not in _ADDRESS_BYTES and fam != _UNSPEC:
            return Invalid("v2: unknown family or protocol")
    if len(data) < V2_FIXED_BYTES:
        return NeedMore(MAX_V2_BYTES)
    fam = data[13]
    (length,) = struct.unpack_from("!H", data, 14)
    if length > MAX_V2_LENGTH:
        return Invalid("v2: header too long")
    total = V2_FIXED_BYTES + length
    if local:
        # §2.2: LOCAL "must use the real connection endpoints and discard the protocol block"
        if len(data) < total:
            return NeedMore(total)
        return Header(2, True, "UNKNOWN", None, None, total)
    need = _ADDRESS_BYTES.get(fam, 0)
    if length < need:
        return Invalid("v2: length shorter than its addresses")
    if len(data) < total:
        return NeedMore(total)
    if fam == _UNSPEC:
        # address block of unknown size: nothing after it can be located (§2.2)
        return Header(2, False, "UNKNOWN", None, None, total)
    body = data[V2_FIXED_BYTES:total]
    tlvs = _tlvs(body[need:])
    if tlvs is None:
        return Invalid("v2: malformed TLV")
    problem = _check_crc(data[:total], V2_FIXED_BYTES + need, tlvs)
    if problem:
        return Invalid(problem)
    if fam == _TCP4:
        src4, dst4, sport, dport = struct.unpack_from("!4s4sHH", body)
        return Header(
            2,
            False,
            "TCP4",
            (str(ipaddress.IPv4Address(src4)), sport),
            (str(ipaddress.IPv4Address(dst4)), dport),
            total,
            tlvs,
        )
    if fam == _TCP6:
        src6, dst6, sport, dport = struct.unpack_from("!16s16sHH", body)
        return Header(
            2,
            False,
            "TCP6",
            (_v6_text(ipaddress.IPv6Address(src6)), sport),
            (_v6_text(ipaddress.IPv6Address(dst6)), dport),
            total,
            tlvs,
        )
    # AF_UNIX: valid, but a path is no client address for X-Forwarded-For or routing
    return Header(2, False, "UNKNOWN", None, None, total, tlvs)


def _check_crc(header: bytes, tlv_start: int, tlvs: tuple[tuple[int, bytes], ...]) -> str:
    """ "" when the header has no CRC32C TLV or a right one, else why not (§2.2.5: the
    checksum covers the whole header with its own value zeroed, and a receiver that
    supports it "MUST" compare and drop the connection on a mismatch)."""
    crcs = [value for kind, value in tlvs if kind == _PP2_TYPE_CRC32C]
    if not crcs:
        return ""
    if len(crcs) > 1 or len(crcs[0]) != 4:
        return "v2: malformed TLV"
    # locate the value: walk the TLVs again to its offset
    i = tlv_start
    while header[i] != _PP2_TYPE_CRC32C:
        i += _TLV_HEAD + struct.unpack_from("!H", header, i + 1)[0]
    at = i + _TLV_HEAD
    zeroed = header[:at] + b"\x00\x00\x00\x00" + header[at + 4 :]
    if crc32c(zeroed) != struct.unpack_from("!I", header, at)[0]:
        return "v2: CRC32C mismatch"
    return ""


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 3720 §B.4), as the PROXY v2 CRC32C TLV carries it."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _tlvs(area: bytes) -> tuple[tuple[int, bytes], ...] | None:
    """The TLVs filling ``area`` exactly, or None when one overruns it (§2.2.7)."""
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(area):
        if len(area) - i < _TLV_HEAD:
            return None
        kind = area[i]
        (size,) = struct.unpack_from("!H", area, i + 1)
        start = i + _TLV_HEAD
        if start + size > len(area):
            return None
        out.append((kind, area[start : start + size]))
        i = start + size
    return tuple(out)
