"""HTTP/1.x messages as bytes, and llhttp's reading of them.

``Message`` is one request or response as a reader framed it (bytes as sent);
``StrictCollector`` collects the messages llhttp (httptools, the parser the proxy itself
uses) reads from a stream fed to it. The scripted raw backends, the security suite's
re-parse of what a backend received and the differential suite's strict reader all use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Message:
    """One request or response as a reader framed it."""

    start_line: bytes
    method: bytes = b""  # requests
    target: bytes = b""
    version: bytes = b""  # b"" for an HTTP/0.9 request
    status: bytes = b""  # responses: the status digits as sent
    fields: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    framing: str = ""  # "none" | "length" | "chunked" | "close" | "upgrade"
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)  # the strict reader's
    length: int = 0  # the Content-Length a request head announced
    start: int = 0
    end: int = 0

    def values(self, name: str) -> list[bytes]:
        ln = name.lower().encode()
        return [v for n, v in self.fields if n.lower() == ln]

    def key(self) -> tuple[bytes, bytes, bytes]:
        """What two readers must agree on: method (or status), target and body."""
        return (self.method or self.status, self.target, self.body)


class StrictCollector:
    """Messages as llhttp reads them: ``parser_cls`` is httptools' request or response
    parser, fed with ``self.parser.feed_data``; ``done`` holds the complete ones."""

    def __init__(self, parser_cls) -> None:
        self.parser = parser_cls(self)
        self.done: list[Message] = []
        self.cur: Message | None = None
        self.in_head = False
        self.status = b""

    def on_message_begin(self) -> None:
        self.cur = Message(b"")
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        assert self.cur is not None
        self.cur.target += url

    def on_status(self, status: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.cur is not None
        (self.cur.fields if self.in_head else self.cur.trailers).append((name, value))

    def on_headers_complete(self) -> None:
        assert self.cur is not None
        self.in_head = False
        p = self.parser
        if hasattr(p, "get_method"):
            self.cur.method = p.get_method()
        else:
            self.cur.status = b"%03d" % p.get_status_code()
        self.cur.version = p.get_http_version().encode()

    def on_body(self, body: bytes) -> None:
        assert self.cur is not None
        self.cur.body += body

    def on_message_complete(self) -> None:
        assert self.cur is not None
        self.done.append(self.cur)
        self.cur = None
