"""`stickyproxy run --workers 2` as a subprocess with its admin API: a drain reaches every
worker, a reload is applied by every worker, /metrics sums the workers' counters, and a
killed worker is restarted while traffic continues."""

from __future__ import annotations

import os
import signal

import aiohttp
import pytest

from stickyproxy.config import loads
from support.config import build_toml, keys_where, ring_of
from support.health import user_requests
from support.http import Client, http_request
from support.metrics import Metrics
from support.net import eventually, free_port
from support.procs import alive, descendants, established_to, listeners, listening_on

pytestmark = pytest.mark.slow


def worker_pids(supervisor: int) -> list[int]:
    out = []
    for pid in descendants(supervisor):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"stickyproxy.control.workers" in cmd and alive(pid):
            out.append(pid)
    return sorted(out)


class Admin:
    def __init__(self, port: int):
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    async def call(self, method: str, path: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s,
            s.request(method, self.base + path) as r,
        ):
            return r.status, await r.text()

    async def metrics(self) -> Metrics:
        status, text = await self.call("GET", "/metrics")
        assert status == 200, text
        return Metrics(text)


async def one_request(port: int, user: str) -> tuple[int, str | None]:
    """One request on a new connection (so connections spread over the workers)."""
    c = await Client.connect(port)
    try:
        c.send(http_request("GET", "/w", headers={"X-User-Id": user, "Connection": "close"}))
        r = await c.response()
        return r.status, r.get("X-Backend")
    finally:
        c.close()


async def start_supervised(bs, proxy_process, settings=None):
    """``stickyproxy run --workers 2`` in front of ``bs`` with its admin API (``settings``:
    more config sections), once the admin API answers and both workers listen."""
    aport = free_port()
    pp = proxy_process(
        bs, {"admin": {"enabled": True, "port": aport}, **(settings or {})}, workers=2
    )
    await pp.wait_ready()
    admin = Admin(aport)

    async def admin_up():
        try:
            return (await admin.call("GET", "/readyz"))[0] == 200
        except aiohttp.ClientError:
            return False

    await eventually(admin_up, deadline=20, interval=0.05, what="admin API ready")
    await eventually(lambda: len(worker_pids(pp.pid)) == 2, what="two workers")
    await eventually(
        lambda: all(listening_on(w, pp.port) for w in worker_pids(pp.pid)),
        deadline=20,
        interval=0.05,
        what="both workers listening",
    )
    return pp, admin


async def start(backends, proxy_process, ids=("a", "b", "c")):
    bs = await backends(*ids)
    pp, admin = await start_supervised(bs, proxy_process)
    return bs, pp, admin


def ring_for(pp, text):
    return ring_of(loads(text, "x.toml"))


async def test_workers_metrics_sum_every_worker(backends, proxy_process):
    bs, pp, admin = await start(backends, proxy_process)
    before = await admin.metrics()
    n = 200
    users = [f"user-{i}" for i in range(50)]
    for i in range(n):
        status, _ = await one_request(pp.port, users[i % len(users)])
        assert status == 200
    # both workers served some of them (each keeps pooled connections to the backends)
    ports = {b.port for b in bs}
    pids = worker_pids(pp.pid)
    assert all(established_to(pid, ports) > 0 for pid in pids), {
        pid: established_to(pid, ports) for pid in pids
    }
    after = await admin.metrics()

    def delta(name, **labels):
        return after.total(name, **labels) - before.total(name, **labels)

    assert delta("stickyproxy_requests_total") == n
    assert delta("stickyproxy_requests_total", code_class="2xx") == n
    assert delta("stickyproxy_route_decisions_total", result="primary") == n
    assert delta("stickyproxy_request_duration_seconds_count") == n
    assert sum(len(user_requests(b)) for b in bs) >= n
    assert abs(sum(after.by("stickyproxy_backend_key_share", "backend").values()) - 1) < 1e-9
    assert after.by("stickyproxy_backend_up", "backend") == {"a": 1, "b": 1, "c": 1}
    assert sum(after.by("stickyproxy_backend_inflight", "backend").values()) == 0


async def test_workers_apply_drain_undrain_and_reload(backends, proxy_process):
    bs, pp, admin = await start(backends, proxy_process)
    a = bs[0]
    path = pp.log.with_suffix(".toml")
    ring = ring_for(pp, path.read_text())
    users = [f"user-{i}" for i in range(60)]
    a_users = [u for u in users if ring.preference(u)[0] == "a"]

    status, text = await admin.call("POST", "/backends/a/drain")
    assert status == 200, text
    seen_a = len(user_requests(a))
    for i in range(120):  # right after the drain returned, every worker
        u = users[i % len(users)]
        status, backend = await one_request(pp.port, u)
        assert status == 200
        want = ring.preference(u)[1] if u in a_users else ring.preference(u)[0]
        assert backend == want, (u, backend, want)
    assert len(user_requests(a)) == seen_a
    status, text = await admin.call("GET", "/backends")
    assert status == 200 and '"drained": true' in text

    status, _ = await admin.call("POST", "/backends/a/undrain")
    assert status == 200

    async def a_back() -> bool:
        for i in range(40):
            u = a_users[i % len(a_users)]
            st, be = await one_request(pp.port, u)
            assert st == 200
            if be != "a":
                return False
        return True

    await eventually(a_back, deadline=10, interval=0.05, what="a's users back on a")

    # reload: add d; every worker routes d's users to it
    (d,) = await backends("d")
    aport = int(admin.base.rsplit(":", 1)[1])
    text = build_toml(
        [*bs, d], {"listen": {"port": pp.port}, "admin": {"enabled": True, "port": aport}}
    )
    path.write_text(text)
    new = ring_for(pp, text)
    d_users = keys_where(new.preference, lambda pr: pr[0] == "d", n=10)
    status, body = await admin.call("POST", "/reload")
    assert status == 200, body
    assert new.fingerprint in body

    async def all_on_d() -> bool:
        for i in range(60):
            st, be = await one_request(pp.port, d_users[i % len(d_users)])
            assert st == 200
            if be != "d":
                return False
        return True

    await eventually(all_on_d, deadline=10, interval=0.05, what="d's users on d")
    assert all(rec.one("X-Sticky-Ring") == new.fingerprint for rec in user_requests(d))
    pids = worker_pids(pp.pid)
    assert all(established_to(pid, {d.port}) > 0 for pid in pids), "a worker never used d"


async def test_workers_count_a_reload_once(backends, proxy_process):
    bs, pp, admin = await start(backends, proxy_process)
    path = pp.log.with_suffix(".toml")
    bs[1].weight = 2
    aport = int(admin.base.rsplit(":", 1)[1])
    path.write_text(
        build_toml(bs, {"listen": {"port": pp.port}, "admin": {"enabled": True, "port": aport}})
    )
    status, body = await admin.call("POST", "/reload")
    assert status == 200, body
    path.write_text("this is not TOML")
    status, body = await admin.call("POST", "/reload")
    assert status == 400, body
    m = await admin.metrics()
    assert m.value("stickyproxy_reloads_total", result="failure") == 1
    assert m.value("stickyproxy_reloads_total", result="success") == 1
    assert m.value("stickyproxy_ring_changes_total") == 1


async def test_a_killed_worker_is_restarted_and_traffic_continues(backends, proxy_process):
    bs, pp, admin = await start(backends, proxy_process)
    a = bs[0]
    status, _ = await admin.call("POST", "/backends/a/drain")  # must survive the restart
    assert status == 200
    first = worker_pids(pp.pid)
    victim = first[0]
    os.kill(victim, signal.SIGKILL)
    await eventually(lambda: not alive(victim), what="worker gone")
    # the kernel drops its listener from the SO_REUSEPORT group a moment after the exit (a
    # connection hashed to it in between is reset: that is the kernel, not the proxy)
    await eventually(lambda: listeners(pp.port) == 1, what="the dead worker's listener gone")
    for i in range(40):  # the survivor serves meanwhile
        status, _ = await one_request(pp.port, f"user-{i}")
        assert status == 200
    await eventually(
        lambda: len(worker_pids(pp.pid)) == 2 and victim not in worker_pids(pp.pid),
        deadline=15,
        interval=0.05,
        what="a replacement worker",
    )
    (replacement,) = set(worker_pids(pp.pid)) - set(first)
    await eventually(
        lambda: listening_on(replacement, pp.port),
        deadline=15,
        interval=0.05,
        what="the replacement listening",
    )
    ports = {b.port for b in bs}

    async def replacement_serves() -> bool:
        for i in range(40):
            status, _ = await one_request(pp.port, f"user-{i}")
            assert status == 200
        return established_to(replacement, ports) > 0

    seen_a = len(user_requests(a))
    await eventually(
        replacement_serves, deadline=15, interval=0.05, what="the replacement worker serving"
    )
    assert len(user_requests(a)) == seen_a  # the replacement knows "a" is drained
    assert pp.proc.poll() is None
    status, _ = await admin.call("GET", "/readyz")
    assert status == 200


async def test_workers_readyz_only_once_the_port_accepts(backends, proxy_process):
    bs = await backends("a")
    aport = free_port()
    pp = proxy_process(bs, {"admin": {"enabled": True, "port": aport}}, workers=2)
    admin = Admin(aport)
    refused = []

    async def ready_then_connect() -> bool:
        try:
            status, _ = await admin.call("GET", "/readyz")
        except aiohttp.ClientError:
            return False
        if status != 200:
            return False
        try:
            st, _ = await one_request(pp.port, "u")
            assert st == 200
        except OSError as e:  # ready, but nothing accepts
            refused.append(repr(e))
        return True

    await eventually(ready_then_connect, deadline=20, interval=0.01, what="readyz 200")
    assert not refused, refused


async def test_a_reload_a_worker_cannot_apply_is_reported_and_that_worker_restarted(
    backends, proxy_process
):
    """The supervisor validates and applies; a worker that then fails (here: the new listen
    port is taken) says so, and the caller hears it: the reload is not reported as clean
    while a worker keeps the old configuration."""
    bs, pp, admin = await start(backends, proxy_process)
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        path = pp.log.with_suffix(".toml")
        aport = int(admin.base.rsplit(":", 1)[1])
        path.write_text(
            build_toml(
                bs,
                {
                    "listen": {"port": taken.getsockname()[1]},
                    "admin": {"enabled": True, "port": aport},
                },
            )
        )
        before = set(worker_pids(pp.pid))
        status, body = await admin.call("POST", "/reload")
        assert status == 200, body
        import json

        restarted = json.loads(body)["workers_restarted"]
        assert len(restarted) == 2 and all("restarted" in r for r in restarted), restarted
        m = await admin.metrics()
        assert m.by("stickyproxy_worker_reload_failures_total", "worker") == {"0": 1, "1": 1}
        # the workers that could not apply it were stopped (and are being started again)
        await eventually(
            lambda: not (set(worker_pids(pp.pid)) & before),
            deadline=15,
            what="the old workers replaced",
        )
    finally:
        taken.close()


async def test_workers_verify_tokens_with_the_key_files_the_supervisor_read(
    backends, proxy_process, tmp_path
):
    """Key files are read once, by the supervisor, and sent to the workers with the config:
    a worker started after the file changed (here: was deleted) still has the same keys."""
    import jwt as pyjwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key = tmp_path / "jwt-public.pem"
    key.write_bytes(
        priv.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    bs = await backends("a", "b")
    aport = free_port()
    pp = proxy_process(
        bs,
        {
            "admin": {"enabled": True, "port": aport},
            "routing": {
                "keys": [
                    {
                        "from": "jwt",
                        "header": "Authorization",
                        "claim": "sub",
                        "algorithms": ["RS256"],
                        "public_key_file": str(key),
                    }
                ],
                "no_key": "reject",
            },
        },
        workers=2,
    )
    await pp.wait_ready()
    await eventually(lambda: len(worker_pids(pp.pid)) == 2, deadline=20, what="two workers")
    key.unlink()
    victim = worker_pids(pp.pid)[0]
    os.kill(victim, signal.SIGKILL)
    await eventually(
        lambda: (
            victim not in worker_pids(pp.pid)
            and len(worker_pids(pp.pid)) == 2
            and all(listening_on(w, pp.port) for w in worker_pids(pp.pid))
        ),
        deadline=20,
        interval=0.05,
        what="the killed worker started again",
    )
    import time as _time

    token = pyjwt.encode({"sub": "alice", "exp": int(_time.time()) + 60}, priv, algorithm="RS256")
    for _ in range(20):  # new connections spread over both workers
        c = await Client.connect(pp.port)
        c.send(
            http_request(
                "GET", "/w", headers={"Authorization": f"Bearer {token}", "Connection": "close"}
            )
        )
        r = await c.response()
        c.close()
        assert r.status == 200, r.body
    assert "cannot read" not in pp.output()
