"""Large request bodies and WebSocket messages through each proxy, and straight to a backend.

The backends are bench/backend.py (one Python process on three ports: reads a whole upload
before answering, echoes WebSocket messages). Each proxy is started with the same
configuration as in the data-plane benchmark, in front of those backends. Rounds are
interleaved over the targets, as there.
"""

from __future__ import annotations

import contextlib
import http.client
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import stats
from .backend import UPLOAD_PATH, WS_PATH, backend_argv
from .cpu import CpuMeter
from .dataplane import Target, start_target
from .httpclient import USER_HEADER, run_loop
from .procs import LOOPBACK, Server, free_ports, start_server
from .targets import BACKEND_IDS, TargetKind, python_env
from .wsclient import HandshakeError, echo_run

MIB = 1 << 20
UPLOAD_SIZES_MIB = (1, 50)
UPLOAD_REQUESTS = {1: 20, 50: 3}
SMOKE_UPLOAD_REQUESTS = {1: 2, 50: 1}
WS_CONNECTIONS = 16
WS_PAYLOAD = b"x" * 100
WS_DURATION = 5.0
SMOKE_WS_DURATION = 1.0
UPLOAD_TIMEOUT = 60.0
DIRECT = "direct"


@dataclass(frozen=True)
class StreamsPlan:
    kinds: tuple[TargetKind, ...]
    rounds: int
    upload_requests: dict[int, int]
    ws_duration: float
    smoke: bool


@dataclass
class Endpoint:
    label: str
    port: int
    server: Server | None = None

    def meter(self) -> CpuMeter:
        return CpuMeter(self.server.proc.pid if self.server is not None else None)


def make_plan(kinds: Sequence[TargetKind], rounds: int, smoke: bool) -> StreamsPlan:
    return StreamsPlan(
        kinds=tuple(kinds),
        rounds=rounds,
        upload_requests=SMOKE_UPLOAD_REQUESTS if smoke else UPLOAD_REQUESTS,
        ws_duration=SMOKE_WS_DURATION if smoke else WS_DURATION,
        smoke=smoke,
    )


class UploadError(Exception):
    """An upload was refused or answered wrongly."""


def upload_batch(port: int, size_mib: int, count: int) -> list[float]:
    """`count` POSTs of `size_mib` MiB on one keep-alive connection: seconds for each."""
    payload = b"\0" * (size_mib * MIB)
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=UPLOAD_TIMEOUT)
    times = []
    try:
        for i in range(count):
            started = time.perf_counter()
            conn.request(
                "POST",
                UPLOAD_PATH,
                body=payload,
                headers={USER_HEADER: f"user-{i + 1}", "Content-Type": "application/octet-stream"},
            )
            response = conn.getresponse()
            body = response.read()
            times.append(time.perf_counter() - started)
            if response.status != 200 or body.strip() != str(len(payload)).encode():
                raise UploadError(f"status {response.status}, body {body[:60]!r}")
    except (OSError, http.client.HTTPException) as e:
        raise UploadError(f"{type(e).__name__}: {e}") from None
    finally:
        conn.close()
    return times


def measure_upload(endpoint: Endpoint, size_mib: int, count: int) -> dict[str, Any]:
    meter = endpoint.meter()
    meter.start()
    times = upload_batch(endpoint.port, size_mib, count)
    used = meter.stop()
    per_request = statistics.median(times)
    return {
        "size_mib": size_mib,
        "requests": count,
        "seconds": times,
        "median_s": per_request,
        "mib_per_s": size_mib / per_request,
        "cpu_ms_per_mib": used.total_s * 1000 / (size_mib * count) if meter.root else None,
    }


def measure_ws(endpoint: Endpoint, duration: float) -> dict[str, Any]:
    meter = endpoint.meter()
    users = [f"user-{i}" for i in range(1, WS_CONNECTIONS + 1)]
    meter.start()
    echoed = run_loop(echo_run(endpoint.port, WS_PATH, users, WS_PAYLOAD, duration))
    used = meter.stop()
    rate = echoed.messages / duration
    return {
        "connections": WS_CONNECTIONS,
        "payload_bytes": len(WS_PAYLOAD),
        "duration_s": duration,
        "messages": echoed.messages,
        "messages_per_s": rate,
        "rtt_ms": stats.latency_ms(echoed.latencies),
        "cpu_us_per_message": (
            used.total_s * 1e6 / echoed.messages if meter.root and echoed.messages else None
        ),
    }


def _summary(runs: list[dict[str, Any]], key: str) -> float | None:
    return stats.median(r[key] for r in runs)


def run(plan: StreamsPlan, progress: Callable[[str], None]) -> dict[str, Any]:
    uploads: dict[str, dict[int, list[dict[str, Any]]]] = {}
    websockets: dict[str, list[dict[str, Any]]] = {}
    failures: dict[str, str] = {}
    with (
        tempfile.TemporaryDirectory(prefix="stickyproxy-bench-streams-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        ports = free_ports(len(BACKEND_IDS))
        start_server("stream-backends", backend_argv(ports), ports, workdir, stack, python_env())
        progress(f"stream backends on {', '.join(map(str, ports))} (python -m bench.backend)")
        endpoints = [Endpoint(DIRECT, ports[0])]
        for kind in plan.kinds:
            target = Target(kind, 1, kind.name)
            start_target(target, workdir, ports, stack)
            if target.active:
                endpoints.append(Endpoint(target.label, target.port, target.server))
            else:
                failures[target.label] = target.reason
        for round_no in range(1, plan.rounds + 1):
            for endpoint in endpoints:
                if endpoint.label in failures:
                    continue
                try:
                    _round(endpoint, plan, round_no, uploads, websockets, progress)
                except (UploadError, HandshakeError, OSError, TimeoutError) as e:
                    failures[endpoint.label] = f"{type(e).__name__}: {e}"
                    progress(f"streams {endpoint.label} failed: {failures[endpoint.label]}")
    return {
        "benchmark": "streams",
        "rounds": plan.rounds,
        "upload_requests": {str(k): v for k, v in plan.upload_requests.items()},
        "ws": {
            "connections": WS_CONNECTIONS,
            "payload_bytes": len(WS_PAYLOAD),
            "duration_s": plan.ws_duration,
        },
        "uploads": _upload_summaries(uploads),
        "websocket": _ws_summaries(websockets),
        "failures": failures,
    }


def _round(
    endpoint: Endpoint,
    plan: StreamsPlan,
    round_no: int,
    uploads: dict[str, dict[int, list[dict[str, Any]]]],
    websockets: dict[str, list[dict[str, Any]]],
    progress: Callable[[str], None],
) -> None:
    step = f"round {round_no}/{plan.rounds} {endpoint.label}"
    for size in UPLOAD_SIZES_MIB:
        result = measure_upload(endpoint, size, plan.upload_requests[size])
        uploads.setdefault(endpoint.label, {}).setdefault(size, []).append(result)
        progress(
            f"{step} upload {size} MiB x {result['requests']} ... "
            f"{result['median_s'] * 1000:,.1f} ms each, {result['mib_per_s']:,.0f} MiB/s"
        )
    result = measure_ws(endpoint, plan.ws_duration)
    websockets.setdefault(endpoint.label, []).append(result)
    progress(
        f"{step} websocket echo ... {result['messages_per_s']:,.0f} messages/s, "
        f"p99 round trip {result['rtt_ms']['p99']:.2f} ms"
    )


def _upload_summaries(uploads: dict[str, dict[int, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    out = []
    direct = uploads.get(DIRECT, {})
    for label, by_size in uploads.items():
        for size, runs in by_size.items():
            mib_s = _summary(runs, "mib_per_s")
            base = _summary(direct.get(size, []), "mib_per_s")
            out.append(
                {
                    "label": label,
                    "size_mib": size,
                    "runs": runs,
                    "median_ms": _summary(runs, "median_s") * 1000,
                    "mib_per_s": mib_s,
                    "x_direct": stats.ratio(mib_s, base),
                    "cpu_ms_per_mib": _summary(runs, "cpu_ms_per_mib"),
                }
            )
    return out


def _ws_summaries(websockets: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    base = _summary(websockets.get(DIRECT, []), "messages_per_s")
    out = []
    for label, runs in websockets.items():
        rate = _summary(runs, "messages_per_s")
        out.append(
            {
                "label": label,
                "runs": runs,
                "messages_per_s": rate,
                "x_direct": stats.ratio(rate, base),
                "rtt_p50_ms": stats.median(r["rtt_ms"]["p50"] for r in runs),
                "rtt_p99_ms": stats.median(r["rtt_ms"]["p99"] for r in runs),
                "cpu_us_per_message": _summary(runs, "cpu_us_per_message"),
            }
        )
    return out


def main() -> int:
    from .targets import TARGET_KINDS

    result = run(make_plan(tuple(TARGET_KINDS.values()), 1, smoke=True), print)
    for row in result["uploads"] + result["websocket"]:
        print({k: v for k, v in row.items() if k != "runs"})
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
