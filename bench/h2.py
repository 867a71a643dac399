"""HTTP/2 benchmark (#21): h2 streams vs HTTP/1.1 keep-alive through the same stickyproxy,
same run, same load tool.

    python -m bench.h2 [--smoke] [--duration S] [--rounds N] [--out FILE]

One stickyproxy (1 worker, ``listen.h2c = true``) in front of the three backends of the
data-plane benchmark (NGINX, or the Python ones when NGINX is missing). h2load
(``nghttp2-client``) drives both protocols:

- ``h2``: H2_CONNECTIONS connections with H2_STREAMS concurrent streams each, by prior
  knowledge (many streams on few connections);
- ``http/1.1``: ``h2load --h1``, H1_CONNECTIONS keep-alive connections, one request in
  flight on each (the same number of requests in flight as ``h2``).

Every request names one of USERS users (``?user=uN``; the proxy keys on the query
parameter as well as on X-User-Id), so requests spread over the backends as in the
data-plane benchmark. The two protocols alternate within each round. Printed, and written
as JSON: requests/s, the h2 / http/1.1 ratio, and the proxy's CPU per request (its
process's CPU time from /proc over the run, divided by the requests completed). Not
pass/fail on speed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .console import progress
from .cpu import CpuMeter, per_request_us
from .dataplane import NGINX_BACKENDS, PYTHON_BACKENDS, start_backends
from .procs import LOOPBACK, free_ports, spawn_server, wait_until_accepting
from .targets import USER_HEADER, stickyproxy_launch

# Load shape: the same requests in flight for both protocols.
H2_CONNECTIONS = 4
H2_STREAMS = 16
H1_CONNECTIONS = H2_CONNECTIONS * H2_STREAMS
USERS = 1000
THREADS = 1  # h2load threads: the machine has 2 cores, the proxy needs one
DEFAULT_DURATION = 10.0
DEFAULT_ROUNDS = 3
SMOKE_DURATION = 1.0
START_TIMEOUT = 20.0
RESULTS = Path(__file__).resolve().parent / "results" / "h2.json"

H2 = "h2"
H1 = "http/1.1"

_FINISHED = re.compile(r"finished in [0-9.]+m?s, ([0-9.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
    r"(\d+) failed, (\d+) errored, (\d+) timeout"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def h2_launch(workdir: Path, port: int, backend_ports: Sequence[int]):
    """stickyproxy as in the data-plane benchmark (1 worker), with h2c on and the user key
    also taken from the ``user`` query parameter (h2load cannot vary a header)."""
    base = stickyproxy_launch(workdir, port, backend_ports, 1)
    keys = f'keys = [{{ from = "header", name = "{USER_HEADER}" }}]'
    assert keys in base.config, "bench/targets.py changed its [routing] keys line"
    config = base.config.replace(
        keys,
        f'keys = [{{ from = "header", name = "{USER_HEADER}" }}, '
        f'{{ from = "query", name = "user" }}]',
    ).replace(f"port = {port}\n", f"port = {port}\nh2c = true\n", 1)
    path = workdir / "stickyproxy-h2.toml"
    argv = [str(path) if a == str(base.config_path) else a for a in base.argv]
    return dataclasses.replace(base, config_path=path, config=config, argv=argv)


def parse_h2load(out: str) -> dict[str, Any]:
    m = _FINISHED.search(out)
    r = _REQUESTS.search(out)
    s = _STATUS.search(out)
    if m is None or r is None or s is None:
        raise RuntimeError(f"h2load output not understood:\n{out[-2000:]}")
    return {
        "rps": float(m[1]),
        "done": int(r[3]),
        "succeeded": int(r[4]),
        "failed": int(r[5]),
        "errored": int(r[6]),
        "timeout": int(r[7]),
        "non_2xx": int(s[2]) + int(s[3]) + int(s[4]),
    }


def h2load(protocol: str, port: int, uris: Path, duration: float) -> dict[str, Any]:
    argv = ["h2load", "-t", str(THREADS), "-i", str(uris), "-D", f"{duration:g}"]
    if protocol == H1:
        argv += ["--h1", "-c", str(H1_CONNECTIONS), "-m", "1"]
    else:
        argv += ["-c", str(H2_CONNECTIONS), "-m", str(H2_STREAMS)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"h2load exited {out.returncode}: {out.stderr[-1000:]}")
    return parse_h2load(out.stdout)


def run(duration: float, rounds: int, warmup: float) -> dict[str, Any]:
    if shutil.which("h2load") is None:
        raise SystemExit("h2load is missing (Debian: apt-get install nghttp2-client)")
    backends_kind = NGINX_BACKENDS if shutil.which("nginx") else PYTHON_BACKENDS
    runs: dict[str, list[dict[str, Any]]] = {H2: [], H1: []}
    with (
        tempfile.TemporaryDirectory(prefix="stickyproxy-bench-h2-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        backend_ports, _, _ = start_backends(workdir, stack, backends_kind)
        (port,) = free_ports(1)
        launch = h2_launch(workdir, port, backend_ports)
        launch.write()
        server = spawn_server("stickyproxy-h2", launch.argv, workdir, stack, launch.env)
        wait_until_accepting(server, [port], START_TIMEOUT)
        uris = workdir / "uris.txt"
        uris.write_text("".join(f"http://{LOOPBACK}:{port}/?user=u{i}\n" for i in range(USERS)))
        if warmup:
            for protocol in (H2, H1):
                h2load(protocol, port, uris, warmup)
            progress(f"warmed up ({warmup:g}s per protocol)")
        for round_no in range(1, rounds + 1):
            order = (H2, H1) if round_no % 2 else (H1, H2)
            for protocol in order:
                meter = CpuMeter(server.proc.pid)
                meter.start()
                r = h2load(protocol, port, uris, duration)
                r.update(per_request_us(meter.stop(), r["done"]))
                runs[protocol].append({"round": round_no, **r})
                cpu_text = f"{r['cpu_us']:.0f} us/req" if r["cpu_us"] else "cpu n/a"
                progress(
                    f"round {round_no}/{rounds} {protocol:9} {r['rps']:10.0f} req/s  "
                    f"{cpu_text}  failed {r['failed'] + r['errored'] + r['timeout']}  "
                    f"non-2xx {r['non_2xx']}"
                )
            if not server.running:
                raise RuntimeError(f"stickyproxy exited: {server.describe_exit()}")
    med = {p: statistics.median(x["rps"] for x in rs) for p, rs in runs.items()}
    cpu = {
        p: statistics.median(x["cpu_us"] for x in rs if x["cpu_us"] is not None)
        if any(x["cpu_us"] is not None for x in rs)
        else None
        for p, rs in runs.items()
    }
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "h2load": subprocess.run(
            ["h2load", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "backends": backends_kind,
        "load": {
            "h2": f"{H2_CONNECTIONS} connections x {H2_STREAMS} streams",
            "http/1.1": f"{H1_CONNECTIONS} keep-alive connections",
            "users": USERS,
            "duration_s": duration,
            "rounds": rounds,
        },
        "runs": runs,
        "median_rps": med,
        "median_cpu_us": cpu,
        "h2_over_http1": med[H2] / med[H1] if med[H1] else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.h2", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="1 s per run, 1 round")
    p.add_argument("--duration", type=float, default=DEFAULT_DURATION, help="seconds per run")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = p.parse_args(argv)
    duration, rounds, warmup = (
        (SMOKE_DURATION, 1, 0.0) if args.smoke else (args.duration, args.rounds, 2.0)
    )
    result = run(duration, rounds, warmup)
    ratio = result["h2_over_http1"]
    progress(
        f"median: h2 {result['median_rps'][H2]:.0f} req/s, http/1.1 "
        f"{result['median_rps'][H1]:.0f} req/s, h2/http1.1 "
        f"{ratio:.2f}"
        if ratio
        else "no http/1.1 figure"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    progress(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
