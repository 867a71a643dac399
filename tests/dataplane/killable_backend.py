"""A backend process for the kill drill: ``python killable_backend.py ID PORT LOG``.

Answers every request with 200 and ``<ID> <METHOD> <PATH>``; ``/slow`` waits 2 s first. Each
request's arrival is appended to LOG (flushed) before anything else, so a test can count
attempts even at a backend it killed."""

import asyncio
import os
import sys

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    with open(LOG, "a") as f:
        f.write(f"{request.method} {request.path} {request.headers.get('X-User-Id', '')}\n")
        f.flush()
    if request.path == "/slow":
        await asyncio.sleep(2)
    return web.Response(text=f"{BID} {request.method} {request.path}")


if __name__ == "__main__":
    BID, PORT, LOG = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    print(f"ready {os.getpid()}", flush=True)
    web.run_app(app, host="127.0.0.1", port=PORT, print=None, access_log=None, handle_signals=True)
