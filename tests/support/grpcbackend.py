"""gRPC backends for tests: grpcio servers (grpc.aio) speaking raw bytes through generic
handlers (no generated code), in process or as a subprocess that can be killed.

Service ``test.Echo``, every answer naming the backend that gave it:
- ``Unary``: b"<id>:" + request
- ``Stream``: request b"N" -> N messages b"<id>:0" ... (server streaming); with b"N:hold"
  it sends one message and then waits until the call is cancelled (for killing mid-call)
- ``Collect``: the messages joined with b"," behind b"<id>:" (client streaming)
- ``Chat``: each message upper-cased behind b"<id>:" (bidirectional)
- ``Slow``: sleeps the request's seconds (b"0.5"), answers the deadline it saw
  (``time_remaining`` at arrival, b"none" without one)
- grpc.health.v1.Health/Check: SERVING, or NOT_SERVING after ``set_serving(False)``

Run as a script (``python -m support.grpcbackend ID PORT``) it serves on 127.0.0.1:PORT
and prints "ready" once it does.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

SERVICE = "test.Echo"
TESTS_DIR = Path(__file__).resolve().parent.parent


def _handlers(bid: str, state: dict[str, bool]) -> list[grpc.GenericRpcHandler]:
    tag = bid.encode() + b":"

    async def unary(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return tag + req

    async def stream(req: bytes, ctx: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        if req.endswith(b":hold"):
            yield tag + b"0"
            await asyncio.Event().wait()  # until the call (or the server) ends
        for i in range(int(req or b"3")):
            yield tag + b"%d" % i

    async def collect(it, ctx: grpc.aio.ServicerContext) -> bytes:  # type: ignore[no-untyped-def]
        parts = [m async for m in it]
        return tag + b",".join(parts)

    async def chat(it, ctx: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        async for m in it:
            yield tag + m.upper()

    async def slow(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        left = ctx.time_remaining()
        await asyncio.sleep(float(req or b"0"))
        return tag + (b"none" if left is None else b"%.3f" % left)

    async def check(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return b"\x08\x01" if state["serving"] else b"\x08\x02"

    echo = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Collect": grpc.stream_unary_rpc_method_handler(collect),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
        },
    )
    health = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )
    return [echo, health]


@dataclass
class GrpcBackend:
    """An in-process grpcio server; ``url``/``protocol`` make it a [[backends]] entry."""

    id: str
    port: int = 0
    server: grpc.aio.Server | None = None
    state: dict[str, bool] = field(default_factory=lambda: {"serving": True})
    protocol: str = "h2"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> GrpcBackend:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(_handlers(self.id, self.state))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()
        return self

    def set_serving(self, serving: bool) -> None:
        self.state["serving"] = serving

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
            self.server = None


@dataclass
class GrpcProcess:
    """A grpcio server in a subprocess of its own, to be killed mid-call."""

    id: str
    port: int
    proc: subprocess.Popen
    protocol: str = "h2"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def spawn(cls, bid: str, port: int, timeout: float = 20.0) -> GrpcProcess:
        env = dict(
            os.environ, PYTHONPATH=str(TESTS_DIR) + os.pathsep + os.environ.get("PYTHONPATH", "")
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "support.grpcbackend", bid, str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert proc.stdout is not None
        end = time.monotonic() + timeout
        line = proc.stdout.readline()  # "ready" once it serves (bounded by the server)
        if b"ready" not in line or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"gRPC backend {bid} did not start: {line!r}")
        return cls(bid, port, proc)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def channel(port: int) -> grpc.aio.Channel:
    """A gRPC channel to the proxy on ``port`` (h2c: HTTP/2 by prior knowledge)."""
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def user(name: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the user key (the proxy's default key header)."""
    return (("x-user-id", name),)


async def _serve(bid: str, port: int) -> None:
    b = await GrpcBackend(bid, port).start()
    print("ready", flush=True)
    assert b.server is not None
    await b.server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], int(sys.argv[2])))
