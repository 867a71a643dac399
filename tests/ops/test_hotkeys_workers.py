"""`stickyproxy run --workers 2`: GET /hotkeys on the supervisor merges every worker's counts,
so a hot user whose requests both workers served shows its whole count; /metrics gives each
backend's share of the requests answered since the previous scrape, over all workers."""

from __future__ import annotations

import json

import pytest

from stickyproxy.routing.hotkeys import key_digest
from support.procs import established_to

from .test_workers import one_request, start_supervised, worker_pids

pytestmark = pytest.mark.slow

HOT = 120
COLD_USERS = 40


async def test_supervisor_merges_the_workers_hot_keys(backends, proxy_process):
    bs = await backends("a", "b", "c")
    pp, admin = await start_supervised(bs, proxy_process, {"hotkeys": {"sample_every": 1}})
    for i in range(HOT):
        status, _ = await one_request(pp.port, "hot-user")  # new connection each time
        assert status == 200
        status, _ = await one_request(pp.port, f"cold-{i % COLD_USERS}")
        assert status == 200
    ports = {b.port for b in bs}
    pids = worker_pids(pp.pid)
    assert len(pids) == 2 and all(established_to(pid, ports) > 0 for pid in pids)

    status, text = await admin.call("GET", "/hotkeys?n=3")
    assert status == 200, text
    doc = json.loads(text)
    assert doc["processes"] == 2 and doc["hashed"] is True
    assert doc["requests"] >= 2 * HOT  # plus the readiness probes' requests
    top = doc["keys"][0]
    assert top["key"] == key_digest("hot-user") and top["requests"] == HOT
    assert {k["key"] for k in doc["keys"][1:]} <= {
        key_digest(f"cold-{i}") for i in range(COLD_USERS)
    } | {key_digest("ready")}
    m = await admin.metrics()
    assert m.value("stickyproxy_hotkeys_tracked") >= COLD_USERS + 1

    # each backend's share of the requests since the previous scrape: only the hot user's
    # now, so all of it on the hot user's owner
    status, text = await admin.call("GET", "/route?key=hot-user")
    owner = json.loads(text)["owner"]
    for _ in range(20):
        status, _ = await one_request(pp.port, "hot-user")
        assert status == 200
    shares = (await admin.metrics()).by("stickyproxy_backend_request_share", "backend")
    assert shares[owner] == 1.0 and sum(shares.values()) == 1.0, shares
