"""What user input can do to the proxy's metrics and access log (docs/THREAT_MODEL.md T13).

- Metric labels come from configuration (backend ids) and small fixed sets (status class,
  status code of a refusal, retry reason, error kind, route result), never from a request:
  a flood of distinct keys, paths, methods or forged X-Sticky-* values adds no series.
- The access log shows a user key as a short hash by default (``logging.access_key``).
"""

from __future__ import annotations

import json
import logging
import random
import re

from support.http import Client, http_request

from .judges import strict_responder

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]


async def _metrics_text(port: int) -> str:
    c = await Client.connect(port)
    try:
        c.send(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        return (await c.response()).body.decode()
    finally:
        c.close()


def _series(text: str) -> set[str]:
    return {
        line.rpartition(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }


async def _flood(p, rng: random.Random, n: int, tag: str) -> list[str]:
    """Requests with user-chosen everything; returns the keys and paths used."""
    marks = []
    for i in range(n):
        key = f"{tag}-key-{rng.getrandbits(40):x}"
        path = f"/{tag}-path-{rng.getrandbits(40):x}?q={rng.getrandbits(20)}"
        method = METHODS[i % len(METHODS)]
        marks += [key, path.split("?")[0]]
        headers = {
            "X-User-Id": key,
            "X-Sticky-Backend": f"{tag}-evil-{i}",
            "X-Sticky-Route": f"{tag}-route-{i}",
        }
        kind = i % 5
        if kind == 4:  # refused by the proxy: ambiguous key
            raw = (
                f"GET {path} HTTP/1.1\r\nHost: h\r\nX-User-Id: {key}\r\nX-User-Id: {key}-2\r\n\r\n"
            ).encode()
        else:
            raw = http_request(
                method,
                path,
                headers=headers,
                body=b"x" if method in ("POST", "PUT", "PATCH") else None,
            )
        c = await p.client()
        c.send(raw)
        await c.response(head=method == "HEAD")
        c.close()
    return marks


async def test_user_input_adds_no_metric_series(raw_backend, proxy):
    be = await raw_backend("a", strict_responder())
    p = await proxy([be], {"admin": {"enabled": True, "port": 0}})
    rng = random.Random(13)
    admin = p.svc.admin.port
    await _flood(p, rng, 70, "first")
    before = _series(await _metrics_text(admin))
    marks = await _flood(p, rng, 140, "second")
    text = await _metrics_text(admin)
    after = _series(text)
    assert after == before, sorted(after ^ before)
    for m in marks:
        assert m not in text
    labels = set(re.findall(r'(\w+)="', text))
    # fingerprint: the ring's, from configuration (stickyproxy_ring_info)
    assert labels <= {
        "backend",
        "code_class",
        "result",
        "reason",
        "kind",
        "status",
        "le",
        "fingerprint",
    }, labels


async def test_access_log_shows_a_hash_of_the_key_by_default(raw_backend, proxy, caplog):
    be = await raw_backend("a", strict_responder())
    p = await proxy([be], {"logging": {"level": "error", "access": "json"}})
    caplog.set_level(logging.INFO, logger="stickyproxy.access")
    keys = [f"person{i}@example.com" for i in range(5)]
    for k in keys:
        assert (await p.get("/x", user=k)).status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "stickyproxy.access"]
    assert len(lines) == len(keys)
    for line in lines:
        rec = json.loads(line)
        assert re.fullmatch(r"[0-9a-f]{12}", rec["key"]), rec
        assert not any(k in line for k in keys), line
