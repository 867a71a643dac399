"""Which user a request belongs to."""

from __future__ import annotations

from aiohttp import web

from stickyproxy.context.headers import DEFAULT_KEY_HEADER, user_key_problem

# Set by stickyproxy on every forwarded request (client copies are stripped by the proxy).
KEY_HEADER = DEFAULT_KEY_HEADER
# Stateless mode may sit behind any load balancer, which passes the client's own header.
DIRECT_HEADER = "X-User-Id"


def user_of(request: web.Request, *, stateless: bool) -> str | None:
    """The request's user key, or None; raises 400 for an unusable key."""
    user = request.headers.get(KEY_HEADER) or None
    if user is None and stateless:
        user = request.headers.get(DIRECT_HEADER) or None
    if user is not None:
        problem = user_key_problem(user)
        if problem is not None:
            raise web.HTTPBadRequest(text=problem + "\n")
    return user


def require_user(request: web.Request, *, stateless: bool) -> str:
    user = user_of(request, stateless=stateless)
    if user is None:
        raise web.HTTPBadRequest(text=f"missing {KEY_HEADER} header\n")
    return user
