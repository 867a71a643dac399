"""The wire side of the differential suite (tests/security/test_differential.py).

- Two readers of a byte stream of HTTP/1.x messages, pure functions with no I/O: a *strict*
  one (llhttp through httptools, the parser the proxy itself uses) and a *lenient* one
  written here, which accepts what a forgiving server accepts (bare LF line ends, empty
  lines before a request, obs-fold, whitespace around field names, any run of whitespace in
  the request line, "chunked" anywhere in Transfer-Encoding, chunk sizes with whitespace).
  A stream both read as the same messages is not ambiguous; one they read differently is
  what request smuggling is made of.
- ``Recorder``: a socket-level backend running in its own thread (so one instance serves
  every test of a module, whatever event loop a test runs on). It listens on one port per
  proxy under test, frames requests with the lenient reader, keeps every byte each
  connection received, and answers in one of the modes a vector asks for: after the whole
  request (``echo``), as soon as the head arrived before reading any body (``early``; with
  ``early-close`` it then closes the connection, as a server that will not read a body
  does), a 2xx to CONNECT after which the connection is a tunnel (``connect-2xx``), a 101 to
  a request asking to upgrade, after which it is a tunnel too (``upgrade-101``), or a given
  raw response for targets under ``/resp/``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import threading
import time
from collections.abc import Callable

import httptools

from support.wire import Message, StrictCollector

LOOPBACK = "127.0.0.1"
# A recv that waits this long re-checks whether the recorder is stopping.
POLL = 0.05
# Longest request head the lenient reader frames (the recorder answers 400 beyond); every
# proxy under test refuses far shorter ones.
MAX_HEAD = 1 << 20

ECHO = "echo"
EARLY = "early"
EARLY_CLOSE = "early-close"
CONNECT_2XX = "connect-2xx"
UPGRADE_101 = "upgrade-101"
MODES = (ECHO, EARLY, EARLY_CLOSE, CONNECT_2XX, UPGRADE_101)

_WS = b" \t"
_HEX = re.compile(rb"^[0-9A-Fa-f]+$")
_DIGITS = re.compile(rb"^[0-9]+$")


class Malformed(Exception):
    """The lenient reader could not frame this either."""


def codings(values: list[bytes]) -> list[bytes]:
    """Transfer codings in the order they were applied (RFC 9112 §6.1), lower-cased."""
    return [t.strip(_WS).lower() for v in values for t in v.split(b",") if t.strip(_WS)]


# ---------------------------------------------------------------------------------------
# the lenient reader


def _line(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    """The next line (CR LF or a bare LF), without its end; None when incomplete."""
    i = buf.find(b"\n", pos)
    if i < 0:
        return None
    line = buf[pos:i]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line, i + 1


def _fields(buf: bytes, pos: int) -> tuple[list[tuple[bytes, bytes]], int] | None:
    out: list[tuple[bytes, bytes]] = []
    while True:
        got = _line(buf, pos)
        if got is None:
            if len(buf) - pos > MAX_HEAD:
                raise Malformed("head too large")
            return None
        line, pos = got
        if not line:
            return out, pos
        if line[:1] in (b" ", b"\t") and out:
            # obs-fold (RFC 9112 §5.2): replaced by one SP, the forgiving way
            name, value = out[-1]
            out[-1] = (name, (value + b" " + line.strip(_WS)).strip(_WS))
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise Malformed(f"field line without a colon: {line[:80]!r}")
        name = name.strip(_WS)
        if not name:
            raise Malformed("empty field name")
        out.append((name, value.strip(_WS)))


def _content_length(values: list[bytes]) -> int | None:
    if not values:
        return None
    parts = [p.strip(_WS) for v in values for p in v.split(b",")]
    if not all(_DIGITS.match(p) for p in parts):
        raise Malformed(f"Content-Length {values!r}")
    return int(parts[0])  # the first one, where several disagree


def _chunked(buf: bytes, pos: int) -> tuple[bytes, list[tuple[bytes, bytes]], int] | None:
    body = bytearray()
    while True:
        got = _line(buf, pos)
        if got is None:
            return None
        line, pos = got
        size_s = line.split(b";", 1)[0].strip(_WS)
        if not _HEX.match(size_s):
            raise Malformed(f"chunk size {line[:40]!r}")
        size = int(size_s, 16)
        if size == 0:
            got2 = _fields(buf, pos)
            if got2 is None:
                return None
            trailers, pos = got2
            return bytes(body), trailers, pos
        if len(buf) < pos + size + 1:
            return None
        body += buf[pos : pos + size]
        pos += size
        if buf[pos : pos + 2] == b"\r\n":
            pos += 2
        elif buf[pos : pos + 1] == b"\n":
            pos += 1
        elif len(buf) < pos + 2:
            return None
        else:
            raise Malformed("chunk data not followed by a line end")


def request_head(buf: bytes, pos: int = 0) -> tuple[Message, int] | None:
    """A request head from ``pos`` (framing decided, body not read), or None if incomplete."""
    while buf[pos : pos + 2] == b"\r\n" or buf[pos : pos + 1] == b"\n":
        pos += 2 if buf[pos : pos + 1] == b"\r" else 1  # empty lines first (RFC 9112 §2.2)
    start = pos
    got = _line(buf, pos)
    if got is None:
        if len(buf) - pos > MAX_HEAD:
            raise Malformed("request line too long")
        return None
    line, pos = got
    parts = line.split()
    if len(parts) == 2:  # HTTP/0.9: a request line and nothing else
        return Message(line, parts[0], parts[1], b"", framing="none", start=start), pos
    if len(parts) < 3:
        raise Malformed(f"request line {line[:80]!r}")
    msg = Message(line, parts[0], parts[1], parts[-1], start=start)
    got2 = _fields(buf, pos)
    if got2 is None:
        return None
    msg.fields, pos = got2
    te = codings(msg.values("transfer-encoding"))
    if b"chunked" in te:
        msg.framing = "chunked"
    else:
        n = _content_length(msg.values("content-length"))
        msg.framing = "length" if n else "none"
        msg.length = n or 0
    return msg, pos


def lenient_request(buf: bytes, pos: int = 0) -> tuple[Message, int] | None:
    """One request framed the forgiving way; None when incomplete; ``Malformed`` if not
    even that reads it."""
    got = request_head(buf, pos)
    if got is None:
        return None
    msg, pos = got
    if msg.framing == "length":
        n = msg.length
        if len(buf) < pos + n:
            return None
        msg.body = buf[pos : pos + n]
        pos += n
    elif msg.framing == "chunked":
        got2 = _chunked(buf, pos)
        if got2 is None:
            return None
        msg.body, _, pos = got2
    msg.end = pos
    return msg, pos


def _every(
    read: Callable[[bytes, int], tuple[Message, int] | None], buf: bytes
) -> tuple[list[Message], bytes, str]:
    """Every message ``read`` frames in ``buf``, one after another: (complete ones, the
    unread rest, an error or "")."""
    out: list[Message] = []
    pos = 0
    while pos < len(buf):
        try:
            got = read(buf, pos)
        except Malformed as e:
            return out, buf[pos:], str(e)
        if got is None:
            break
        msg, pos = got
        out.append(msg)
    return out, buf[pos:], ""


def lenient_requests(buf: bytes) -> tuple[list[Message], bytes, str]:
    """Every request in ``buf``: (complete ones, the unread rest, an error or "")."""
    return _every(lenient_request, buf)


def lenient_response(
    buf: bytes, pos: int = 0, *, head: bool = False, eof: bool = False
) -> tuple[Message, int] | None:
    """One response (1xx included); None when incomplete (a close-delimited body is
    complete only at ``eof``)."""
    start = pos
    if not buf[pos : pos + 5].upper().startswith(b"HTTP/"):
        # no status line: an HTTP/0.9-style answer, the rest of the connection
        if not eof:
            return None
        return Message(
            b"", status=b"", body=buf[pos:], framing="close", start=start, end=len(buf)
        ), len(buf)
    got = _line(buf, pos)
    if got is None:
        return None
    line, pos = got
    parts = line.split(None, 2)
    if len(parts) < 2:
        raise Malformed(f"status line {line[:80]!r}")
    msg = Message(line, version=parts[0], status=parts[1], start=start)
    got2 = _fields(buf, pos)
    if got2 is None:
        return None
    msg.fields, pos = got2
    status = int(parts[1]) if _DIGITS.match(parts[1]) else 0
    te = codings(msg.values("transfer-encoding"))
    if head or 100 <= status < 200 or status in (204, 304):
        msg.framing = "none"
    elif te:
        if te[-1] == b"chunked":
            msg.framing = "chunked"
            got3 = _chunked(buf, pos)
            if got3 is None:
                return None
            msg.body, _, pos = got3
        else:
            msg.framing = "close"
    else:
        n = _content_length(msg.values("content-length"))
        if n is None:
            msg.framing = "close"
        else:
            msg.framing = "length"
            if len(buf) < pos + n:
                return None
            msg.body = buf[pos : pos + n]
            pos += n
    if msg.framing == "close":
        if not eof:
            return None
        msg.body = buf[pos:]
        pos = len(buf)
    msg.end = pos
    return msg, pos


def lenient_responses(
    buf: bytes, *, head: bool = False, eof: bool = False
) -> tuple[list[Message], bytes, str]:
    """Every response in ``buf`` (1xx included): (complete ones, the unread rest, an error
    or "")."""
    return _every(lambda b, pos: lenient_response(b, pos, head=head, eof=eof), buf)


def final_responses(msgs: list[Message]) -> list[Message]:
    """Responses that are not interim (1xx other than 101)."""
    return [m for m in msgs if not (m.status[:1] == b"1" and m.status != b"101")]


# ---------------------------------------------------------------------------------------
# the strict reader (llhttp, as the proxy parses)

# RFC 9110 §9.1: a method is a token.
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# llhttp knows a fixed list of methods and refuses the rest, though methods are extensible
# (RFC 9110 §9.1, §16.1). The strict reader shows it this one in place of an extension
# method: for a request, llhttp frames every method but CONNECT the same way.
STAND_IN_METHOD = b"GET"


def _failed_at(buf: bytes) -> tuple[list[Message], int]:
    """Feed ``buf`` one byte at a time (llhttp is a streaming parser, so this reads it the
    same way): the requests completed before the error and where the failing one starts."""
    col = StrictCollector(httptools.HttpRequestParser)
    after = 0
    for i in range(len(buf)):
        try:
            col.parser.feed_data(buf[i : i + 1])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            break
        if col.cur is None:
            after = i + 1
    while buf[after : after + 2] == b"\r\n":
        after += 2
    return col.done, after


def strict_requests(buf: bytes) -> tuple[list[Message], bool, str]:
    """Requests as llhttp (strict) reads ``buf``: (complete ones, whether an incomplete one
    follows, an error or ""). A request that asks to switch protocols (CONNECT, Upgrade)
    ends at its head for llhttp; since the recorder never switches except for a CONNECT
    in ``connect-2xx`` mode, parsing resumes after it as HTTP (what the backend reads)."""
    out: list[Message] = []
    pos = 0
    while pos < len(buf):
        col = StrictCollector(httptools.HttpRequestParser)
        try:
            col.parser.feed_data(buf[pos:])
        except httptools.HttpParserUpgrade as e:
            out += col.done
            if col.done:
                col.done[-1].framing = "upgrade"
            pos += e.args[0]
            continue
        except httptools.HttpParserInvalidMethodError as e:
            done, start = _failed_at(buf[pos:])
            out += done
            method = buf[pos + start :].split(b" ", 1)[0]
            if not _TOKEN.match(method) or method == STAND_IN_METHOD:
                return out, True, f"{type(e).__name__}: {e}"
            rest, partial, err = strict_requests(STAND_IN_METHOD + buf[pos + start + len(method) :])
            if rest:
                rest[0].method = method
            elif partial:
                pass
            return out + rest, partial, err
        except httptools.HttpParserError as e:
            out += col.done
            return out, col.cur is not None, f"{type(e).__name__}: {e}"
        out += col.done
        return out, col.cur is not None, ""
    return out, False, ""


def strict_responses(buf: bytes, *, eof: bool) -> tuple[list[Message], bool, str]:
    """Responses as llhttp (strict) reads ``buf``; a close-delimited body ends at ``eof``."""
    col = StrictCollector(httptools.HttpResponseParser)
    try:
        col.parser.feed_data(buf)
    except httptools.HttpParserError as e:
        return col.done, col.cur is not None, f"{type(e).__name__}: {e}"
    except httptools.HttpParserUpgrade:
        return col.done, False, ""
    cur = col.cur
    if (
        cur is not None
        and not col.in_head
        and eof
        and not cur.values("content-length")
        and b"chunked" not in codings(cur.values("transfer-encoding"))
    ):
        col.done.append(cur)  # close-delimited, complete at EOF
        cur = None
    return col.done, cur is not None, ""


# ---------------------------------------------------------------------------------------
# the recording backend


def echo_body(msg: Message) -> bytes:
    rid = (msg.values("x-req-id") or [b"-"])[0]
    return b"echo " + msg.method + b" " + msg.target + b" " + rid


def echo_response(msg: Message, *, close: bool = False) -> bytes:
    body = echo_body(msg)
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body),
        b"Connection: close\r\n" if close else b"",
        body,
    )


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def switching_protocols(msg: Message) -> bytes:
    """A 101 to an upgrade request (RFC 9110 §15.2.2), with the WebSocket accept token when
    it asked for one (RFC 6455 §4.2.2)."""
    proto = msg.values("upgrade")[0]
    out = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + proto + b"\r\n"
    key = msg.values("sec-websocket-key")
    if key:
        accept = base64.b64encode(hashlib.sha1(key[0] + _WS_GUID).digest())
        out += b"Sec-WebSocket-Accept: " + accept + b"\r\n"
    return out + b"\r\n"


BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\nConnection: close\r\n\r\nbad request"
)
CONNECT_OK = b"HTTP/1.1 200 Connection Established\r\n\r\n"
# What a tunnel answers to any bytes: if a proxy lets another client's request into a
# tunnel, that client reads this instead of its own answer.
TUNNEL_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\ntunnel-data"


class RecConn:
    """One accepted connection: every byte received, and what the recorder made of it."""

    def __init__(self, listener: str, sock: socket.socket):
        self.listener = listener
        self.sock = sock
        self.raw = bytearray()
        self.heads: list[Message] = []  # every request head seen, in order
        self.errors: list[str] = []
        self.tunnel = False
        self.tunnel_at: int | None = None  # offset in raw where tunnel data starts
        self.closed = False  # the recorder's side is closed
        self.peer_eof = False  # the proxy closed (or reset) its side

    def data(self) -> bytes:
        return bytes(self.raw)


class Recorder:
    def __init__(self) -> None:
        self.mode = ECHO
        self.raw_response: bytes | None = None  # answer to targets under /resp/
        self.raw_close = False  # close after sending raw_response
        self.ports: dict[str, int] = {}
        self.conns: list[RecConn] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    # -- life ------------------------------------------------------------------------------
    def listen(self, name: str) -> int:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((LOOPBACK, 0))
        s.listen(128)
        s.settimeout(POLL)
        self._socks.append(s)
        port = s.getsockname()[1]
        self.ports[name] = port
        self._spawn(self._accept, name, s)
        return port

    def stop(self) -> None:
        self._stop.set()
        for s in self._socks:
            s.close()
        with self._lock:
            conns = list(self.conns)
        for c in conns:
            _close(c)
        for t in self._threads:
            t.join(timeout=2)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    # -- what it saw -----------------------------------------------------------------------
    def connections(self, listener: str) -> list[RecConn]:
        with self._lock:
            return [c for c in self.conns if c.listener == listener]

    def total(self, listener: str) -> int:
        return sum(len(c.raw) for c in self.connections(listener))

    def close_all(self, listener: str) -> None:
        """Close every connection of ``listener`` (so nothing pooled survives a vector)."""
        for c in self.connections(listener):
            _close(c)

    def forget(self, listener: str) -> None:
        with self._lock:
            self.conns = [c for c in self.conns if c.listener != listener]

    # -- serving ---------------------------------------------------------------------------
    def _accept(self, name: str, s: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = s.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(POLL)
            conn = RecConn(name, sock)
            with self._lock:
                self.conns.append(conn)
            self._spawn(self._serve, conn)

    def _send(self, conn: RecConn, data: bytes) -> None:
        try:
            conn.sock.sendall(data)
        except OSError:
            conn.closed = True

    def _answer(self, conn: RecConn, msg: Message) -> bool:
        """Answer one request; False when the connection is to be closed."""
        if msg.method == b"CONNECT" and self.mode == CONNECT_2XX:
            self._send(conn, CONNECT_OK)
            conn.tunnel = True
            return True
        if (
            self.mode == UPGRADE_101
            and msg.values("upgrade")
            and b"upgrade" in codings(msg.values("connection"))
        ):
            self._send(conn, switching_protocols(msg))
            conn.tunnel = True
            return True
        if self.raw_response is not None and msg.target.startswith(b"/resp/"):
            self._send(conn, self.raw_response)
            return not self.raw_close
        self._send(conn, echo_response(msg))
        conn_tokens = codings(msg.values("connection"))
        if msg.version in (b"", b"HTTP/1.0"):
            return b"keep-alive" in conn_tokens and msg.version != b""
        return b"close" not in conn_tokens

    def _serve(self, conn: RecConn) -> None:
        buf = b""
        pos = 0
        answered_at = -1  # start offset of the request answered at its head
        seen_at = -1  # start offset of the last head recorded
        try:
            while not self._stop.is_set() and not conn.closed:
                try:
                    data = conn.sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    conn.peer_eof = not conn.closed
                    return
                if not data:
                    conn.peer_eof = not conn.closed
                    return
                conn.raw += data
                if conn.tunnel:
                    self._send(conn, TUNNEL_REPLY)
                    continue
                buf += data
                while pos < len(buf) and not conn.tunnel:
                    try:
                        head = request_head(buf, pos)
                        if head is None:
                            break
                        msg = head[0]
                        if msg.start != seen_at:
                            seen_at = msg.start
                            conn.heads.append(msg)
                            if self.mode == EARLY_CLOSE:
                                # answered before any of its body is read, then closed
                                self._send(conn, echo_response(msg, close=True))
                                return
                            if self.mode == EARLY or (
                                self.mode == CONNECT_2XX and msg.method == b"CONNECT"
                            ):
                                # answered before any of its body is read
                                answered_at = msg.start
                                if not self._answer(conn, msg):
                                    return
                                if conn.tunnel:
                                    conn.tunnel_at = head[1]
                                    if buf[head[1] :]:
                                        self._send(conn, TUNNEL_REPLY)
                                    break
                        got = lenient_request(buf, pos)
                    except Malformed as e:
                        conn.errors.append(str(e))
                        self._send(conn, BAD_REQUEST)
                        return
                    if got is None:
                        break
                    msg, pos = got
                    if msg.start != answered_at and not self._answer(conn, msg):
                        return
                    if conn.tunnel:
                        conn.tunnel_at = pos
                        if buf[pos:]:
                            self._send(conn, TUNNEL_REPLY)
                        break
                    if not msg.version:
                        return  # HTTP/0.9: one request per connection
        finally:
            _close(conn)


def _close(conn: RecConn) -> None:
    if conn.closed and conn.sock.fileno() < 0:
        return
    conn.closed = True
    try:
        conn.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.sock.close()


# ---------------------------------------------------------------------------------------
# knowing a peer let go of its upstream connections

_CLOSE_WAIT = "08"
_ESTABLISHED = "01"


def sockets_to(port: int) -> list[str]:
    """States of the TCP sockets on this host connected to 127.0.0.1:``port`` from the
    other end (a proxy's upstream side), from /proc/net/tcp."""
    want = f"0100007F:{port:04X}"
    states = []
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[2] == want:
                    states.append(parts[3])
    except OSError:
        return []
    return states


def wait_released(port: int, deadline: float = 3.0) -> bool:
    """Poll until no socket is still open towards ``port`` (every pooled upstream connection
    whose backend end was closed has been closed by the proxy too)."""
    end = time.monotonic() + deadline
    while True:
        if not any(s in (_CLOSE_WAIT, _ESTABLISHED) for s in sockets_to(port)):
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
