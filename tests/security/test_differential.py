"""Differential tests: stickyproxy, NGINX and HAProxy on the same vectors (issue 13).

Every request vector of tests/security/differential_vectors.py goes, as raw bytes, through
each proxy in front of the same recording backend (tests/security/recorder.py), on a proxy
whose upstream connection is already pooled (a warm-up request from another client first).
Then another client, the victim, sends an ordinary ``GET /account`` with its own user and a
nonce the backend echoes. What is asserted:

1. the victim gets its own answer from stickyproxy, whatever the vector did before it;
2. every byte stickyproxy sent a backend reads as the same requests for a strict reader
   (llhttp) and a lenient one (bare LF, obs-fold, whitespace, "chunked" anywhere): nothing
   it forwards is ambiguous;
3. stickyproxy does what the vector says (forward, refuse without a byte upstream, never a
   complete request for an incomplete one), and refuses HTTP/0.9 at once;
4. stickyproxy never forwards a complete request for a vector both NGINX and HAProxy refuse,
   and sends a backend no byte of a vector of which neither of them sends any;
5. every vector of which stickyproxy forwards fewer requests than both of them (none, or
   fewer of several pipelined ones) is in ``KNOWN_STRICTER`` with its reason, and nothing
   else is (the table cannot go stale in either direction).

Response vectors: the backend answers ``GET /resp/<name>`` with raw bytes; what a client of
stickyproxy receives must be unambiguous (strict and lenient readers agree), keep the status
as three digits, keep the transfer codings in the order applied, or be refused (502) where
the vector allows; the next client still gets its own answer; and a response neither NGINX
nor HAProxy relays, stickyproxy does not relay either.

1-3 and the response checks always run. 4-5 need the ``nginx`` and ``haproxy`` programs
(CI installs them); without them those tests are skipped with the reason. NGINX and HAProxy
are started once for the module (tests/security/peers.py); stickyproxy is the in-process
``proxy`` fixture, a fresh one per vector.

Set ``STICKYPROXY_DIFF_REPORT=/path/file.jsonl`` to get one line per vector and proxy with
what happened (for docs/THREAT_MODEL.md's table).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import peers as peer_procs
from .differential_vectors import (
    EITHER,
    FORWARD,
    KNOWN_STRICTER,
    NO_REQUEST,
    REFUSE,
    REQUEST_VECTORS,
    RESPONSE_VECTORS,
    RequestVector,
    ResponseVector,
)
from .recorder import (
    LOOPBACK,
    Message,
    Recorder,
    codings,
    final_responses,
    lenient_request,
    lenient_requests,
    lenient_response,
    lenient_responses,
    sockets_to,
    strict_requests,
    strict_responses,
    wait_released,
)

# How long the attacker's client waits for a first answer where no answer may come (a proxy
# that holds a request open waiting for a body costs this much, per vector and proxy) ...
ATTACK_WAIT = 0.8
# ... and where one must come (forwarded or refused): generous, a busy machine is slow.
ANSWER_WAIT = 3.0
# "At once": a refusal that is not a timeout (the header timeouts in use are 5 s and more).
PROMPT_S = 2.0
# How long the victim (and a response vector's client) waits for its answer.
VICTIM_WAIT = 3.0
# The backend is "quiet" when no byte arrived for this long (bounded by QUIET_MAX).
QUIET = 0.05
QUIET_MAX = 1.5
# Between the segments of a split vector: long enough that the proxy reads each one on its
# own (loopback delivers a write at once; this is the input's shape, not a wait for state).
SPLIT_GAP = 0.05
# How long a proxy may take to close an upstream connection it must not reuse.
CLOSE_WAIT = 2.0
PROXIES = ("stickyproxy", "nginx", "haproxy")
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n")

_STICKY_RUNS: dict[str, Run] = {}
_STICKY_RESP: dict[str, RespRun] = {}


# ---------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def recorder():
    rec = Recorder()
    for name in PROXIES:
        rec.listen(name)
    yield rec
    rec.stop()


@pytest.fixture(scope="module")
def peers(recorder, tmp_path_factory):
    """NGINX and HAProxy in front of the recorder, or None when either is not installed."""
    gone = peer_procs.missing()
    if gone:
        yield None
        return
    workdir = tmp_path_factory.mktemp("peers")
    started = {}
    try:
        for name in ("nginx", "haproxy"):
            started[name] = peer_procs.start(name, workdir, recorder.ports[name])
        yield started
    finally:
        for p in started.values():
            p.stop()


def _need_peers(peers) -> None:
    if peers is None:
        pytest.skip(
            f"differential part needs nginx and haproxy; missing: {', '.join(peer_procs.missing())}"
        )


@dataclass
class _Backend:
    id: str
    url: str
    weight: int | None = None


async def _stickyproxy(proxy, recorder) -> int:
    port = recorder.ports["stickyproxy"]
    p = await proxy(
        [_Backend("app", f"http://{LOOPBACK}:{port}")],
        {"timeouts": {"response": "2s", "connect": "1s"}},
    )
    return p.port


# ---------------------------------------------------------------------------------------
# one client connection, read leniently with a deadline


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.raw = b""
        self.eof = False
        self.first_at: float | None = None  # when the first byte (or the close) came
        self.t0 = time.monotonic()

    @classmethod
    async def open(cls, port: int) -> Conn:
        async with asyncio.timeout(VICTIM_WAIT):
            r, w = await asyncio.open_connection(LOOPBACK, port, limit=1 << 20)
        return cls(r, w)

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            try:
                self.writer.write(data)
            except (ConnectionError, RuntimeError):
                pass

    def finals(self, *, head: bool = False) -> list[Message]:
        msgs, _, _ = lenient_responses(self.raw, head=head, eof=self.eof)
        return final_responses(msgs)

    async def read(self, want: int, timeout: float, *, head: bool = False) -> None:
        """Until ``want`` final responses arrived, the peer closed, or ``timeout``."""
        end = time.monotonic() + timeout
        while not self.eof and len(self.finals(head=head)) < want:
            left = end - time.monotonic()
            if left <= 0:
                return
            try:
                async with asyncio.timeout(left):
                    data = await self.reader.read(1 << 20)
            except TimeoutError:
                return
            except ConnectionError:
                data = b""
            if self.first_at is None:
                self.first_at = time.monotonic() - self.t0
            if not data:
                self.eof = True
            self.raw += data

    async def read_to_eof(self, timeout: float) -> None:
        """Until the peer closes, or ``timeout``."""
        end = time.monotonic() + timeout
        while not self.eof and time.monotonic() < end:
            await self.read(len(self.finals()) + 1, end - time.monotonic())

    def close(self) -> None:
        self.writer.close()


def victim_request(nonce: str) -> bytes:
    return (
        f"GET /account?victim={nonce} HTTP/1.1\r\nHost: shop.example\r\nX-User-Id: victim\r\n"
        f"X-Req-Id: {nonce}\r\nCookie: session=VICTIM\r\n\r\n"
    ).encode()


def victim_body(nonce: str) -> bytes:
    return f"echo GET /account?victim={nonce} {nonce}".encode()


async def _warm(port: int, nonce: str) -> None:
    """One request from its own client, so the next one finds an idle pooled upstream
    connection. Retried: a peer may still hold a connection the backend just closed."""
    for _ in range(3):
        c = await Conn.open(port)
        c.send(
            f"GET /warm/{nonce} HTTP/1.1\r\nHost: shop.example\r\nX-User-Id: attacker\r\n"
            f"X-Req-Id: {nonce}\r\n\r\n".encode()
        )
        await c.read(1, VICTIM_WAIT)
        c.close()
        f = c.finals()
        if f and f[0].status == b"200" and f[0].body.endswith(nonce.encode()):
            return
    raise AssertionError(f"warm-up through port {port} failed: {c.raw[:300]!r}")


async def _quiet(recorder: Recorder, listener: str) -> None:
    end = time.monotonic() + QUIET_MAX
    last, since = recorder.total(listener), time.monotonic()
    while time.monotonic() < end:
        await asyncio.sleep(0.01)
        now = recorder.total(listener)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= QUIET:
            return


async def _release(recorder: Recorder, listener: str, module_scoped: bool) -> None:
    """Close every backend connection of ``listener`` so nothing pooled outlives the run;
    for a peer (module-scoped), wait until it closed its ends too."""
    recorder.close_all(listener)
    if module_scoped:
        ok = await asyncio.to_thread(wait_released, recorder.ports[listener])
        assert ok, f"{listener} kept upstream connections the backend had closed"
    recorder.forget(listener)


# ---------------------------------------------------------------------------------------
# running a request vector through one proxy


@dataclass
class Run:
    proxy: str
    vec: RequestVector
    nonce: str
    attacker: Conn
    victim: Conn
    upstream: list[bytes]  # per upstream connection, everything received
    upstream_closed: list[bool]  # ... and whether the proxy closed it
    attacker_msgs: list[Message] = field(default_factory=list)
    touched: list[int] = field(default_factory=list)  # indices of connections with its bytes
    tunnels: int = 0  # upstream connections switched to a tunnel

    @property
    def forwarded(self) -> bool:
        """A complete request of the vector reached the backend."""
        return bool(self.attacker_msgs)

    def summary(self) -> dict:
        finals = self.attacker.finals()
        v = self.victim.finals()
        return {
            "vector": self.vec.name,
            "proxy": self.proxy,
            "forwarded": len(self.attacker_msgs),
            "touched": bool(self.touched),
            "answer": [m.status.decode("latin-1") for m in finals],
            "closed": self.attacker.eof,
            "first_answer_s": None
            if self.attacker.first_at is None
            else round(self.attacker.first_at, 3),
            "victim_ok": bool(v) and v[0].status == b"200" and v[0].body == victim_body(self.nonce),
            "upstream": [d[:1000].decode("latin-1") for d in self.upstream],
        }


def _ours(msg: Message, nonce: str) -> bool:
    """The warm-up's or the victim's request (not the vector's)."""
    return nonce.encode() in msg.target


def _attribute(run: Run) -> None:
    """Which complete requests and which bytes at the backend came from the vector."""
    for i, data in enumerate(run.upstream):
        msgs, rest, _ = lenient_requests(data)
        mine = [m for m in msgs if not _ours(m, run.nonce)]
        run.attacker_msgs += mine
        if mine or rest.strip(b"\r\n"):
            run.touched.append(i)


async def run_request(
    port: int, proxy: str, vec: RequestVector, recorder: Recorder, *, module_scoped: bool
) -> Run:
    recorder.mode = vec.backend
    recorder.raw_response = None
    nonce = secrets.token_hex(6)
    try:
        await _warm(port, nonce)
        attacker = await Conn.open(port)
        head = vec.raw.startswith(b"HEAD ")
        wait = ANSWER_WAIT if vec.expect in (FORWARD, REFUSE) else ATTACK_WAIT
        if vec.split:
            for seg in vec.segments:
                attacker.send(seg)
                await attacker.writer.drain()
                await asyncio.sleep(SPLIT_GAP)  # the input's shape: separate reads
            await attacker.read(1, wait, head=head)
        else:
            attacker.send(vec.segments[0])
            await attacker.read(1, wait, head=head)
            for seg in vec.segments[1:]:
                attacker.send(seg)
                await attacker.read(len(attacker.finals(head=head)) + 1, wait, head=head)
        if vec.forwards > 1:
            await attacker.read(vec.forwards, wait)
        if proxy == "stickyproxy" and (
            vec.expect == REFUSE
            or vec.expect == EITHER
            and any(m.status.startswith(b"4") for m in attacker.finals(head=head))
        ):
            await attacker.read_to_eof(ANSWER_WAIT)  # a refusal closes the connection
        victim = await Conn.open(port)
        victim.send(victim_request(nonce))
        await victim.read(1, VICTIM_WAIT)
        attacker.close()
        victim.close()
        await _quiet(recorder, proxy)
        conns = recorder.connections(proxy)
        # bytes after a switch (101, CONNECT 2xx) are tunnel data, not requests
        run = Run(
            proxy,
            vec,
            nonce,
            attacker,
            victim,
            [c.data()[: c.tunnel_at] if c.tunnel_at is not None else c.data() for c in conns],
            [c.peer_eof or c.closed for c in conns],
        )
        run.tunnels = sum(c.tunnel_at is not None for c in conns)
        _attribute(run)
        if not run.forwarded:
            # a connection that carried part of the vector but no complete request must be
            # closed by the proxy: give it a bounded moment to do so
            partial = [conns[i] for i in run.touched]
            end = time.monotonic() + CLOSE_WAIT
            while time.monotonic() < end and not all(c.peer_eof or c.closed for c in partial):
                await asyncio.sleep(0.01)
            run.upstream_closed = [c.peer_eof or c.closed for c in conns]
    finally:
        await _release(recorder, proxy, module_scoped)
    _report(run.summary())
    return run


def _report(line: dict) -> None:
    path = os.environ.get("STICKYPROXY_DIFF_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


# ---------------------------------------------------------------------------------------
# judging


def assert_victim_served(run: Run) -> None:
    got = run.victim.finals()
    assert got, (
        f"{run.proxy}: the victim got no answer after {run.vec.name!r}: {run.victim.raw[:300]!r}"
    )
    assert got[0].status == b"200" and got[0].body == victim_body(run.nonce), (
        f"{run.proxy}: the victim got someone else's answer after {run.vec.name!r}: "
        f"{run.victim.raw[:300]!r}; upstream: {run.upstream!r}"[:2000]
    )


def assert_unambiguous(run: Run) -> None:
    """Strict and lenient readers frame every upstream connection's bytes the same way, and
    each request has at most one framing field."""
    for data in run.upstream:
        strict, strict_partial, err = strict_requests(data)
        assert not err, f"{run.proxy} sent bytes strict llhttp refuses ({err}): {data[:600]!r}"
        lenient, rest, lerr = lenient_requests(data)
        assert not lerr, (
            f"{run.proxy} sent bytes the lenient reader refuses ({lerr}): {data[:600]!r}"
        )
        assert [m.key() for m in strict] == [m.key() for m in lenient], (
            f"{run.proxy}: strict and lenient readers disagree on {data[:800]!r}:\n"
            f"strict  {[m.key() for m in strict]!r}\nlenient {[m.key() for m in lenient]!r}"
        )
        assert strict_partial == bool(rest.strip(b"\r\n")), (
            f"{run.proxy}: readers disagree on whether a request is left incomplete "
            f"(strict {strict_partial}, lenient rest {rest[:200]!r})"
        )
        for m in lenient:
            cls, tes = m.values("content-length"), m.values("transfer-encoding")
            assert not (cls and tes) and len(cls) <= 1 and len(tes) <= 1, m.fields
            if tes:
                assert codings(tes) == [b"chunked"], tes


def _closed_where_touched(run: Run) -> bool:
    return all(run.upstream_closed[i] for i in run.touched)


def assert_expectation(run: Run) -> None:
    vec = run.vec
    finals = run.attacker.finals(head=vec.raw.startswith(b"HEAD "))
    statuses = [int(m.status) for m in finals if m.status.isdigit()]
    where = (
        f"{vec.name} through {run.proxy}: answer {run.attacker.raw[:300]!r}, "
        f"upstream {[d[:300] for d in run.upstream]!r}"
    )
    if vec.expect == FORWARD:
        assert len(run.attacker_msgs) == vec.forwards, f"not forwarded as {vec.forwards}: {where}"
        assert statuses[:1] == [vec.answer], f"the backend's answer was not relayed: {where}"
        return
    if vec.expect == REFUSE:
        assert not run.touched, f"refused vector reached the backend: {where}"
        assert statuses[:1] and statuses[0] in vec.statuses or (not finals and run.attacker.eof), (
            f"not refused: {where}"
        )
        assert len(finals) <= 1, f"answered more than the refusal: {where}"
        assert run.attacker.eof, f"refused, but the connection stays open: {where}"
        if vec.prompt:
            t = run.attacker.first_at
            assert t is not None and t <= PROMPT_S, (
                f"not refused at once (first answer after {t}s, limit {PROMPT_S}s): {where}"
            )
        return
    if vec.expect == NO_REQUEST:
        assert not run.forwarded, f"a complete request reached the backend: {where}"
        assert _closed_where_touched(run), (
            f"a connection holding a partial request stays open: {where}"
        )
        return
    assert vec.expect == EITHER
    if run.forwarded:
        # all of it forwarded, or the requests before a refused one: their answers, then the
        # refusal, and the connection closed
        n = len(run.attacker_msgs)
        assert n == vec.forwards or (
            n < vec.forwards
            and len(statuses) == n + 1
            and statuses[-1] in vec.statuses
            and run.attacker.eof
        ), where
    else:
        assert _closed_where_touched(run), (
            f"a connection holding a partial request stays open: {where}"
        )


async def _sticky_run(vec: RequestVector, proxy, recorder) -> Run:
    if vec.name not in _STICKY_RUNS:
        port = await _stickyproxy(proxy, recorder)
        _STICKY_RUNS[vec.name] = await run_request(
            port, "stickyproxy", vec, recorder, module_scoped=False
        )
    return _STICKY_RUNS[vec.name]


_IDS = [v.name for v in REQUEST_VECTORS]


@pytest.mark.slow
@pytest.mark.parametrize("vec", REQUEST_VECTORS, ids=_IDS)
async def test_request_vector_through_stickyproxy(vec: RequestVector, proxy, recorder):
    _STICKY_RUNS.pop(vec.name, None)
    run = await _sticky_run(vec, proxy, recorder)
    assert_victim_served(run)
    assert_unambiguous(run)
    assert_expectation(run)


@pytest.mark.slow
@pytest.mark.parametrize("vec", REQUEST_VECTORS, ids=_IDS)
async def test_request_vector_against_nginx_and_haproxy(vec: RequestVector, proxy, recorder, peers):
    _need_peers(peers)
    sticky = await _sticky_run(vec, proxy, recorder)
    runs = {
        name: await run_request(p.port, name, vec, recorder, module_scoped=True)
        for name, p in peers.items()
    }
    both_refuse = not any(r.forwarded for r in runs.values())
    both_forward = all(r.forwarded for r in runs.values())
    detail = {name: r.summary() for name, r in [("stickyproxy", sticky), *runs.items()]}
    assert not (both_refuse and sticky.forwarded), (
        f"stickyproxy forwards {vec.name!r}, which NGINX and HAProxy both refuse: {detail}"
    )
    if not any(r.touched for r in runs.values()):
        assert not sticky.touched, (
            f"stickyproxy sends a backend bytes of {vec.name!r}, of which NGINX and HAProxy "
            f"send none: {detail}"
        )
    # stricter: stickyproxy forwards fewer of the vector's requests than either peer does
    # (none of one, or the second of two pipelined ones)
    counts = {name: len(r.attacker_msgs) for name, r in [("stickyproxy", sticky), *runs.items()]}
    stricter = both_forward and counts["stickyproxy"] < min(counts["nginx"], counts["haproxy"])
    listed = vec.name in KNOWN_STRICTER
    assert stricter == listed, (
        f"KNOWN_STRICTER is out of date for {vec.name!r}: complete requests forwarded "
        f"{counts}; {'add it with the reason' if stricter else 'remove it'}: {detail}"
    )


async def test_the_victim_reuses_the_pooled_upstream_connection(proxy, recorder, peers):
    """The premise of every vector: through each proxy the warm-up, the vector and the
    victim share one upstream connection when nothing forbids it (so a vector that leaves
    a connection out of step would hand it to the victim)."""
    plain = next(v for v in REQUEST_VECTORS if v.name == "http-1.1")
    targets = [("stickyproxy", await _stickyproxy(proxy, recorder), False)]
    if peers is not None:
        targets += [(name, p.port, True) for name, p in peers.items()]
    for name, port, module_scoped in targets:
        run = await run_request(port, name, plain, recorder, module_scoped=module_scoped)
        assert_victim_served(run)
        assert len(run.upstream) == 1, f"{name} opened {len(run.upstream)} upstream connections"
        msgs, _, _ = lenient_requests(run.upstream[0])
        assert len(msgs) == 3, f"{name}: {run.upstream[0]!r}"


def test_corpus_is_well_formed():
    names = [v.name for v in REQUEST_VECTORS]
    assert len(names) == len(set(names)), "duplicate vector names"
    assert set(KNOWN_STRICTER) <= set(names), set(KNOWN_STRICTER) - set(names)
    for name, reason in KNOWN_STRICTER.items():
        assert len(reason) > 20, f"{name}: give the reason"
    by_name = {v.name: v for v in REQUEST_VECTORS}
    for name in KNOWN_STRICTER:
        # a vector stickyproxy is known to refuse cannot be one it must forward
        assert by_name[name].expect in (REFUSE, EITHER, NO_REQUEST), name
    rnames = [v.name for v in RESPONSE_VECTORS]
    assert len(rnames) == len(set(rnames))
    for v in REQUEST_VECTORS + RESPONSE_VECTORS:
        assert "RFC" in v.why, f"{v.name}: cite the rule"


# ---------------------------------------------------------------------------------------
# response vectors


@dataclass
class RespRun:
    proxy: str
    vec: ResponseVector
    nonce: str
    client: Conn
    victim: Conn

    def summary(self) -> dict:
        head = self.vec.method == "HEAD"
        f = self.client.finals(head=head)
        return {
            "response": self.vec.name,
            "proxy": self.proxy,
            "status_line": f[0].start_line.decode("latin-1") if f else None,
            "te": [b.decode("latin-1") for b in f[0].values("transfer-encoding")] if f else None,
            "cl": [b.decode("latin-1") for b in f[0].values("content-length")] if f else None,
            "body": f[0].body[:60].decode("latin-1") if f else None,
            "closed": self.client.eof,
            "raw": self.client.raw[:300].decode("latin-1"),
        }


async def run_response(
    port: int, proxy: str, vec: ResponseVector, recorder: Recorder, *, module_scoped: bool
) -> RespRun:
    recorder.mode = "echo"
    recorder.raw_response = None
    nonce = secrets.token_hex(6)
    try:
        await _warm(port, nonce)
        recorder.raw_response = vec.raw
        recorder.raw_close = vec.close
        client = await Conn.open(port)
        client.send(
            f"{vec.method} /resp/{vec.name} HTTP/1.1\r\nHost: shop.example\r\n"
            f"X-User-Id: attacker\r\n\r\n".encode()
        )
        await client.read(1, VICTIM_WAIT, head=vec.method == "HEAD")
        victim = await Conn.open(port)
        victim.send(victim_request(nonce))
        await victim.read(1, VICTIM_WAIT)
        client.close()
        victim.close()
        await _quiet(recorder, proxy)
    finally:
        recorder.raw_response = None
        await _release(recorder, proxy, module_scoped)
    run = RespRun(proxy, vec, nonce, client, victim)
    _report(run.summary())
    return run


def _payload(msg: Message) -> tuple[list[bytes], bytes]:
    """(content and transfer codings other than the framing chunked, the bytes inside)."""
    cs = codings(msg.values("transfer-encoding"))
    if msg.framing == "chunked":
        cs = cs[:-1]
    return cs, msg.body


def assert_response_relayed_correctly(run: RespRun) -> None:
    vec = run.vec
    head = vec.method == "HEAD"
    raw, eof = run.client.raw, run.client.eof
    where = f"{vec.name} through {run.proxy}: {raw[:400]!r}"
    strict, strict_partial, err = strict_responses(raw, eof=eof)
    lenient, rest, lerr = lenient_responses(raw, head=head, eof=eof)
    finals = final_responses(lenient)
    # every status line the client got is "HTTP/1.x SP 3DIGIT SP reason" (RFC 9112 §4)
    starts = [m.start for m in lenient] + ([len(raw) - len(rest)] if rest else [])
    for start in starts:
        assert _STATUS_LINE.match(raw[start:]), f"malformed status line: {where}"
    if not finals:
        # nothing complete: a cut connection, correct only where relaying is wrong or a
        # refusal is allowed
        assert eof, f"an incomplete response on a connection left open: {where}"
        assert vec.must_refuse or vec.refuse_ok, f"no complete response: {where}"
        return
    first = finals[0]
    refused = first.status in (b"502", b"503", b"504") and vec.status not in (b"502",)
    if refused:
        assert vec.must_refuse or vec.refuse_ok, f"refused a relayable response: {where}"
    else:
        assert not vec.must_refuse, f"relayed a response that must be refused: {where}"
    # unambiguous: strict llhttp reads what the lenient reader reads
    if not head:
        assert not err, f"strict llhttp refuses what the client received ({err}): {where}"
        strict_finals = [m for m in strict if not (m.status[:1] == b"1" and m.status != b"101")]
        assert [(m.status, m.body) for m in strict_finals[:1]] == [(first.status, first.body)], (
            f"strict and lenient readers disagree: {where}"
        )
    m = _STATUS_LINE.match(raw[first.start :])
    assert m, f"status line is not HTTP/1.x SP 3DIGIT SP reason: {where}"
    if refused:
        return
    assert m.group(1) == vec.status, f"status {m.group(1)!r}, sent {vec.status!r}: {where}"
    # what the backend sent, read the forgiving way, is what "correct" is measured against
    sent = final_responses(lenient_responses(vec.raw, head=head, eof=True)[0])[0]
    assert _payload(first) == _payload(sent), (
        f"codings or content changed: relayed {_payload(first)!r}, sent {_payload(sent)!r}: {where}"
    )
    cls, tes = first.values("content-length"), first.values("transfer-encoding")
    assert not (cls and tes) and len(cls) <= 1, f"ambiguous framing: {where}"


async def _sticky_resp(vec: ResponseVector, proxy, recorder) -> RespRun:
    if vec.name not in _STICKY_RESP:
        port = await _stickyproxy(proxy, recorder)
        _STICKY_RESP[vec.name] = await run_response(
            port, "stickyproxy", vec, recorder, module_scoped=False
        )
    return _STICKY_RESP[vec.name]


@pytest.mark.slow
@pytest.mark.parametrize("vec", RESPONSE_VECTORS, ids=[v.name for v in RESPONSE_VECTORS])
async def test_response_vector_through_stickyproxy(vec: ResponseVector, proxy, recorder):
    _STICKY_RESP.pop(vec.name, None)
    run = await _sticky_resp(vec, proxy, recorder)
    got = run.victim.finals()
    assert got and got[0].status == b"200" and got[0].body == victim_body(run.nonce), (
        f"the next client got someone else's answer after {vec.name!r}: {run.victim.raw[:300]!r}"
    )
    assert_response_relayed_correctly(run)


@pytest.mark.slow
@pytest.mark.parametrize("vec", RESPONSE_VECTORS, ids=[v.name for v in RESPONSE_VECTORS])
async def test_response_vector_against_nginx_and_haproxy(
    vec: ResponseVector, proxy, recorder, peers
):
    """A response neither NGINX nor HAProxy relays (each answers 502 or cuts the client
    off), stickyproxy does not relay either. What each relays is in the report
    (STICKYPROXY_DIFF_REPORT); stickyproxy's own relay is judged by the test above."""
    _need_peers(peers)
    sticky = await _sticky_resp(vec, proxy, recorder)
    runs = {
        name: await run_response(p.port, name, vec, recorder, module_scoped=True)
        for name, p in peers.items()
    }
    head = vec.method == "HEAD"

    def relayed(r: RespRun) -> bool:
        f = r.client.finals(head=head)
        return bool(f) and f[0].status not in (b"502", b"503", b"504")

    if not any(relayed(r) for r in runs.values()):
        assert not relayed(sticky), (
            f"stickyproxy relays {vec.name!r}, which NGINX and HAProxy both refuse: "
            f"{[r.summary() for r in (sticky, *runs.values())]}"
        )


# ---------------------------------------------------------------------------------------
# the readers themselves (pure)


@pytest.mark.parametrize(
    "raw, agree",
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", True),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\n\r\n",
            True,
        ),
        # the lenient reader sees chunked, strict llhttp refuses the pair: ambiguous
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n",
            False,
        ),
        # "xchunked" is not chunked for either; strict llhttp refuses it next to Content-Length
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\nContent-Length: 1\r\n\r\nx",
            False,
        ),
        # bare LF: lenient reads a request, strict refuses
        (b"GET / HTTP/1.1\nHost: a\n\n", False),
        # whitespace before the colon: lenient reads Content-Length 5
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\nhello", False),
        # CONNECT with a body: llhttp ends it at its head, lenient reads the body
        (b"CONNECT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", False),
        # extension methods (which llhttp does not know) are read through a stand-in
        (
            b"FOOBAR / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nokPURGE-X /y HTTP/1.1\r\n"
            b"Host: a\r\n\r\n",
            True,
        ),
        # a method that is not a token is not
        (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", False),
    ],
)
def test_strict_and_lenient_readers(raw, agree):
    strict, partial, err = strict_requests(raw)
    lenient, rest, lerr = lenient_requests(raw)
    same = (
        not err
        and not lerr
        and [m.key() for m in strict] == [m.key() for m in lenient]
        and partial == bool(rest)
    )
    assert same == agree, (strict, partial, err, lenient, rest, lerr)


def test_lenient_reader_frames_like_a_forgiving_server():
    msg, end = lenient_request(
        b"\r\nPOST  /x  HTTP/1.1\nHost: a\nX-A: 1\n 2\n"
        b"Transfer-Encoding: gzip, CHUNKED\n\n5 ;e\nhello\n0\n\nrest"
    )
    assert (msg.method, msg.target, msg.body) == (b"POST", b"/x", b"hello")
    assert msg.values("x-a") == [b"1 2"]
    msg2, _ = lenient_request(b"GET /\r\n")
    assert msg2.version == b"" and msg2.target == b"/"
    assert lenient_request(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhel") is None
    r, _ = lenient_response(
        b"HTTP/1.1 099 X\r\nTransfer-Encoding: chunked, gzip\r\n\r\nab", eof=True
    )
    assert (r.status, r.framing, r.body) == (b"099", "close", b"ab")
    assert lenient_response(b"HTTP/1.1 200 OK\r\n\r\nab", eof=False) is None


def test_peer_configurations_are_what_an_operator_would_write(tmp_path: Path):
    ng = peer_procs.nginx_config(tmp_path, 8080, 9090)
    for line in (
        "hash $http_x_user_id consistent;",
        "keepalive 16;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        f"server {LOOPBACK}:9090;",
    ):
        assert line in ng, line
    ha = peer_procs.haproxy_config(tmp_path, 8080, 9090)
    for line in (
        "balance hdr(X-User-Id)",
        "hash-type consistent",
        "http-reuse always",
        f"server app {LOOPBACK}:9090",
    ):
        assert line in ha, line


def _exchange(port: int, data: bytes, want: bytes, timeout: float = 2.0) -> bytes:
    """Send ``data`` on a new connection; read until ``want`` is in the answer, EOF or
    ``timeout``."""
    got = b""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(data)
        end = time.monotonic() + timeout
        while want not in got and time.monotonic() < end:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            got += chunk
    return got


def test_recorder_answers_as_each_mode_says():
    """The backend the vectors rely on: early answers come before the body, a CONNECT 2xx
    makes a tunnel, raw responses go to /resp/ targets, and every byte is kept."""
    rec = Recorder()
    try:
        port = rec.listen("t")
        head = b"POST /x HTTP/1.1\r\nHost: a\r\nX-Req-Id: r1\r\nContent-Length: 10\r\n\r\n"
        rec.mode = "echo"
        assert _exchange(port, head, b"echo", timeout=0.3) == b""  # waits for the body
        assert _exchange(port, head + b"0123456789", b"echo").endswith(b"echo POST /x r1")
        rec.mode = "early"
        assert _exchange(port, head, b"echo").endswith(b"echo POST /x r1")
        rec.mode = "early-close"
        got = _exchange(port, head, b"\r\n\r\necho POST /x r1")
        assert b"Connection: close" in got and got.endswith(b"echo POST /x r1")
        rec.mode = "connect-2xx"
        got = _exchange(port, b"CONNECT /t HTTP/1.1\r\nHost: a\r\n\r\nanything", b"tunnel-data")
        assert got.startswith(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        assert got.endswith(b"tunnel-data")
        rec.mode = "echo"
        rec.raw_response = b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n"
        assert _exchange(port, b"GET /resp/x HTTP/1.1\r\nHost: a\r\n\r\n", b"Odd").startswith(
            b"HTTP/1.1 099 Odd"
        )
        assert b"CONNECT /t HTTP/1.1\r\nHost: a\r\n\r\nanything" in b"".join(
            c.data() for c in rec.connections("t")
        )
    finally:
        rec.stop()


def test_released_upstream_connections_are_seen_in_proc_net_tcp():
    with socket.socket() as srv:
        srv.bind((LOOPBACK, 0))
        srv.listen()
        port = srv.getsockname()[1]
        cli = socket.create_connection((LOOPBACK, port))
        acc, _ = srv.accept()
        assert "01" in sockets_to(port)  # ESTABLISHED, towards port
        acc.close()
        assert not wait_released(port, deadline=0.2)  # the other end still holds it
        cli.close()
        assert wait_released(port, deadline=2.0)
