"""The differential corpus: raw request and response vectors, as data.

Written for this project from the message rules of RFC 9112 (HTTP/1.1) and RFC 9110 (HTTP
semantics), one vector per rule or per way a rule is commonly bent; ``why`` cites the clause.
tests/security/test_differential.py sends each through stickyproxy, NGINX and HAProxy in
front of the same recording backend (tests/security/recorder.py).

A request vector says what stickyproxy must do with it:

- ``FORWARD``: exactly ``forwards`` complete requests reach the backend (framed one way by a
  strict and a lenient reader), and the client gets the backend's answers.
- ``REFUSE``: the proxy answers itself (a status in ``statuses``, or closes), and not one byte
  of it reaches the backend; with ``prompt``, at once (not after a timeout).
- ``NO_REQUEST``: the request cannot be completed (its body never arrives or turns out
  malformed after the head was accepted): a prefix of it may reach the backend (the proxy
  streams bodies), a complete request never does, and that upstream connection is not reused.
- ``EITHER``: forwarding in normal form and refusing are both correct.

``backend`` is how the recording backend answers: ``echo`` after the whole request,
``early`` as soon as a head arrives (before any body), ``early-close`` the same and then it
closes the connection, ``upgrade-101`` a 101 to a request asking to upgrade (a tunnel from
then on), ``connect-2xx`` a 2xx to CONNECT
(which makes the connection a tunnel, RFC 9112 §6.3 rule 2). ``segments`` after the first
are sent once the first answer arrived (or a short wait passed); with ``split`` they are sent
a moment apart without waiting for anything, so the proxy reads them separately.

``KNOWN_STRICTER``: every vector stickyproxy refuses while NGINX and HAProxy both forward it,
with the reason. The suite fails when this table is out of date in either direction.
"""

from __future__ import annotations

from dataclasses import dataclass

FORWARD = "forward"
REFUSE = "refuse"
NO_REQUEST = "no-request"
EITHER = "either"

ECHO, EARLY, EARLY_CLOSE = "echo", "early", "early-close"
CONNECT_2XX, UPGRADE_101 = "connect-2xx", "upgrade-101"

ERRORS = frozenset(range(400, 600))


@dataclass(frozen=True)
class RequestVector:
    name: str
    segments: tuple[bytes, ...]
    expect: str
    why: str
    backend: str = ECHO
    forwards: int = 1  # complete requests when forwarded
    answer: int = 200  # the backend's status the client gets then
    statuses: frozenset[int] = ERRORS  # acceptable answers when refused
    prompt: bool = False  # refused at once, not after a timeout
    split: bool = False  # segments are separate reads, not answer-paced

    @property
    def raw(self) -> bytes:
        return b"".join(self.segments)


def V(name: str, raw: bytes | tuple[bytes, ...], expect: str, why: str, **kw) -> RequestVector:
    segments = raw if isinstance(raw, tuple) else (raw,)
    return RequestVector(name, segments, expect, why, **kw)


# Building blocks. Every vector names the attacker as its user, so all three proxies hash it
# to the one backend the victim's request goes to as well.
H = b"Host: shop.example\r\nX-User-Id: attacker\r\n"
G = b"GET /a HTTP/1.1\r\n" + H
P = b"POST /a HTTP/1.1\r\n" + H
CH = P + b"Transfer-Encoding: chunked\r\n\r\n"
HELLO_CHUNKED = b"5\r\nhello\r\n0\r\n\r\n"
# A request hidden in a body: if any reader takes it for a request of its own, it is
# smuggled (and answered to whoever is next on that connection).
SMUG = b"GET /smuggled HTTP/1.1\r\nHost: shop.example\r\nX-User-Id: attacker\r\n\r\n"
SMUG_EXT = b"FOOBAR /smuggled HTTP/1.1\r\nHost: shop.example\r\nX-User-Id: attacker\r\n\r\n"
WS = (
    b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
)


def _gets(total: int, count: int = 8) -> bytes:
    """``count`` body-less pipelined GETs, ``total`` bytes together (each head well inside
    every proxy's limits), to put what follows at a chosen offset."""
    empty = len(G) + len(b"X-Pad: \r\n\r\n")
    pads = [(total - count * empty) // count] * count
    pads[-1] += total - count * empty - sum(pads)
    return b"".join(G + b"X-Pad: " + b"p" * n + b"\r\n\r\n" for n in pads)


CONNECT_WHY = (
    "RFC 9110 §9.3.6: CONNECT asks the recipient to open a tunnel; a reverse proxy in "
    "front of application instances does not, so it must never reach a pooled "
    "connection (issue 13)"
)


REQUEST_VECTORS: list[RequestVector] = [
    # --- CONNECT (RFC 9110 §9.3.6, RFC 9112 §3.2.3) ------------------------------------------
    V(
        "connect-authority-form",
        b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n"
        b"X-User-Id: attacker\r\n\r\n",
        REFUSE,
        CONNECT_WHY,
    ),
    V(
        "connect-authority-form-then-request",
        b"CONNECT db.internal:5432 HTTP/1.1\r\n"
        b"Host: db.internal:5432\r\nX-User-Id: attacker\r\n\r\n" + SMUG,
        REFUSE,
        CONNECT_WHY,
    ),
    V(
        "connect-authority-form-2xx-backend",
        b"CONNECT db.internal:5432 HTTP/1.1\r\n"
        b"Host: db.internal:5432\r\nX-User-Id: attacker\r\n\r\n",
        REFUSE,
        CONNECT_WHY,
        backend=CONNECT_2XX,
    ),
    V("connect-origin-form", b"CONNECT /x HTTP/1.1\r\n" + H + b"\r\n", REFUSE, CONNECT_WHY),
    V(
        "connect-origin-form-cl-no-body-early",
        b"CONNECT /early HTTP/1.1\r\n" + H + b"Content-Length: 100\r\n\r\n",
        REFUSE,
        CONNECT_WHY + "; the issue's reproduction",
        backend=EARLY,
    ),
    V(
        "connect-origin-form-cl-body-follows",
        (b"CONNECT /early HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % len(SMUG), SMUG),
        REFUSE,
        CONNECT_WHY,
        backend=EARLY,
    ),
    V(
        "connect-origin-form-cl-body-follows-backend-closes",
        (b"CONNECT /early HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % len(SMUG), SMUG),
        REFUSE,
        CONNECT_WHY + "; the body must not become a request once the upstream dropped",
        backend=EARLY_CLOSE,
    ),
    V(
        "connect-origin-form-cl-body-inline",
        b"CONNECT /x HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % len(SMUG) + SMUG,
        REFUSE,
        CONNECT_WHY,
    ),
    V(
        "connect-origin-form-chunked",
        b"CONNECT /x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(SMUG)
        + SMUG
        + b"\r\n0\r\n\r\n",
        REFUSE,
        CONNECT_WHY,
    ),
    V(
        "connect-origin-form-chunked-early",
        b"CONNECT /x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(SMUG)
        + SMUG
        + b"\r\n0\r\n\r\n",
        REFUSE,
        CONNECT_WHY,
        backend=EARLY,
    ),
    V(
        "connect-origin-form-2xx-backend",
        b"CONNECT /tunnel HTTP/1.1\r\n" + H + b"\r\n",
        REFUSE,
        CONNECT_WHY + "; a 2xx turns the connection into a tunnel (RFC 9112 §6.3 rule 2)",
        backend=CONNECT_2XX,
    ),
    V(
        "connect-absolute-form",
        b"CONNECT http://shop.example/ HTTP/1.1\r\n" + H + b"\r\n",
        REFUSE,
        CONNECT_WHY,
    ),
    V("connect-asterisk", b"CONNECT * HTTP/1.1\r\n" + H + b"\r\n", REFUSE, CONNECT_WHY),
    V(
        "connect-http10",
        b"CONNECT /x HTTP/1.0\r\n" + H + b"Content-Length: 40\r\n\r\n",
        REFUSE,
        CONNECT_WHY,
        backend=EARLY,
    ),
    # --- OPTIONS, asterisk- and absolute-form (RFC 9112 §3.2) ------------------------------
    V(
        "options-asterisk",
        b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n",
        EITHER,
        "RFC 9112 §3.2.4: asterisk-form is only for a server-wide OPTIONS; forwarding it to one "
        "app instance or refusing it are both correct for a reverse proxy",
    ),
    V(
        "get-asterisk",
        b"GET * HTTP/1.1\r\n" + H + b"\r\n",
        REFUSE,
        "RFC 9112 §3.2.4: asterisk-form is only used with OPTIONS",
    ),
    V("options-origin-form", b"OPTIONS /a HTTP/1.1\r\n" + H + b"\r\n", FORWARD, "RFC 9110 §9.3.7"),
    V(
        "absolute-form",
        b"GET http://shop.example/x HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9112 §3.2.2: a server MUST accept absolute-form",
    ),
    V(
        "absolute-form-no-path",
        b"GET http://shop.example HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9112 §3.2.1: an empty path is sent as /",
    ),
    V(
        "absolute-form-empty-port",
        b"GET http://shop.example:/x HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 3986 §3.2.3: an empty port is the scheme's default (issue 13)",
    ),
    V(
        "absolute-form-default-port",
        b"GET http://shop.example:80/x HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 3986 §6.2.3: :80 is http's default port",
    ),
    V(
        "absolute-form-with-query",
        b"GET http://shop.example/x?q=1 HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9112 §3.2.2",
    ),
    V(
        "absolute-form-other-host",
        b"GET http://other.example/x HTTP/1.1\r\n" + H + b"\r\n",
        EITHER,
        "RFC 9112 §3.2.2: the target's authority wins over Host",
    ),
    V(
        "absolute-form-userinfo",
        b"GET http://user:pw@shop.example/x HTTP/1.1\r\n" + H + b"\r\n",
        REFUSE,
        "RFC 9110 §4.2.4: userinfo in an http URI is an error for a recipient",
    ),
    V(
        "absolute-form-ws-scheme",
        b"GET ws://shop.example/x HTTP/1.1\r\n" + H + b"\r\n",
        EITHER,
        "RFC 9112 §3.2.2: only http/https targets are meaningful to an origin",
    ),
    V(
        "authority-form-on-get",
        b"GET shop.example:80 HTTP/1.1\r\n" + H + b"\r\n",
        REFUSE,
        "RFC 9112 §3.2.3: authority-form is only used with CONNECT",
    ),
    V(
        "target-without-slash",
        b"GET a HTTP/1.1\r\n" + H + b"\r\n",
        REFUSE,
        "RFC 9112 §3.2: no form of request-target starts with a letter",
    ),
    V(
        "target-with-space",
        b"GET /a b HTTP/1.1\r\n" + H + b"\r\n",
        REFUSE,
        "RFC 9112 §3: the request line has exactly three parts",
    ),
    V(
        "target-with-fragment",
        b"GET /a#frag HTTP/1.1\r\n" + H + b"\r\n",
        EITHER,
        "RFC 9112 §3.2: a request-target has no fragment",
    ),
    V(
        "target-double-slash",
        b"GET //a HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 3986 §3.3: an empty first segment is a valid path",
    ),
    V(
        "target-pct-encoded-crlf",
        b"GET /a%0d%0aX-Injected:%201 HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 3986 §2.1: percent-encoded octets are opaque data",
    ),
    # --- Host (RFC 9112 §3.2, RFC 9110 §7.2) --------------------------------------------------
    V(
        "host-missing-http11",
        b"GET /a HTTP/1.1\r\nX-User-Id: attacker\r\n\r\n",
        REFUSE,
        "RFC 9112 §3.2: a server MUST respond 400 to an HTTP/1.1 request without Host",
    ),
    V(
        "host-repeated",
        b"GET /a HTTP/1.1\r\nHost: shop.example\r\nHost: other.example\r\n"
        b"X-User-Id: attacker\r\n\r\n",
        REFUSE,
        "RFC 9112 §3.2: a server MUST respond 400 to more than one Host field",
    ),
    V(
        "host-invalid-char",
        b"GET /a HTTP/1.1\r\nHost: shop example\r\nX-User-Id: attacker\r\n\r\n",
        REFUSE,
        "RFC 9112 §3.2: a server MUST respond 400 to an invalid Host field value",
    ),
    V(
        "host-empty-port",
        b"GET /a HTTP/1.1\r\nHost: shop.example:\r\nX-User-Id: attacker\r\n\r\n",
        EITHER,
        "RFC 3986 §3.2.3: an empty port is allowed (and is the default)",
    ),
    V(
        "host-repeated-then-request",
        b"GET /a HTTP/1.1\r\nHost: shop.example\r\nHost: b.example\r\n"
        b"X-User-Id: attacker\r\n\r\n" + SMUG,
        REFUSE,
        "RFC 9112 §3.2, §9.6: nothing after a refused request is read",
    ),
    V(
        "host-empty",
        b"GET /a HTTP/1.1\r\nHost: \r\nX-User-Id: attacker\r\n\r\n",
        EITHER,
        "RFC 9112 §3.2: an empty Host is what a client sends for a URI without authority",
    ),
    # --- Transfer-Encoding and Content-Length (RFC 9112 §6) -----------------------------------
    V(
        "cl-and-te",
        P
        + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(SMUG)
        + SMUG
        + b"\r\n0\r\n\r\n",
        REFUSE,
        "RFC 9112 §6.1: a message with both is a smuggling attempt; a server MAY reject it and "
        "MUST close after it",
    ),
    V(
        "te-and-cl",
        P + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n" + HELLO_CHUNKED,
        REFUSE,
        "RFC 9112 §6.1",
    ),
    V(
        "te-xchunked-and-cl",
        P + b"Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\nhello",
        REFUSE,
        "RFC 9112 §6.1: an unknown transfer coding is answered 501",
    ),
    V(
        "te-repeated-chunked",
        P + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n" + HELLO_CHUNKED,
        REFUSE,
        "RFC 9112 §6.1: a sender MUST NOT apply chunked more than once",
    ),
    V(
        "te-gzip-chunked",
        P + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + HELLO_CHUNKED,
        REFUSE,
        "RFC 9112 §6.1: a coding the proxy does not implement (501 allowed)",
    ),
    V(
        "te-chunked-gzip",
        P + b"Transfer-Encoding: chunked, gzip\r\n\r\n" + HELLO_CHUNKED,
        REFUSE,
        "RFC 9112 §6.3 rule 4: a request whose last coding is not chunked MUST be answered 400",
    ),
    V(
        "te-identity",
        P + b"Transfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello",
        REFUSE,
        "RFC 9112 §6.1: identity is no longer a transfer coding",
    ),
    V(
        "te-in-http10",
        b"POST /a HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + HELLO_CHUNKED,
        REFUSE,
        "RFC 9112 §6.1: TE in an HTTP/1.0 message is faulty framing",
    ),
    V(
        "te-uppercase",
        P + b"Transfer-Encoding: CHUNKED\r\n\r\n" + HELLO_CHUNKED,
        FORWARD,
        "RFC 9112 §7: transfer-coding names are case-insensitive",
    ),
    V(
        "te-on-get",
        G + b"Transfer-Encoding: chunked\r\n\r\n" + HELLO_CHUNKED,
        FORWARD,
        "RFC 9110 §9.3.1: a GET body has no defined semantics but is framed like any other",
    ),
    V(
        "cl-repeated-same",
        P + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        EITHER,
        "RFC 9110 §8.6: identical repeated values MAY be accepted",
    ),
    V(
        "cl-list-same",
        P + b"Content-Length: 5, 5\r\n\r\nhello",
        EITHER,
        "RFC 9110 §8.6: a list of identical values MAY be accepted",
    ),
    V(
        "cl-repeated-differ",
        P + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        REFUSE,
        "RFC 9112 §6.3 rule 5: an invalid Content-Length MUST be answered 400",
    ),
    V("cl-plus", P + b"Content-Length: +5\r\n\r\nhello", REFUSE, "RFC 9110 §8.6: 1*DIGIT"),
    V("cl-negative", P + b"Content-Length: -5\r\n\r\nhello", REFUSE, "RFC 9110 §8.6: 1*DIGIT"),
    V("cl-hex", P + b"Content-Length: 0x5\r\n\r\nhello", REFUSE, "RFC 9110 §8.6: 1*DIGIT"),
    V(
        "cl-leading-zeros",
        P + b"Content-Length: 0005\r\n\r\nhello",
        FORWARD,
        "RFC 9110 §8.6: 1*DIGIT, leading zeros included",
    ),
    V("cl-zero", P + b"Content-Length: 0\r\n\r\n", FORWARD, "RFC 9110 §8.6"),
    V(
        "cl-overflow",
        P + b"Content-Length: 18446744073709551616\r\n\r\nhello",
        REFUSE,
        "RFC 9110 §8.6: a recipient MUST anticipate large numerals and prevent overflow",
    ),
    V(
        "cl-on-get",
        G + b"Content-Length: 5\r\n\r\nhello",
        FORWARD,
        "RFC 9110 §9.3.1: a GET body is framed like any other",
    ),
    V(
        "request-inside-cl-body",
        P + b"Content-Length: %d\r\n\r\n" % len(SMUG) + SMUG,
        FORWARD,
        "RFC 9112 §6.2: the body is data, whatever it looks like",
    ),
    V(
        "pipelined-after-cl-body",
        P + b"Content-Length: 5\r\n\r\nhello" + G + b"\r\n",
        FORWARD,
        "RFC 9112 §9.3.2: pipelined requests",
        forwards=2,
    ),
    # --- chunked syntax (RFC 9112 §7.1) --------------------------------------------------------
    V("chunked", CH + HELLO_CHUNKED, FORWARD, "RFC 9112 §7.1"),
    V(
        "expect-100-continue",
        P + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\nhello",
        FORWARD,
        "RFC 9110 §10.1.1",
    ),
    V(
        "chunk-extension",
        CH + b"5;name=value\r\nhello\r\n0\r\n\r\n",
        FORWARD,
        "RFC 9112 §7.1.1: extensions a recipient does not understand are ignored",
    ),
    V(
        "chunk-extension-quoted",
        CH + b'5;n="a;b"\r\nhello\r\n0\r\n\r\n',
        FORWARD,
        "RFC 9112 §7.1.1: quoted-string chunk-ext-val",
    ),
    V(
        "chunk-size-uppercase-hex",
        CH + b"A\r\n0123456789\r\n0\r\n\r\n",
        FORWARD,
        "RFC 9112 §7.1: chunk-size is 1*HEXDIG",
    ),
    V("chunk-size-leading-zeros", CH + b"0005\r\nhello\r\n0\r\n\r\n", FORWARD, "RFC 9112 §7.1"),
    V(
        "chunk-trailer-field",
        CH + b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n",
        FORWARD,
        "RFC 9112 §7.1.2",
    ),
    V(
        "request-inside-chunk",
        CH + b"%x\r\n" % len(SMUG) + SMUG + b"\r\n0\r\n\r\n",
        FORWARD,
        "RFC 9112 §7.1: chunk data is data",
    ),
    V(
        "chunk-bws-before-extension",
        CH + b"5 ;e=1\r\nhello\r\n0\r\n\r\n",
        EITHER,
        "RFC 9112 §7.1.1: BWS before ';' is allowed, though many parsers refuse it",
    ),
    V(
        "chunk-size-0x",
        CH + b"0x5\r\nhello\r\n0\r\n\r\n",
        NO_REQUEST,
        "RFC 9112 §7.1: chunk-size is 1*HEXDIG",
    ),
    V("chunk-size-negative", CH + b"-5\r\nhello\r\n0\r\n\r\n", NO_REQUEST, "RFC 9112 §7.1"),
    V(
        "chunk-size-overflow",
        CH + b"10000000000000005\r\nhello\r\n0\r\n\r\n",
        NO_REQUEST,
        "RFC 9112 §7.1: a recipient MUST anticipate large hexadecimal numerals",
    ),
    V(
        "chunk-data-longer-than-size",
        CH + b"3\r\nhello\r\n0\r\n\r\n",
        NO_REQUEST,
        "RFC 9112 §7.1: chunk-data is followed by CRLF",
    ),
    V(
        "chunk-size-bare-lf",
        CH + b"5\nhello\r\n0\r\n\r\n",
        NO_REQUEST,
        "RFC 9112 §7.1: the chunk-size line ends in CRLF",
    ),
    V("chunk-data-bare-lf", CH + b"5\r\nhello\n0\r\n\r\n", NO_REQUEST, "RFC 9112 §7.1"),
    V("chunk-all-bare-lf", CH + b"5\nhello\n0\n\n", NO_REQUEST, "RFC 9112 §7.1"),
    V(
        "chunk-trailer-content-length",
        CH + b"5\r\nhello\r\n0\r\nContent-Length: 40\r\n\r\n",
        EITHER,
        "RFC 9110 §6.5.1: framing fields are not allowed in a trailer section",
    ),
    V(
        "chunk-last-then-request-without-crlf",
        CH + b"5\r\nhello\r\n0\r\n" + SMUG,
        NO_REQUEST,
        "RFC 9112 §7.1: the trailer section ends with an empty line",
    ),
    # --- field syntax (RFC 9112 §5, RFC 9110 §5) ------------------------------------------------
    V(
        "ws-before-colon-cl",
        P + b"Content-Length : 5\r\n\r\nhello",
        REFUSE,
        "RFC 9112 §5.1: a server MUST reject whitespace between field name and colon (400)",
    ),
    V(
        "ws-before-colon-te",
        P + b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello",
        REFUSE,
        "RFC 9112 §5.1",
    ),
    V("ws-before-colon-other", G + b"X-A : 1\r\n\r\n", REFUSE, "RFC 9112 §5.1"),
    V(
        "obs-fold",
        G + b"X-A: 1\r\n 2\r\n\r\n",
        REFUSE,
        "RFC 9112 §5.2: a server MUST reject obs-fold (400) or replace it with SP",
    ),
    V(
        "obs-fold-te",
        P + b"Transfer-Encoding:\r\n chunked\r\n\r\n" + HELLO_CHUNKED,
        REFUSE,
        "RFC 9112 §5.2",
    ),
    V(
        "field-value-ctl",
        G + b"X-A: a\x01b\r\n\r\n",
        REFUSE,
        "RFC 9110 §5.5: CTLs are not field-vchar",
    ),
    V(
        "field-value-nul",
        G + b"X-A: a\x00b\r\n\r\n",
        REFUSE,
        "RFC 9110 §5.5: a recipient MUST reject NUL or replace it with SP",
    ),
    V(
        "field-value-bare-cr",
        G + b"X-A: a\rb\r\n\r\n",
        REFUSE,
        "RFC 9112 §2.2: a bare CR MUST be rejected or replaced with SP",
    ),
    V(
        "field-value-obs-text",
        G + b"X-A: caf\xe9\r\n\r\n",
        FORWARD,
        "RFC 9110 §5.5: obs-text is allowed in a field value",
    ),
    V(
        "field-value-trailing-ws",
        G + b"X-A: 1 \t\r\n\r\n",
        FORWARD,
        "RFC 9112 §5.1: OWS around a value is not part of it",
    ),
    V(
        "field-name-invalid-char",
        G + b"X@A: 1\r\n\r\n",
        REFUSE,
        "RFC 9110 §5.1: a field name is a token",
    ),
    V("field-name-space", G + b"X A: 1\r\n\r\n", REFUSE, "RFC 9110 §5.1"),
    V("field-name-empty", G + b": 1\r\n\r\n", REFUSE, "RFC 9110 §5.1"),
    V("field-line-no-colon", G + b"X-A 1\r\n\r\n", REFUSE, "RFC 9112 §5"),
    V(
        "field-name-underscore",
        G + b"X_Sticky_Key: mallory\r\n\r\n",
        FORWARD,
        "RFC 9110 §5.1: '_' is a tchar (stickyproxy drops such fields, as NGINX does)",
    ),
    V(
        "bare-lf-one-field",
        G + b"X-A: 1\nX-B: 2\r\n\r\n",
        REFUSE,
        "RFC 9112 §2.2: a recipient MAY accept a bare LF",
    ),
    V(
        "bare-lf-everywhere",
        b"GET /a HTTP/1.1\nHost: shop.example\nX-User-Id: attacker\n\n",
        REFUSE,
        "RFC 9112 §2.2: a recipient MAY accept a bare LF",
    ),
    V(
        "bare-cr-line-end",
        b"GET /a HTTP/1.1\r" + H + b"\r\n",
        REFUSE,
        "RFC 9112 §2.2: a bare CR MUST be rejected",
    ),
    V(
        "leading-empty-lines",
        b"\r\n\r\n" + G + b"\r\n",
        EITHER,
        "RFC 9112 §2.2: a server SHOULD ignore at least one empty line before a request",
    ),
    # --- versions (RFC 9110 §2.5, RFC 9112 §2.3) ------------------------------------------------
    V("http-1.1", G + b"\r\n", FORWARD, "RFC 9112 §2.3"),
    V("http-1.0", b"GET /a HTTP/1.0\r\n" + H + b"\r\n", FORWARD, "RFC 9110 §2.5"),
    V(
        "http-1.0-no-host",
        b"GET /a HTTP/1.0\r\nX-User-Id: attacker\r\n\r\n",
        FORWARD,
        "RFC 9112 §3.2: Host is required from HTTP/1.1 on",
    ),
    V(
        "http-1.0-keep-alive-pipelined",
        b"GET /a HTTP/1.0\r\n" + H + b"Connection: keep-alive\r\n\r\n" + G + b"\r\n",
        FORWARD,
        "RFC 9112 Appendix C.2.2",
        forwards=2,
    ),
    V(
        "http-1.2",
        b"GET /a HTTP/1.2\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9110 §2.5: a higher minor version is processed as the highest one supported "
        "(issue 13)",
    ),
    V("http-1.9", b"GET /a HTTP/1.9\r\n" + H + b"\r\n", FORWARD, "RFC 9110 §2.5"),
    V(
        "http-0.9",
        b"GET /\r\n",
        REFUSE,
        "RFC 9112 Appendix C.1: HTTP/0.9 is not supported; answered or closed at once (issue 13)",
        prompt=True,
    ),
    V(
        "http-0.9-split",
        (b"GET /", b"\r\n"),
        REFUSE,
        "RFC 9112 Appendix C.1: answered at once however the line arrives",
        prompt=True,
        split=True,
    ),
    V(
        "http-2.0",
        b"GET /a HTTP/2.0\r\n" + H + b"\r\n",
        REFUSE,
        "RFC 9110 §2.5, §15.6.6: another major version (505)",
    ),
    V("http-3.0", b"GET /a HTTP/3.0\r\n" + H + b"\r\n", REFUSE, "RFC 9110 §2.5"),
    V(
        "http-version-lowercase",
        b"GET /a http/1.1\r\n" + H + b"\r\n",
        REFUSE,
        "RFC 9112 §2.3: HTTP-name is case-sensitive",
    ),
    V(
        "http-version-two-digits",
        b"GET /a HTTP/1.10\r\n" + H + b"\r\n",
        REFUSE,
        "RFC 9112 §2.3: one digit each",
    ),
    V(
        "h2-preface",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        REFUSE,
        "RFC 9113 §3.4: prior-knowledge HTTP/2 is not HTTP/1.1",
    ),
    # --- methods (RFC 9110 §9) ---------------------------------------------------------------
    V(
        "method-extension",
        b"FOOBAR /a HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9110 §9.1, §16.1: methods are extensible (issue 13)",
    ),
    V(
        "method-extension-with-body",
        b"FOOBAR /a HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
        FORWARD,
        "RFC 9110 §9.1",
    ),
    V(
        "method-extension-token-chars",
        b"FOO_BAR-1 /a HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9110 §9.1: a method is a token",
    ),
    V(
        "method-extension-pipelined-after-get",
        G + b"\r\n" + b"FOOBAR /b HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9110 §9.1, RFC 9112 §9.3.2",
        forwards=2,
    ),
    V(
        "method-extension-pipelined-after-body",
        P + b"Content-Length: 5\r\n\r\nhello" + b"FOOBAR /b HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9110 §9.1, RFC 9112 §9.3.2",
        forwards=2,
    ),
    V(
        "http-1.2-pipelined-after-body",
        P + b"Content-Length: 5\r\n\r\nhello" + b"GET /b HTTP/1.2\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9110 §2.5, RFC 9112 §9.3.2",
        forwards=2,
    ),
    V(
        "method-extension-in-later-segment",
        (G + b"\r\n", b"FOOBAR /b HTTP/1.1\r\n" + H + b"\r\n"),
        FORWARD,
        "RFC 9110 §9.1: the next request on a kept-alive connection",
        forwards=2,
    ),
    V(
        "method-extension-pipelined-after-cl-zero",
        P + b"Content-Length: 0\r\n\r\n" + b"FOOBAR /b HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9110 §9.1, RFC 9112 §9.3.2",
        forwards=2,
    ),
    V(
        "http-1.2-pipelined-after-get",
        G + b"\r\n" + b"GET /b HTTP/1.2\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9110 §2.5, RFC 9112 §9.3.2",
        forwards=2,
    ),
    V(
        "method-extension-split-request-line",
        (b"FOOB", b"AR /a HTTP/1.1\r\n" + H + b"\r\n"),
        FORWARD,
        "RFC 9110 §9.1: a request line may arrive in pieces",
        split=True,
    ),
    V(
        "http-1.2-split-request-line",
        (b"GET /a HTTP/1.", b"2\r\n" + H + b"\r\n"),
        FORWARD,
        "RFC 9110 §2.5: a request line may arrive in pieces",
        split=True,
    ),
    V(
        "method-extension-split-in-head",
        (b"FOOBAR /a HTTP/1.1\r\nHost: shop.ex", b"ample\r\nX-User-Id: attacker\r\n\r\n"),
        FORWARD,
        "RFC 9110 §9.1",
        split=True,
    ),
    V(
        "method-extension-straddles-16k",
        _gets(16384 - 3) + b"FOOBAR /b HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9110 §9.1: wherever a read or a parsing slice happens to end",
        forwards=9,
    ),
    V(
        "http-1.2-straddles-16k",
        _gets(16384 - len(b"GET /b HTTP/1.")) + b"GET /b HTTP/1.2\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9110 §2.5: wherever a read or a parsing slice happens to end",
        forwards=9,
    ),
    V(
        "method-extension-after-split-head",
        (G + b"X-A: 1\r\n", b"\r\nFOOBAR /b HTTP/1.1\r\n" + H + b"\r\n"),
        FORWARD,
        "RFC 9110 §9.1, RFC 9112 §9.3.2: behind a head that took two reads",
        split=True,
        forwards=2,
    ),
    V(
        "method-extension-after-upgrade-answered-200",
        G + WS + b"\r\nFOOBAR /b HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9110 §7.8: an upgrade refused (200) leaves the connection HTTP",
        forwards=2,
    ),
    V(
        "method-extension-inside-cl-body",
        P + b"Content-Length: %d\r\n\r\n" % len(SMUG_EXT) + SMUG_EXT,
        FORWARD,
        "RFC 9112 §6.2: a body is never searched for request lines",
    ),
    V(
        "method-extension-inside-chunk",
        CH + b"%x\r\n" % len(SMUG_EXT) + SMUG_EXT + b"\r\n0\r\n\r\n",
        FORWARD,
        "RFC 9112 §7.1: chunk data is never a request line",
    ),
    V(
        "method-not-a-token",
        b"FOO@BAR /a HTTP/1.1\r\n" + H + b"\r\n",
        REFUSE,
        "RFC 9110 §9.1: a method is a token",
    ),
    # the request behind a body is found by stepping over the body by its framing; bodies
    # that look like request boundaries must not move it
    V(
        "method-extension-behind-lookalike-cl-body",
        P
        + b"Content-Length: %d\r\n\r\n" % len(b"x\r\n\r\n" + SMUG_EXT)
        + b"x\r\n\r\n"
        + SMUG_EXT
        + b"FOOBAR /b HTTP/1.1\r\n"
        + H
        + b"\r\n",
        FORWARD,
        "RFC 9112 §6.2: a body is data; the next request starts after it",
        forwards=2,
    ),
    V(
        "method-extension-behind-lookalike-chunk",
        CH
        + b"%x\r\n" % len(b"\r\n0\r\n\r\n" + SMUG_EXT)
        + b"\r\n0\r\n\r\n"
        + SMUG_EXT
        + b"\r\n0\r\n\r\nFOOBAR /b HTTP/1.1\r\n"
        + H
        + b"\r\n",
        FORWARD,
        "RFC 9112 §7.1: chunk data is data",
        forwards=2,
    ),
    V(
        "method-extension-behind-quoted-extension",
        CH + b'5;e="a;b\\"c"\r\nhello\r\n0\r\nX-T: 1\r\n\r\nFOOBAR /b HTTP/1.1\r\n' + H + b"\r\n",
        EITHER,
        "RFC 9112 §7.1.1: a quoted-string chunk-ext-val with a quoted-pair",
        forwards=2,
    ),
    V(
        "method-extension-behind-odd-chunks",
        CH + b"0000A;x=1\r\n0123456789\r\n3\r\n\r\n\r\r\n"
        b"0;y\r\nX-T: 1\r\nX-U: 2\r\n\r\nFOOBAR /b HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9112 §7.1: leading zeros, upper-case hex, extensions, CR LF as data, trailers",
        forwards=2,
    ),
    V(
        "method-extension-behind-split-chunk",
        (
            CH + b"%x\r\n" % len(b"\r\n0\r\n\r\n" + SMUG_EXT) + b"\r\n0\r\n",
            b"\r\n" + SMUG_EXT + b"\r\n0\r\n\r\nFOOBAR /b HTTP/1.1\r\n" + H + b"\r\n",
        ),
        EITHER,
        "RFC 9112 §7.1: chunk data is data, however it is cut into reads",
        split=True,
        forwards=2,
    ),
    V(
        "method-extension-behind-split-quoted-extension",
        (CH + b'5;e="a;b', b'\\"c"\r\nhello\r\n0\r\n\r\nFOOBAR /b HTTP/1.1\r\n' + H + b"\r\n"),
        EITHER,
        "RFC 9112 §7.1.1: a quoted chunk-ext-val cut into reads",
        split=True,
        forwards=2,
    ),
    V(
        "method-extension-behind-split-cl-body",
        (
            P + b"Content-Length: %d\r\n\r\nx\r\n" % len(b"x\r\n\r\n" + SMUG_EXT),
            b"\r\n" + SMUG_EXT + b"FOOBAR /b HTTP/1.1\r\n" + H + b"\r\n",
        ),
        FORWARD,
        "RFC 9112 §6.2: a body is data, however it is cut into reads",
        split=True,
        forwards=2,
    ),
    V(
        "http-1.2-bodies-pipelined",
        b"POST /a HTTP/1.2\r\n" + H + b"Transfer-Encoding: chunked\r\n"
        b"\r\n"
        + HELLO_CHUNKED
        + b"POST /b HTTP/1.2\r\n"
        + H
        + b"Content-Length: 5\r\n\r\nhello"
        + b"FOOBAR /c HTTP/1.2\r\n"
        + H
        + b"\r\n",
        FORWARD,
        "RFC 9110 §2.5, §9.1, RFC 9112 §9.3.2",
        forwards=3,
    ),
    V(
        "method-extension-chunked",
        b"FOOBAR /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + HELLO_CHUNKED,
        FORWARD,
        "RFC 9110 §9.1",
    ),
    V(
        "method-extension-absolute-form",
        b"FOOBAR http://shop.example/x HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9110 §9.1, RFC 9112 §3.2.2",
    ),
    V(
        "method-extension-asterisk",
        b"FOOBAR * HTTP/1.1\r\n" + H + b"\r\n",
        REFUSE,
        "RFC 9112 §3.2.4: asterisk-form is only used with OPTIONS",
    ),
    V(
        "method-connect-prefix",
        b"CONNECTX /a HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
        FORWARD,
        "RFC 9110 §9.1: a distinct token is a distinct method, framed as any",
    ),
    V(
        "method-connect-lowercase-with-cl",
        b"connect /a HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % len(SMUG) + SMUG,
        EITHER,
        "RFC 9110 §9.1: methods are case-sensitive, so this is not CONNECT; refusing it is "
        "prudent, forwarding it must frame its body",
        backend=EARLY,
    ),
    V(
        "http-1.2-chunked",
        b"POST /a HTTP/1.2\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + HELLO_CHUNKED,
        FORWARD,
        "RFC 9110 §2.5: processed as HTTP/1.1, chunked included",
    ),
    V(
        "method-registered-webdav",
        b"PROPFIND /a HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 4918 §9.1",
    ),
    V(
        "method-lowercase",
        b"get /a HTTP/1.1\r\n" + H + b"\r\n",
        EITHER,
        "RFC 9110 §9.1: methods are case-sensitive; 'get' is a distinct extension method",
    ),
    V(
        "method-invalid-char",
        b"G(T /a HTTP/1.1\r\n" + H + b"\r\n",
        REFUSE,
        "RFC 9110 §9.1: a method is a token",
    ),
    V("method-trace", b"TRACE /a HTTP/1.1\r\n" + H + b"\r\n", EITHER, "RFC 9110 §9.3.8"),
    V("method-head", b"HEAD /a HTTP/1.1\r\n" + H + b"\r\n", FORWARD, "RFC 9110 §9.3.2"),
    # --- limits ------------------------------------------------------------------------------
    V(
        "long-target",
        b"GET /" + b"a" * 6000 + b" HTTP/1.1\r\n" + H + b"\r\n",
        FORWARD,
        "RFC 9112 §3: at least 8000 octets of request line SHOULD be supported",
    ),
    V(
        "target-too-long",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n" + H + b"\r\n",
        REFUSE,
        "RFC 9112 §3, RFC 9110 §15.5.15: 414",
    ),
    V(
        "many-headers",
        G + b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(90)) + b"\r\n",
        FORWARD,
        "RFC 9110 §5.4: limits are the server's, 90 fields is ordinary",
    ),
    V(
        "too-many-headers",
        G + b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(300)) + b"\r\n",
        EITHER,
        "RFC 9110 §5.4, RFC 6585 §5: 431",
    ),
    V(
        "head-too-large",
        G + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n",
        REFUSE,
        "RFC 9110 §5.4, RFC 6585 §5: 431",
    ),
    # --- early answers (a backend answering before it read the body) -----------------------------
    V(
        "early-cl-no-body",
        P + b"Content-Length: 100\r\n\r\n",
        NO_REQUEST,
        "RFC 9112 §9.3: a response before the request ended; that connection cannot be reused",
        backend=EARLY,
    ),
    V(
        "early-cl-body-follows",
        (P + b"Content-Length: %d\r\n\r\n" % len(SMUG), SMUG),
        EITHER,
        "RFC 9112 §9.3",
        backend=EARLY,
    ),
    V(
        "early-close-cl-body-follows",
        (P + b"Content-Length: %d\r\n\r\n" % len(SMUG), SMUG),
        EITHER,
        "RFC 9112 §9.3, §9.6: the body of a request answered and closed on is never a "
        "request of its own",
        backend=EARLY_CLOSE,
    ),
    V(
        "early-close-chunked-body-follows",
        (CH, b"%x\r\n" % len(SMUG) + SMUG + b"\r\n0\r\n\r\n"),
        EITHER,
        "RFC 9112 §9.3, §9.6",
        backend=EARLY_CLOSE,
    ),
    V(
        "chunk-invalid-in-later-segment",
        (CH, b"zz\r\n" + SMUG + b"\r\n0\r\n\r\n"),
        NO_REQUEST,
        "RFC 9112 §7.1: a chunk size found malformed after the head was forwarded",
    ),
    V(
        "early-chunked-no-last-chunk",
        CH + b"5\r\nhello\r\n",
        NO_REQUEST,
        "RFC 9112 §9.3",
        backend=EARLY,
    ),
    V(
        "early-expect-100-no-body",
        P + b"Expect: 100-continue\r\nContent-Length: 40\r\n\r\n",
        NO_REQUEST,
        "RFC 9110 §10.1.1: the body may still follow a final answer",
        backend=EARLY,
    ),
    V(
        "early-complete-body",
        P + b"Content-Length: 5\r\n\r\nhello",
        FORWARD,
        "RFC 9112 §9.3",
        backend=EARLY,
    ),
    # --- Upgrade and tunnels (RFC 9110 §7.8) -----------------------------------------------------
    V(
        "websocket-upgrade",
        G + WS + b"\r\n",
        FORWARD,
        "RFC 6455 §4.1 (the backend answers 200, so the connection stays HTTP)",
    ),
    V(
        "websocket-upgrade-101-tunnel",
        (G + WS + b"\r\n", b"tunnel bytes"),
        FORWARD,
        "RFC 9110 §15.2.2, RFC 9112 §9.8: after a 101 the connection is a tunnel owned by that "
        "client, never pooled",
        backend=UPGRADE_101,
        answer=101,
    ),
    V(
        "websocket-upgrade-101-then-request",
        G + WS + b"\r\n" + SMUG,
        FORWARD,
        "RFC 9110 §7.8: bytes after an upgrade request are the new protocol's once it is "
        "switched, never a request",
        backend=UPGRADE_101,
        answer=101,
    ),
    V(
        "upgrade-unknown-101",
        G + b"Connection: Upgrade\r\nUpgrade: foo/1\r\n\r\n",
        EITHER,
        "RFC 9110 §7.8: a protocol the proxy does not tunnel is not offered to the backend",
        backend=UPGRADE_101,
    ),
    V(
        "websocket-upgrade-with-cl",
        G + WS + b"Content-Length: %d\r\n\r\n" % len(SMUG) + SMUG,
        EITHER,
        "RFC 9110 §7.8: an upgrade with a body; the body must never be read as requests",
        backend=EARLY,
    ),
    V(
        "websocket-upgrade-with-chunked",
        G + WS + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(SMUG) + SMUG + b"\r\n0\r\n\r\n",
        EITHER,
        "RFC 9110 §7.8",
    ),
    V(
        "h2c-upgrade",
        G + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        FORWARD,
        "RFC 9113 §3.1: h2c is obsolete; the Upgrade is hop-by-hop and dropped",
    ),
    V(
        "upgrade-unknown-with-cl",
        P + b"Connection: Upgrade\r\nUpgrade: foo/1\r\n"
        b"Content-Length: %d\r\n\r\n" % len(SMUG) + SMUG,
        EITHER,
        "RFC 9110 §7.8",
    ),
    V(
        "connection-close-then-request",
        G + b"Connection: close\r\n\r\n" + SMUG,
        FORWARD,
        "RFC 9112 §9.6: nothing after a request with close is read",
    ),
]


_BARE_LF = (
    "RFC 9112 §2.2 lets a recipient accept a bare LF as a line end (MAY); the proxy "
    "does not (llhttp strict), so every backend frames what it forwards the same way: "
    "bare LF is the classic gadget for making two parsers split a message differently"
)
_UPGRADE_BODY = (
    "an Upgrade request with a body: llhttp ends an upgrade request at its head, so "
    "the body would be parsed as further requests (BUG-1, smuggling across clients); "
    "refused 400. RFC 9110 §7.8 does not forbid the body, but no WebSocket client "
    "sends one"
)

# An extension method (which llhttp does not know) right behind a chunked body that began in
# an earlier read: llhttp does not say where that body ends in this read, and the proxy never
# searches a body for a request line, so it refuses that request.
_BEHIND_SPLIT_CHUNKED = (
    "the request before it is forwarded whole; this one, an extension method llhttp does not "
    "know, is answered 400 and the connection closed, because its start lies behind a chunked "
    "body that began in an earlier read and the proxy only finds a request line by stepping "
    "over bodies it saw start (RFC 9112 §7.1), never by searching one"
)

KNOWN_STRICTER: dict[str, str] = {
    "absolute-form-ws-scheme": (
        "a ws: target names a WebSocket resource, not an HTTP one (RFC 6455 §3, RFC 9110 §4.2); "
        "absolute-form is rewritten to origin-form only for http/https, where its authority is "
        "checked against Host, anything else is refused 400 rather than forwarded under a "
        "guessed meaning"
    ),
    "chunk-bws-before-extension": (
        "RFC 9112 §7.1.1 allows BWS before ';' in a chunk extension, but llhttp in strict mode "
        "refuses it and the proxy does not parse leniently: whitespace in chunk lines is a known "
        "desync gadget (parsers disagree on it) and clients do not send it"
    ),
    "chunk-size-bare-lf": _BARE_LF,
    "chunk-data-bare-lf": _BARE_LF,
    "chunk-all-bare-lf": _BARE_LF,
    "bare-lf-one-field": _BARE_LF,
    "bare-lf-everywhere": _BARE_LF,
    "chunk-trailer-content-length": (
        "RFC 9110 §6.5.1: a sender MUST NOT generate framing fields in a trailer section; llhttp "
        "refuses Content-Length there and the proxy answers 400 rather than forward a trailer a "
        "backend might merge into the head"
    ),
    "field-value-ctl": (
        "RFC 9110 §5.5: a control character other than HTAB is not allowed in a field value; "
        "llhttp strict refuses it (400) rather than pass on bytes backends treat differently"
    ),
    "early-cl-body-follows": (
        "the backend answered before the body arrived (RFC 9112 §9.3): the proxy relays the "
        "answer, closes the client connection and the upstream one instead of streaming the "
        "rest of a body the backend may never read; the head was forwarded and answered, only "
        "the body never reaches the backend"
    ),
    "websocket-upgrade-with-cl": _UPGRADE_BODY,
    "websocket-upgrade-with-chunked": _UPGRADE_BODY,
    "upgrade-unknown-with-cl": _UPGRADE_BODY,
    "method-extension-behind-split-chunk": _BEHIND_SPLIT_CHUNKED,
    "method-extension-behind-split-quoted-extension": _BEHIND_SPLIT_CHUNKED,
}


# ---------------------------------------------------------------------------------------
# response vectors: what the backend sends back to GET /resp/<name>


@dataclass(frozen=True)
class ResponseVector:
    name: str
    raw: bytes
    why: str
    close: bool = False  # the backend closes after sending it
    method: str = "GET"
    status: bytes | None = b"200"  # the status digits the client must see (if relayed)
    refuse_ok: bool = False  # a 502 instead is correct too
    must_refuse: bool = False  # relaying it would be wrong


def R(name: str, raw: bytes, why: str, **kw) -> ResponseVector:
    return ResponseVector(name, raw, why, **kw)


CT = b"Content-Type: text/plain\r\n"

RESPONSE_VECTORS: list[ResponseVector] = [
    R("cl", b"HTTP/1.1 200 OK\r\n" + CT + b"Content-Length: 5\r\n\r\nhello", "RFC 9112 §6.3"),
    R(
        "chunked",
        b"HTTP/1.1 200 OK\r\n" + CT + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "RFC 9112 §7.1",
    ),
    R(
        "te-gzip-chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\nGZIP\r\n0\r\n\r\n",
        "RFC 9112 §6.1: codings listed in the order applied",
    ),
    R(
        "chunk-extension-and-trailer",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;e=1\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n",
        "RFC 9112 §7.1.1, §7.1.2",
    ),
    R("cl-leading-zeros", b"HTTP/1.1 200 OK\r\nContent-Length: 002\r\n\r\nok", "RFC 9110 §8.6"),
    R(
        "te-three-codings",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: deflate, gzip, chunked\r\n\r\n"
        b"4\r\nDFGZ\r\n0\r\n\r\n",
        "RFC 9112 §6.1: codings listed in the order applied",
    ),
    R(
        "te-mixed-case",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: GZIP , Chunked\r\n\r\n4\r\nGZIP\r\n0\r\n\r\n",
        "RFC 9112 §7: coding names are case-insensitive; OWS around list items (RFC 9110 §5.6.1)",
    ),
    R(
        "te-two-fields",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n4\r\nGZIP\r\n0\r\n\r\n",
        "RFC 9110 §5.3: two field lines are one list, gzip then chunked",
        refuse_ok=True,
    ),
    R(
        "http-1.2-response",
        b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "RFC 9110 §2.5: a higher minor version SHOULD be processed as HTTP/1.1",
    ),
    R(
        "http-2.0-response",
        b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "RFC 9110 §2.5: another major version on an HTTP/1.1 connection; framed unambiguously "
        "all the same, so relaying it as HTTP/1.1 or refusing it are both safe",
        refuse_ok=True,
    ),
    R(
        "te-chunked-gzip-chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip, chunked\r\n"
        b"\r\n4\r\nINNR\r\n0\r\n\r\n",
        "RFC 9112 §6.1: chunked applied twice is invalid; relay the "
        "codings in order or refuse (issue 13)",
        refuse_ok=True,
    ),
    R(
        "te-chunked-gzip-close",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\ndata until close",
        "RFC 9112 §6.3 rule 4: read until close; relay the codings in order (issue 13)",
        close=True,
        refuse_ok=True,
    ),
    R(
        "te-gzip-close",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\ngzipped until close",
        "RFC 9112 §6.3 rule 4",
        close=True,
        refuse_ok=True,
    ),
    R(
        "status-099",
        b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok",
        "RFC 9112 §4: status-code is 3DIGIT; relayed as three digits or refused (issue 13)",
        status=b"099",
        refuse_ok=True,
    ),
    R(
        "status-600",
        b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok",
        "RFC 9110 §15: outside 100..599, treated as 5xx by a client",
        status=b"600",
        refuse_ok=True,
    ),
    R(
        "status-no-reason",
        b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok",
        "RFC 9112 §4: the reason-phrase may be empty",
    ),
    R(
        "status-no-reason-no-space",
        b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",
        "RFC 9112 §4: the SP is required, but common; relay or refuse",
        refuse_ok=True,
    ),
    R(
        "interim-100-then-200",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "RFC 9110 §15.2: 1xx before the final answer",
    ),
    R(
        "interim-103-then-200",
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "RFC 8297",
    ),
    R(
        "interim-two-then-200",
        b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "RFC 9110 §15.2",
    ),
    R(
        "cl-repeated-differ",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\nok",
        "RFC 9112 §6.3 rule 5: unrecoverable framing error (502)",
        status=None,
        must_refuse=True,
    ),
    R(
        "cl-list-same",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
        "RFC 9110 §8.6: identical values MAY be accepted",
        refuse_ok=True,
    ),
    R(
        "cl-negative",
        b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
        "RFC 9110 §8.6",
        status=None,
        must_refuse=True,
    ),
    R(
        "cl-and-te",
        b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
        "RFC 9112 §6.3 rule 3: chunked wins, the connection is closed",
        refuse_ok=True,
    ),
    R(
        "extra-bytes-after",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nstolen",
        "RFC 9112 §9.3: bytes no request asked for; that connection must not answer anyone else",
    ),
    R(
        "cl-longer-than-body",
        b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\nshort",
        "RFC 9112 §8: an incomplete message is never passed off as complete",
        close=True,
        status=None,
        must_refuse=True,
    ),
    R(
        "no-body-204-with-body",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
        "RFC 9110 §15.3.5: a 204 has no content",
        status=b"204",
        refuse_ok=True,
    ),
    R(
        "head-with-cl",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
        "RFC 9110 §9.3.2: a HEAD answer has no content",
        method="HEAD",
    ),
    R(
        "http10-close-delimited",
        b"HTTP/1.0 200 OK\r\n" + CT + b"\r\nuntil close",
        "RFC 9112 §6.3 rule 8",
        close=True,
    ),
    R(
        "bare-lf-head",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        "RFC 9112 §2.2: a recipient MAY accept bare LF",
        refuse_ok=True,
    ),
    R(
        "obs-fold",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 2\r\n\r\nok",
        "RFC 9112 §5.2: a proxy MUST unfold or refuse",
        refuse_ok=True,
    ),
    R(
        "ws-before-colon",
        b"HTTP/1.1 200 OK\r\nContent-Length : 40\r\nContent-Length: 2\r\n\r\nok",
        "RFC 9112 §5.1: a proxy MUST remove the whitespace or refuse",
        refuse_ok=True,
    ),
    R(
        "unrequested-101",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nstolen",
        "RFC 9110 §15.2.2: a 101 answers only a request that asked to upgrade",
        status=None,
        must_refuse=True,
    ),
    R(
        "http09-answer",
        b"no status line at all",
        "RFC 9112 Appendix C.1",
        close=True,
        status=None,
        must_refuse=True,
    ),
    R(
        "te-http10-chunked",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        "RFC 9112 §6.1: TE in HTTP/1.0 is faulty framing",
        close=True,
        refuse_ok=True,
    ),
]
