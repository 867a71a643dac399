"""Connection reuse on both hops, and keeping the two parsers in step: upstream keep-alive,
malformed or over-long upstream responses, pipelining (RFC 9112 §9.3.2)."""

from __future__ import annotations

import asyncio

import pytest

from support.backends import respond_with
from support.http import IncompleteResponse, http_request
from support.net import eventually

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_upstream_connections_are_reused(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a])
    for i in range(40):  # a new client connection each time
        r = await p.get(f"/n{i}", user=f"user-{i}")
        assert r.status == 200
    c = await p.client()
    for i in range(40):  # and one keep-alive client connection
        c.send(http_request("GET", f"/k{i}", headers={"X-User-Id": "u"}))
        assert (await c.response()).status == 200
    c.close()
    assert len(a.requests) == 80
    assert len(a.connections()) <= 2, a.connections()


async def test_malformed_response_head_gives_502_and_a_fresh_upstream_connection(
    raw_backend, proxy
):
    served = []

    async def script(conn):
        while (req := await conn.request()) is not None:
            served.append(req.target)
            if req.target == "/bad":
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\n\r\nhello")
            else:
                conn.send(OK)

    be = await raw_backend("a", script)
    p = await proxy([be])
    assert (await p.get("/warm", user="u")).status == 200  # a pooled connection exists
    r = await p.get("/bad", user="u")
    assert r.status == 502
    assert b"malformed" in r.body
    r = await p.get("/after", user="u")
    assert r.status == 200 and r.body == b"ok"
    assert served == ["/warm", "/bad", "/after"]  # /bad was not sent twice
    # the connection that carried the bad response was closed, not reused
    assert [len(c.requests) for c in be.connections] == [2, 1]
    assert be.connections[0].eof


async def test_malformed_chunk_mid_body_aborts_the_client_and_the_connection(raw_backend, proxy):
    async def script(conn):
        while (req := await conn.request()) is not None:
            if req.target == "/bad":
                conn.send(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\nZZ\r\nnot a chunk\r\n"
                )
            else:
                conn.send(OK)

    be = await raw_backend("a", script)
    p = await proxy([be])
    c = await p.client()
    c.send(http_request("GET", "/bad", headers={"X-User-Id": "u"}))
    try:
        r = await c.response()
    except IncompleteResponse:
        pass  # the client connection was cut: correct
    else:
        raise AssertionError(f"a truncated body was passed off as complete: {r}")
    c.close()
    r = await p.get("/after", user="u")
    assert r.status == 200 and r.body == b"ok"
    assert len(be.connections) == 2


async def test_extra_bytes_after_a_response_are_never_read_as_the_next_one(raw_backend, proxy):
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nEVIL!!"

    async def script(conn):
        while (req := await conn.request()) is not None:
            if req.target == "/first":
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst" + smuggled)
            else:
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")

    be = await raw_backend("a", script)
    p = await proxy([be])
    c = await p.client()
    c.send(http_request("GET", "/first", headers={"X-User-Id": "u"}))
    r1 = await c.response()
    assert r1.body == b"first"
    c.send(http_request("GET", "/second", headers={"X-User-Id": "u"}))
    r2 = await c.response()
    assert r2.body == b"second"
    c.close()
    assert len(be.connections) == 2  # the out-of-step connection was dropped


async def test_response_longer_than_its_content_length(raw_backend, proxy):
    async def script(conn):
        while (req := await conn.request()) is not None:
            if req.target == "/long":
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdefgh")
            else:
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")

    be = await raw_backend("a", script)
    p = await proxy([be])
    c = await p.client()
    c.send(http_request("GET", "/long", headers={"X-User-Id": "u"}))
    r = await c.response()
    assert r.body == b"abc"
    c.send(http_request("GET", "/next", headers={"X-User-Id": "u"}))
    r = await c.response()
    assert r.body == b"next"
    assert await c.is_idle_open(0.2)  # nothing stray reached the client
    c.close()
    assert len(be.connections) == 2


async def test_idle_upstream_connection_closed_by_backend_is_not_used(raw_backend, proxy):
    """The backend closes its keep-alive connection after each response (without saying so):
    the proxy must notice (or retry a GET on a fresh connection), never fail the request."""

    async def script(conn):
        req = await conn.request()
        if req is not None:
            conn.send(OK)
            await conn.drain()
        conn.close()

    be = await raw_backend("a", script)
    p = await proxy([be])
    for i in range(10):
        r = await p.get(f"/{i}", user="u")
        assert r.status == 200
    assert len(be.connections) >= 10


@pytest.mark.slow
async def test_one_thousand_pipelined_requests_are_answered_in_order(backends, proxy):
    bs = await backends("a", "b", "c")
    p = await proxy(bs)
    n = 1000
    c = await p.client()
    c.send(
        b"".join(
            http_request(
                "GET", f"/item/{i}", headers={"X-User-Id": f"user-{i % 37}", "X-Req-Id": str(i)}
            )
            for i in range(n)
        )
    )
    for i in range(n):
        r = await c.response()
        assert r.status == 200
        assert r.one("X-Req-Id") == str(i)
        assert r.body.endswith(f"GET /item/{i}\n".encode())
    c.close()
    assert sum(len(b.requests) for b in bs) == n
    for b in bs:
        for rec in b.requests:
            assert rec.backend == p.pref(rec.one("X-User-Id"))[0]


async def test_half_closed_client_still_gets_every_pipelined_response(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a], {"limits": {"max_pipeline": 4}})
    n = 20
    c = await p.client()
    c.send(
        b"".join(
            http_request("GET", f"/{i}", headers={"X-User-Id": "u", "X-Req-Id": str(i)})
            for i in range(n)
        )
    )
    c.shutdown_write()
    for i in range(n):
        r = await c.response()
        assert r.one("X-Req-Id") == str(i)
    assert await c.closed()  # then the proxy closes its side


async def test_pipelined_requests_are_read_only_as_fast_as_they_are_answered(raw_backend, proxy):
    """max_pipeline bounds what is parsed ahead: with a stalled backend, the proxy forwards
    one request and does not queue the whole burst."""
    release = asyncio.Event()

    async def script(conn):
        while (req := await conn.request()) is not None:
            await release.wait()
            conn.send(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                % (len(req.target), req.target.encode())
            )

    be = await raw_backend("a", script)
    p = await proxy([be], {"limits": {"max_pipeline": 2}})
    c = await p.client()
    n = 200
    c.send(b"".join(http_request("GET", f"/{i}", headers={"X-User-Id": "u"}) for i in range(n)))
    await eventually(lambda: be.requests, what="the first request reached the backend")
    (client_proto,) = p.svc.proxy.clients
    await asyncio.sleep(0.2)  # a window in which nothing more may happen
    assert len(be.requests) == 1
    # queue bound: max_pipeline plus at most one parse slice of tiny requests
    assert len(client_proto.queue) <= 2 + 16 * 1024 // 40
    release.set()
    for i in range(n):
        r = await c.response()
        assert r.body == f"/{i}".encode()
    c.close()


async def test_connection_close_request_is_answered_then_closed(backends, proxy):
    (a,) = await backends("a")
    p = await proxy([a])
    c = await p.client()
    c.send(http_request("GET", "/", headers={"X-User-Id": "u", "Connection": "close"}))
    r = await c.response()
    assert r.status == 200 and r.wants_close
    assert await c.closed()
    # the proxy's own upstream connection is still kept for others
    assert (await p.get("/again", user="u")).status == 200
    assert len(a.connections()) == 1


async def test_backend_connection_close_does_not_close_the_client(raw_backend, proxy):
    be = await raw_backend(
        "a",
        respond_with(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", close=True
        ),
    )
    p = await proxy([be])
    c = await p.client()
    for i in range(3):
        c.send(http_request("GET", f"/{i}", headers={"X-User-Id": "u"}))
        r = await c.response()
        assert r.status == 200 and r.body == b"ok"
        assert not r.wants_close  # Connection is hop-by-hop
    c.close()
    assert len(be.connections) == 3


async def test_client_leaving_mid_request_releases_the_upstream_connection(raw_backend, proxy):
    async def slow(conn):
        while await conn.request(timeout=30) is not None:
            await asyncio.sleep(30)

    be = await raw_backend("a", slow)
    p = await proxy([be])
    c = await p.client()
    c.send(http_request("GET", "/", headers={"X-User-Id": "u"}))
    await eventually(lambda: be.requests, what="request forwarded")
    c.send_rst()
    await eventually(lambda: not p.svc.proxy.clients, what="client connection released")
    await eventually(
        lambda: all(
            conn.writer.transport.is_closing() or conn.reader.at_eof() for conn in be.connections
        ),
        what="upstream connection closed",
    )
    assert all(up.inflight == 0 for up in p.svc.proxy.upstreams.values())
