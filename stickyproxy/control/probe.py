"""One active health check: an HTTP/1.1 GET on a new connection, its status read, closed.

Exactly one attempt per check (a client library that re-sends an idempotent request whose
connection dropped would count a backend that drops every other connection as healthy),
a new connection each time (a check must see what a new connection to the backend sees),
and one deadline over connect, send and the response head. The response is parsed by
llhttp, like the data plane's; the body is not read.
"""

from __future__ import annotations

import asyncio
from ssl import SSLContext, SSLError
from typing import Final

from httptools import HttpParserError, HttpResponseParser

from ..discovery.resolver import HostResolver
from ..tls import describe_verify_error

USER_AGENT: Final = b"stickyproxy-health"
# A response head longer than this fails the check (a health endpoint answers briefly).
MAX_HEAD: Final = 64 * 1024


class ProbeFailed(Exception):
    """The check got no usable answer; the message says why, for the backend's reason."""


class _Head:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def on_headers_complete(self) -> None:
        self.done = True


async def probe(
    host: str,
    port: int,
    path: str,
    timeout: float,
    resolver: HostResolver | None = None,
    ssl: SSLContext | None = None,
    server_hostname: str | None = None,
) -> int:
    """The status of ``GET path`` on ``host:port``; ProbeFailed when there is none. A host
    name is looked up through ``resolver`` (cached; a slow DNS server then delays only the
    checks of hosts it has never answered for), inside the same deadline."""
    try:
        async with asyncio.timeout(timeout):
            address = host
            if resolver is not None:
                address = (resolver.cached(host) or await resolver.resolve(host))[0]
            reader, writer = await asyncio.open_connection(
                address, port, ssl=ssl, server_hostname=server_hostname if ssl else None
            )
            try:
                authority = f"[{host}]" if ":" in host else host
                writer.write(
                    b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: %s\r\n"
                    b"Connection: close\r\n\r\n"
                    % (path.encode("ascii"), authority.encode("idna"), port, USER_AGENT)
                )
                head = _Head()
                parser = HttpResponseParser(head)
                seen = 0
                while not head.done:
                    data = await reader.read(16384)
                    if not data:
                        raise ProbeFailed("connection closed before a response")
                    seen += len(data)
                    if seen > MAX_HEAD:
                        raise ProbeFailed("response head too long")
                    parser.feed_data(data)
                return parser.get_status_code()
            finally:
                writer.transport.abort()
    except HttpParserError as e:
        raise ProbeFailed(f"malformed response: {e}") from None
    except SSLError as e:  # before OSError, which it is
        raise ProbeFailed(describe_verify_error(e)) from None
    except TimeoutError:
        raise ProbeFailed(f"no answer within {timeout:g}s") from None
    except ConnectionRefusedError:
        raise ProbeFailed("connection refused") from None
    except OSError as e:
        raise ProbeFailed(e.strerror or type(e).__name__) from None
