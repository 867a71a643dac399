"""Backends for the streaming benchmarks (and for the data plane when nginx is absent).

One process listening on several loopback ports, one backend id per port:

    GET  /         200 "ok\\n" with X-Backend: <id>   (what bench/probe.py checks)
    POST /upload   reads the whole body, then 200 "<bytes read>\\n"
    GET  /ws       WebSocket echo: every message is sent back as it came

    python -m bench.backend --ports 9001,9002,9003 [--ids app-1,app-2,app-3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from aiohttp import WSMsgType, web

from .procs import LOOPBACK
from .targets import BACKEND_HEADER, BACKEND_IDS, BODY

UPLOAD_PATH = "/upload"
WS_PATH = "/ws"
READ_CHUNK = 1 << 20
ID_KEY: web.AppKey[str] = web.AppKey("backend_id", str)


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=BODY, headers={BACKEND_HEADER: request.app[ID_KEY]})


async def upload(request: web.Request) -> web.Response:
    received = 0
    while chunk := await request.content.read(READ_CHUNK):
        received += len(chunk)
    return web.Response(text=f"{received}\n", headers={BACKEND_HEADER: request.app[ID_KEY]})


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(autoping=True)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


def make_app(backend_id: str) -> web.Application:
    app = web.Application()
    app[ID_KEY] = backend_id
    app.router.add_get("/", hello)
    app.router.add_post(UPLOAD_PATH, upload)
    app.router.add_get(WS_PATH, echo)
    return app


async def serve(ports: Sequence[int], ids: Sequence[str]) -> None:
    runners = []
    for backend_id, port in zip(ids, ports):
        runner = web.AppRunner(make_app(backend_id), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, LOOPBACK, port).start()
        runners.append(runner)
    try:
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def backend_argv(ports: Sequence[int], ids: Sequence[str] = BACKEND_IDS) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.backend",
        "--ports",
        ",".join(map(str, ports)),
        "--ids",
        ",".join(ids[: len(ports)]),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ports", required=True, help="comma-separated loopback ports")
    p.add_argument("--ids", default=",".join(BACKEND_IDS), help="one backend id per port")
    a = p.parse_args(argv)
    ports = [int(x) for x in a.ports.split(",")]
    ids = a.ids.split(",")
    if len(ids) < len(ports):
        p.error("need one id per port")
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(ports, ids))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
