"""The active health check's probe (control/probe.py) against real listening sockets: what
counts as an answer, and that every failure is bounded and explained."""

import asyncio
import socket

import pytest

from stickyproxy.control.probe import MAX_HEAD, ProbeFailed, probe


async def serve(reply: bytes | None, *, close: bool = True, delay: float = 0.0):
    """A one-shot TCP server that answers every connection with ``reply`` (None: says
    nothing), records the request bytes it read, and closes."""
    seen: list[bytes] = []

    async def handle(reader, writer):
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        if delay:
            await asyncio.sleep(delay)
        if reply is not None:
            writer.write(reply)
            await writer.drain()
        if close:
            writer.close()
        else:
            await asyncio.sleep(3600)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


@pytest.mark.parametrize(
    "reply, status",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200),
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", 503),
        (b"HTTP/1.0 204 No Content\r\n\r\n", 204),
        # the body is never read: a huge or endless one does not matter
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 200),
    ],
)
async def test_the_status_is_the_answer(reply, status):
    server, port, seen = await serve(reply, close=False)
    async with server:
        assert await probe("127.0.0.1", port, "/healthz", 2.0) == status
    head = seen[0]
    assert head.startswith(b"GET /healthz HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:%d\r\n" % port in head
    assert b"\r\nUser-Agent: stickyproxy-health\r\n" in head


@pytest.mark.parametrize(
    "reply, why",
    [
        (b"", "connection closed before a response"),
        (b"HTTP/1.1 2000 Nope\r\n\r\n", "malformed response"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "malformed response"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", "response head too long"),
    ],
)
async def test_no_usable_answer_fails_with_a_reason(reply, why):
    server, port, _ = await serve(reply)
    async with server:
        with pytest.raises(ProbeFailed, match=why):
            await probe("127.0.0.1", port, "/", 2.0)


async def test_silence_is_bounded_by_the_timeout():
    server, port, _ = await serve(None, close=False)
    async with server:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ProbeFailed, match="no answer within 0.3s"):
            await probe("127.0.0.1", port, "/", 0.3)
        assert loop.time() - start < 2.0


async def test_a_refused_connection_says_so():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ProbeFailed, match="connection refused"):
        await probe("127.0.0.1", port, "/", 2.0)
