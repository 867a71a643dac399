"""Client-side limits and timeouts (DESIGN.md §3: "an explicit header-read deadline and
connection cap"): slowloris, idle keep-alive, the connection cap, a head that never ends,
and a request body that stalls. The proxy checks deadlines on a 100 ms tick."""

from __future__ import annotations

import asyncio
import time

from support.backends import respond_with
from support.http import http_request
from support.net import eventually

TICK = 0.1
SLACK = 0.4  # scheduling noise allowed on top of a deadline + one tick
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_slowloris_head_gets_408_within_client_header(raw_backend, proxy):
    be = await raw_backend("a", respond_with(OK))
    p = await proxy([be], {"timeouts": {"client_header": "500ms"}})
    c = await p.client()
    t0 = time.monotonic()
    c.send(b"GET / HTTP/1.1\r\nHost: h\r\n")

    async def trickle():
        for i in range(100):  # a field every 50 ms: never a whole head
            await asyncio.sleep(0.05)
            if c.writer.is_closing():
                return
            try:
                c.send(b"X-Slow-%d: 1\r\n" % i)
            except (ConnectionError, RuntimeError):
                return

    task = asyncio.create_task(trickle())
    r = await c.response(timeout=3)
    took = time.monotonic() - t0
    task.cancel()
    assert r.status == 408
    assert 0.5 <= took <= 0.5 + TICK + SLACK, took
    assert await c.closed()
    assert be.raw == b""


async def test_silent_connection_is_closed_after_client_header(raw_backend, proxy):
    be = await raw_backend("a", respond_with(OK))
    p = await proxy([be], {"timeouts": {"client_header": "300ms"}})
    c = await p.client()
    t0 = time.monotonic()
    data = await c.read_until_close(timeout=3)
    took = time.monotonic() - t0
    assert data in (b"",)  # nothing was asked, nothing to answer
    assert 0.3 <= took <= 0.3 + TICK + SLACK, took


async def test_second_request_head_also_has_a_deadline(raw_backend, proxy):
    be = await raw_backend("a", respond_with(OK))
    p = await proxy([be], {"timeouts": {"client_header": "400ms", "client_idle": "10s"}})
    c = await p.client()
    c.send(http_request("GET", "/", headers={"X-User-Id": "u"}))
    assert (await c.response()).status == 200
    t0 = time.monotonic()
    c.send(b"GET /second HTTP/1.1\r\nHost: h\r\n")  # and never the end of it
    r = await c.response(timeout=3)
    assert r.status == 408
    assert time.monotonic() - t0 <= 0.4 + TICK + SLACK


async def test_idle_keep_alive_connection_is_closed_after_client_idle(raw_backend, proxy):
    be = await raw_backend("a", respond_with(OK))
    p = await proxy([be], {"timeouts": {"client_idle": "300ms"}})
    c = await p.client()
    c.send(http_request("GET", "/", headers={"X-User-Id": "u"}))
    assert (await c.response()).status == 200
    t0 = time.monotonic()
    assert await c.closed(timeout=3)
    took = time.monotonic() - t0
    assert 0.3 - 0.05 <= took <= 0.3 + TICK + SLACK, took


async def test_a_slow_response_is_not_cut_by_the_idle_timer(raw_backend, proxy):
    async def slow(conn):
        while await conn.request() is not None:
            await asyncio.sleep(0.45)
            conn.send(OK)

    be = await raw_backend("a", slow)
    p = await proxy([be], {"timeouts": {"client_idle": "150ms", "client_header": "150ms"}})
    c = await p.client()
    c.send(http_request("GET", "/", headers={"X-User-Id": "u"}))
    r = await c.response(timeout=3)
    assert r.status == 200 and r.body == b"ok"


async def test_connection_cap_answers_503_to_the_extra_connection(raw_backend, proxy):
    be = await raw_backend("a", respond_with(OK))
    p = await proxy([be], {"limits": {"max_client_connections": 2}})
    c1, c2 = await p.client(), await p.client()
    await eventually(lambda: len(p.svc.proxy.clients) == 2, what="two connections accepted")
    c3 = await p.client()
    r = await c3.response()
    assert r.status == 503
    assert await c3.closed()
    # the first two are served normally
    for c in (c1, c2):
        c.send(http_request("GET", "/", headers={"X-User-Id": "u"}))
        assert (await c.response()).status == 200
    c1.close()
    await eventually(lambda: len(p.svc.proxy.clients) == 1, what="a slot is free again")
    c4 = await p.client()
    c4.send(http_request("GET", "/", headers={"X-User-Id": "u"}))
    assert (await c4.response()).status == 200
    c2.close()
    c4.close()


async def test_overlong_request_line_is_refused_while_it_streams(raw_backend, proxy):
    """The target is checked as it arrives: 414 long before a 1 MB line ends."""
    be = await raw_backend("a", respond_with(OK))
    p = await proxy(
        [be], {"limits": {"max_request_line": 1024}, "timeouts": {"client_header": "5s"}}
    )
    c = await p.client()
    t0 = time.monotonic()
    c.send(b"GET /" + b"a" * (1 << 20))  # no end of line, ever
    r = await c.response(timeout=3)
    assert r.status == 414
    assert time.monotonic() - t0 < 1.0


async def test_overlong_header_field_is_refused_while_it_streams(raw_backend, proxy):
    be = await raw_backend("a", respond_with(OK))
    p = await proxy(
        [be],
        {
            "limits": {"max_header_bytes": 4096, "max_request_line": 1024},
            "timeouts": {"client_header": "800ms"},
        },
    )
    c = await p.client()
    t0 = time.monotonic()
    c.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: ")
    for _ in range(32):
        c.send(b"b" * 65536)  # 2 MiB of one field value, no CRLF
    r = await c.response(timeout=5)
    assert r.status == 431
    assert time.monotonic() - t0 < 0.6


async def test_stalled_request_body_is_cut_after_body_idle_and_not_blamed_on_the_backend(
    raw_backend, proxy
):
    async def wait_for_body(conn):
        while await conn.request(timeout=30) is not None:
            conn.send(OK)

    be = await raw_backend("a", wait_for_body)
    p = await proxy([be], {"timeouts": {"body_idle": "300ms", "response": "1s"}})
    c = await p.client()
    t0 = time.monotonic()
    c.send(b"POST / HTTP/1.1\r\nHost: h\r\nX-User-Id: u\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    try:
        r = await c.response(timeout=5)
        status = r.status
    except AssertionError:
        status = None  # closed without an answer is acceptable
    took = time.monotonic() - t0
    assert took <= 0.3 + TICK + SLACK, f"the stalled body was cut only after {took:.2f}s"
    assert status in (None, 408)
