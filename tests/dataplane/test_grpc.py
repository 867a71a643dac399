"""gRPC through the proxy (docs/http2.md): grpcio clients over h2c to the proxy, grpcio
servers behind it as ``protocol = "h2"`` backends. Each call is routed by its
``x-user-id`` metadata like a request by its header; the four kinds of call work end to
end (trailers, streaming both ways); deadlines travel to the backend; the proxy's own
errors and a backend dying mid-call reach the client as gRPC statuses."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import trustme

from support.grpcbackend import SERVICE, GrpcBackend, GrpcProcess, channel, user
from support.net import eventually, free_port

H2C = {"listen": {"h2c": True}}
USERS = [f"user-{i}" for i in range(12)]


async def start_backends(n: int) -> list[GrpcBackend]:
    return [await GrpcBackend(f"g{i}").start() for i in range(n)]


@pytest.fixture
async def grpc_backends():
    started: list[GrpcBackend] = []

    async def start(n: int) -> list[GrpcBackend]:
        bs = await start_backends(n)
        started.extend(bs)
        return bs

    yield start
    for b in started:
        await b.stop()


def method(ch: grpc.aio.Channel, kind: str, name: str):  # type: ignore[no-untyped-def]
    return getattr(ch, kind)(f"/{SERVICE}/{name}")


async def test_each_kind_of_call_reaches_the_users_backend(grpc_backends, proxy):
    bs = await grpc_backends(3)
    p = await proxy(bs, H2C)
    async with channel(p.port) as ch:
        unary = method(ch, "unary_unary", "Unary")
        stream = method(ch, "unary_stream", "Stream")
        collect = method(ch, "stream_unary", "Collect")
        chat = method(ch, "stream_stream", "Chat")
        owners = set()
        for u in USERS:
            owner = p.pref(u)[0].encode()
            owners.add(owner)
            for _ in range(3):  # the same user, the same backend, call after call
                assert await unary(b"hi", metadata=user(u), timeout=5) == owner + b":hi"
            got = [m async for m in stream(b"3", metadata=user(u), timeout=5)]
            assert got == [owner + b":0", owner + b":1", owner + b":2"]

            async def parts():  # type: ignore[no-untyped-def]
                for x in (b"a", b"b", b"c"):
                    yield x

            assert await collect(parts(), metadata=user(u), timeout=5) == owner + b":a,b,c"
            call = chat(metadata=user(u), timeout=5)
            for x in (b"x", b"y"):  # each answer before the next message is sent
                await call.write(x)
                assert await call.read() == owner + b":" + x.upper()
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
        assert len(owners) > 1  # the users spread: routing is by key, not to one backend


async def test_backend_status_and_trailers_pass_through(grpc_backends, proxy):
    (b,) = await grpc_backends(1)
    p = await proxy([b], H2C)
    async with channel(p.port) as ch:
        call = method(ch, "unary_unary", "Nope")(b"", metadata=user("a"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        # the backend's own status (in its trailers-only response), not the proxy's
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_deadline_reaches_the_backend(grpc_backends, proxy):
    (b,) = await grpc_backends(1)
    p = await proxy([b], H2C)
    async with channel(p.port) as ch:
        slow = method(ch, "unary_unary", "Slow")
        seen = await slow(b"0", metadata=user("a"), timeout=2.0)
        left = float(seen.split(b":")[1])
        assert 0 < left <= 2.0  # grpc-timeout was forwarded: the backend saw the deadline
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await slow(b"3", metadata=user("a"), timeout=0.3)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_proxy_timeout_is_deadline_exceeded(grpc_backends, proxy):
    (b,) = await grpc_backends(1)
    p = await proxy([b], {**H2C, "timeouts": {"response": "0.3s"}})
    async with channel(p.port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await method(ch, "unary_unary", "Slow")(b"2", metadata=user("a"), timeout=5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not answer in time" in (e.value.details() or "")


async def test_no_backend_is_unavailable_not_an_http_error(proxy):
    dead = [GrpcBackend("g0", port=free_port()), GrpcBackend("g1", port=free_port())]
    p = await proxy(dead, H2C)
    async with channel(p.port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await method(ch, "unary_unary", "Unary")(b"", metadata=user("a"), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    details = e.value.details() or ""
    # the proxy's reason, sent as grpc-message (not "Received http2 header with status")
    assert "unreachable" in details or "no backend available" in details, details


async def test_dead_owner_fails_over_before_anything_is_sent(grpc_backends, proxy):
    bs = await grpc_backends(2)
    p = await proxy(bs, H2C)
    u = next(u for u in USERS if p.pref(u)[0] == "g0")
    await bs[0].stop()
    async with channel(p.port) as ch:
        # a refused connect sent nothing: even a non-idempotent call goes to the next
        assert await method(ch, "unary_unary", "Unary")(b"x", metadata=user(u), timeout=5) == (
            b"g1:x"
        )


async def test_backend_killed_mid_call_gives_a_grpc_status(proxy):
    procs = [GrpcProcess.spawn(f"g{i}", free_port()) for i in range(2)]
    try:
        p = await proxy(procs, H2C)
        u = USERS[0]
        owner = p.pref(u)[0]
        async with channel(p.port) as ch:
            call = method(ch, "unary_stream", "Stream")(b"1:hold", metadata=user(u), timeout=10)
            assert await call.read() == owner.encode() + b":0"
            next(x for x in procs if x.id == owner).kill()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call.read()
            # a status the client can act on, not a bare stream reset (INTERNAL)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
            assert "backend failed" in (e.value.details() or "")
            # the next call of that user fails over to the survivor
            other = next(x for x in procs if x.id != owner).id.encode()

            async def next_call() -> bytes:
                try:
                    return await method(ch, "unary_unary", "Unary")(
                        b"y", metadata=user(u), timeout=5
                    )
                except grpc.aio.AioRpcError:
                    return b""

            got = b""

            async def succeeded() -> bool:
                nonlocal got
                got = await next_call()
                return bool(got)

            deadline = asyncio.get_running_loop().time() + 10
            while not await succeeded():
                assert asyncio.get_running_loop().time() < deadline
            assert got == other + b":y"
    finally:
        for x in procs:
            x.kill()


async def test_grpc_health_check_marks_a_not_serving_backend_down(grpc_backends, proxy):
    bs = await grpc_backends(2)
    health = {
        "enabled": True,
        "kind": "grpc",
        "interval": "0.1s",
        "timeout": "0.1s",
        "rise": 1,
        "fall": 1,
    }
    p = await proxy(bs, {**H2C, "health": health})
    states = p.svc.table.states
    await eventually(lambda: states["g0"].healthy and states["g1"].healthy)
    bs[1].set_serving(False)
    await eventually(lambda: not states["g1"].healthy, what="g1 marked down")
    assert "NOT_SERVING" in states["g1"].reason
    u = next(u for u in USERS if p.pref(u)[0] == "g1")
    async with channel(p.port) as ch:
        assert await method(ch, "unary_unary", "Unary")(b"z", metadata=user(u), timeout=5) == (
            b"g0:z"
        )
    bs[1].set_serving(True)
    await eventually(lambda: states["g1"].healthy, what="g1 back up")


async def test_calls_over_tls_by_alpn(grpc_backends, proxy, tmp_path):
    """gRPC's usual deployment: TLS to the proxy (ALPN h2), h2c to the backends."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "leaf.crt", tmp_path / "leaf.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    bs = await grpc_backends(2)
    tls = {"cert": str(cert), "key": str(key), "alpn": ["h2", "http/1.1"]}
    p = await proxy(bs, {"listen.tls": tls})
    creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{p.port}", creds, options=(("grpc.ssl_target_name_override", "localhost"),)
    ) as ch:
        for u in USERS[:6]:
            owner = p.pref(u)[0].encode()
            got = await method(ch, "unary_unary", "Unary")(b"t", metadata=user(u), timeout=5)
            assert got == owner + b":t"
