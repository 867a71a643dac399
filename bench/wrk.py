"""One wrk run against a loopback port, and its figures."""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from .procs import LOOPBACK

LUA_DIR = Path(__file__).resolve().parent / "lua"
USERS_SCRIPT = LUA_DIR / "users.lua"
RESULT_PREFIX = "@@bench "
THREADS = 1
SEED = 1
EXIT_GRACE = 15.0
US_PER_MS = 1000.0
US_PER_S = 1_000_000.0


class WrkError(Exception):
    """wrk failed, or printed no figures."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    errors: dict[str, int]
    output: str

    def as_dict(self) -> dict:
        return asdict(self)


def wrk_command(
    port: int, duration: float, connections: int, script: Path, script_args: list[str]
) -> list[str]:
    return [
        "wrk",
        f"-t{THREADS}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--latency",
        "-s",
        str(script),
        f"http://{LOOPBACK}:{port}/",
        "--",
        *script_args,
    ]


def parse_output(output: str) -> WrkResult:
    """Read the JSON line the script's done() prints."""
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise WrkError(f"no {RESULT_PREFIX.strip()} line in wrk's output:\n{output.strip()}")
    raw = json.loads(lines[-1][len(RESULT_PREFIX) :])
    latency, errors = raw["latency_us"], raw["errors"]
    duration_s = raw["duration_us"] / US_PER_S
    return WrkResult(
        requests=raw["requests"],
        duration_s=duration_s,
        rps=raw["requests"] / duration_s if duration_s else 0.0,
        p50_ms=latency["p50"] / US_PER_MS,
        p90_ms=latency["p90"] / US_PER_MS,
        p99_ms=latency["p99"] / US_PER_MS,
        p999_ms=latency["p99_9"] / US_PER_MS,
        max_ms=latency["max"] / US_PER_MS,
        non_2xx=errors["status"],
        socket_errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        errors=errors,
        output=output,
    )


def run_wrk(port: int, duration: float, connections: int, users: int) -> WrkResult:
    """GET / with a random user of `users` per request (lua/users.lua)."""
    return run_script(port, duration, connections, USERS_SCRIPT, [str(users), str(SEED)])


def run_script(
    port: int, duration: float, connections: int, script: Path, script_args: list[str]
) -> WrkResult:
    return run_argv(wrk_command(port, duration, connections, script, script_args), duration)


def run_argv(argv: list[str], duration: float) -> WrkResult:
    """Run wrk as ``argv`` (a run of ``duration`` seconds) and parse its report; WrkError
    when it overruns, fails or prints no report."""
    try:
        done = subprocess.run(
            argv,
            check=False,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=duration + EXIT_GRACE,
        )
    except subprocess.TimeoutExpired:
        raise WrkError(f"wrk ran past {duration + EXIT_GRACE:g}s") from None
    if done.returncode != 0:
        raise WrkError(f"wrk exited with code {done.returncode}: {done.stderr.strip()}")
    return parse_output(done.stdout)
