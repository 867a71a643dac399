"""ASGI integration (Starlette, FastAPI, any ASGI app), with no framework import.

The user's mutable context is ``scope["sticky_ctx"]`` and ``scope["state"]["ctx"]`` (Starlette:
``request.state.ctx``); the proxy's headers are ``scope["sticky"]`` / ``scope["state"]["sticky"]``.
The response is held back until the context is saved, so an acknowledged change is in Redis
(write-through) and a conflicting run can be replaced by a rerun; responses are therefore
buffered whole (do not route long streams through it: exclude them with ``skip``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import ConflictError, MissingUserKey, RecordMismatch, StoreUnavailable
from .headers import (
    DEFAULT_HEADERS,
    DEFAULT_KEY_HEADER,
    StickyHeaders,
    StickyInfo,
    user_key_problem,
)
from .metrics import CONTENT_TYPE
from .retry import should_rerun_handler
from .store import ContextStore

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SCOPE_CONTEXT_KEY = "sticky_ctx"
SCOPE_INFO_KEY = "sticky"
# the header names the middleware reads, so that errors name the configured key header
SCOPE_NAMES_KEY = "sticky_names"
STATE_CONTEXT_KEY = "ctx"
STATE_INFO_KEY = "sticky"
# Runs of an idempotent handler whose save keeps conflicting, before the client gets a 409.
DEFAULT_MAX_ATTEMPTS = 3
# Seconds a client is told to wait after a 503 (the breaker's reset is of this order).
RETRY_AFTER = b"1"


def sticky_context(scope_or_request: Any) -> dict[str, Any]:
    """The user's mutable context from an ASGI scope or a framework request (anything with a
    ``.scope``). Raises :class:`MissingUserKey`, which the middleware answers with 400."""
    scope = getattr(scope_or_request, "scope", scope_or_request)
    context: dict[str, Any] | None = scope.get(SCOPE_CONTEXT_KEY)
    if context is None:
        names = scope.get(SCOPE_NAMES_KEY)
        raise MissingUserKey(DEFAULT_KEY_HEADER if names is None else names.key)
    return context


async def _plain(
    send: Send, status: int, reason: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = (reason + "\n").encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _HeldResponse:
    """Collects an app's response messages so they are sent only after the context is saved."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def send(self, message: Message) -> None:
        self.messages.append(message)

    async def release(self, send: Send) -> None:
        for message in self.messages:
            await send(message)


class _ReplayableReceive:
    """Records request messages so a rerun of the app reads the same body again."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._seen: list[Message] = []

    def reader(self) -> Receive:
        replay = list(self._seen)

        async def receive() -> Message:
            if replay:
                return replay.pop(0)
            message = await self._receive()
            self._seen.append(message)
            return message

        return receive


class StickyContextMiddleware:
    """Pure ASGI middleware around ``app``; see the module docstring and :func:`sticky_context`.

    No user key: 400 if ``require(scope)`` is true or the app raised :class:`MissingUserKey`.
    Conflict on save: GET/HEAD/OPTIONS/TRACE/PUT/DELETE are run again (``max_attempts`` runs in all),
    others get 409. Store unavailable: 503. Requests for which ``skip(scope)`` is true, and
    non-HTTP scopes, pass straight through.
    """

    def __init__(
        self,
        app: ASGIApp,
        store: ContextStore,
        *,
        headers: StickyHeaders = DEFAULT_HEADERS,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        require: Callable[[Scope], bool] | None = None,
        skip: Callable[[Scope], bool] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.app = app
        self.store = store
        self.headers = headers
        self.max_attempts = max_attempts
        self.require = require
        self.skip = skip
        self._names = {
            name.lower().encode("latin-1"): name
            for name in (headers.key, headers.backend, headers.route, headers.ring)
        }

    def _info(self, scope: Scope) -> StickyInfo:
        found: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", ()):
            name = self._names.get(bytes(raw_name).lower())
            if name is not None and name not in found:
                found[name] = bytes(raw_value).decode("latin-1")
        return StickyInfo.from_lookup(found.get, self.headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.skip is not None and self.skip(scope)):
            await self.app(scope, receive, send)
            return
        info = self._info(scope)
        state = scope.setdefault("state", {})
        scope[SCOPE_INFO_KEY] = state[STATE_INFO_KEY] = info
        scope[SCOPE_NAMES_KEY] = self.headers
        missing = f"missing {self.headers.key} header"
        if info.user is None:
            if self.require is not None and self.require(scope):
                await _plain(send, 400, missing)
                return
            held = _HeldResponse()
            try:
                await self.app(scope, receive, held.send)
            except MissingUserKey:
                await _plain(send, 400, missing)
                return
            except BaseException:
                await held.release(send)
                raise
            await held.release(send)
            return
        problem = user_key_problem(info.user)
        if problem is not None:
            await _plain(send, 400, problem)
            return
        await self._with_context(info.user, scope, _ReplayableReceive(receive), send)

    async def _with_context(
        self, user: str, scope: Scope, request: _ReplayableReceive, send: Send
    ) -> None:
        method = str(scope.get("method", "GET"))
        attempt = 0
        while True:
            attempt += 1
            held = _HeldResponse()
            try:
                async with self.store.edit(user) as context:
                    scope[SCOPE_CONTEXT_KEY] = scope["state"][STATE_CONTEXT_KEY] = context
                    await self.app(scope, request.reader(), held.send)
            except ConflictError:
                if should_rerun_handler(method, attempt, self.max_attempts):
                    continue
                await _plain(
                    send, 409, "user context changed on another instance; retry the request"
                )
                return
            except StoreUnavailable:
                await _plain(
                    send, 503, "user context store unavailable", [(b"retry-after", RETRY_AFTER)]
                )
                return
            except RecordMismatch:
                await _plain(send, 500, "user context record is inconsistent")
                return
            except BaseException:
                await held.release(send)
                raise
            await held.release(send)
            return


def metrics_app(store: ContextStore) -> ASGIApp:
    """A tiny ASGI app serving the store's metrics (mount it at ``/metrics``)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = store.metrics.render()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", CONTENT_TYPE.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app
