"""Where stickyproxy's time goes.

- The Python path per request (bench/hotpath.py, cProfile, no sockets).
- The running proxy under wrk load (1 worker), three ways over one continuous load:
  /proc (user vs kernel CPU), ``perf record`` (on-CPU samples by library and kernel path:
  what the CPU does), then ``py-spy record --native -f raw`` (wall-clock samples with Python
  frames: which Python functions; a thread preempted inside a syscall is sampled there too).
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import hotpath
from .cpu import CpuMeter, process_tree
from .dataplane import NGINX_BACKENDS, PYTHON_BACKENDS, Target, start_backends, start_target
from .httpclient import Request, closed_loop, run_loop
from .procs import missing_tools
from .targets import TARGET_KINDS
from .wrk import SEED, USERS_SCRIPT, wrk_command

HOTPATH_REQUESTS, SMOKE_HOTPATH_REQUESTS = 100_000, 5_000
HOTPATH_ROUNDS, SMOKE_HOTPATH_ROUNDS = 3, 1
PROFILE_SECONDS, SMOKE_PROFILE_SECONDS = 6, 1
PYSPY_RATE = 200
PERF_FREQUENCY = 999
RAMP_SECONDS = 1.0
LOAD_CONNECTIONS = 32
LOAD_USERS = 10_000
TOOL_GRACE = 30.0
PY_SPY, PERF, STRACE = "py-spy", "perf", "strace"
SYSCALL_REQUESTS, SMOKE_SYSCALL_REQUESTS = 5_000, 500
SYSCALL_CONNECTIONS = 8
ATTACH_TIMEOUT = 10.0
ATTACH_POLL = 0.05
STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(?P<calls>\d+)\s+(?:\d+\s+)?(?P<name>\w+)$")

IDLE_CALLS = {"epoll_wait", "epoll_pwait", "epoll_pwait2"}
WRITE_CALLS = {"write", "writev", "send", "sendto", "sendmsg", "__libc_write", "__GI___writev"}
READ_CALLS = {"read", "readv", "recv", "recvfrom", "recvmsg", "__libc_read"}
LLHTTP_FILES = {"parser.c", "llhttp.c", "api.c", "http.c", "url_parser.c"}
UVLOOP_FILES = {
    "loop.c",
    "core.c",
    "linux.c",
    "stream.c",
    "tcp.c",
    "uv-common.c",
    "timer.c",
    "loop-watcher.c",
    "handle.c",
    "poll.c",
    "async.c",
    "queue.h",
}
LIBC = "libc.so.6"
FRAME = re.compile(r"^(?P<name>.*) \((?P<where>[^()]*)\)$")

IDLE = "waiting for events (epoll)"
CATEGORY_ORDER = (
    "syscall: socket write",
    "syscall: socket read",
    "syscall: other",
    "llhttp (httptools)",
    "uvloop / libuv",
    "Python: stickyproxy",
    "Python: asyncio, uhashring, stdlib",
    "other",
)


def _frame(text: str) -> tuple[str, str]:
    m = FRAME.match(text)
    return (m.group("name"), m.group("where")) if m else (text, "")


def _file(where: str) -> str:
    return where.rsplit(":", 1)[0] if where.rsplit(":", 1)[-1].isdigit() else where


def classify(frames: list[str]) -> str:
    name, where = _frame(frames[-1])
    leaf_file = _file(where)
    if leaf_file == LIBC or leaf_file == "[vdso]":
        if name in IDLE_CALLS:
            return IDLE
        if name in WRITE_CALLS:
            return "syscall: socket write"
        if name in READ_CALLS:
            return "syscall: socket read"
        return "syscall: other"
    if leaf_file in LLHTTP_FILES:
        return "llhttp (httptools)"
    if leaf_file in UVLOOP_FILES:
        return "uvloop / libuv"
    for text in reversed(frames):
        _, frame_where = _frame(text)
        path = _file(frame_where)
        if path.endswith(".py"):
            return (
                "Python: stickyproxy"
                if path.startswith("stickyproxy/")
                else "Python: asyncio, uhashring, stdlib"
            )
    return "other"


def parse_raw(text: str) -> dict[str, Any]:
    """Sample counts per category, and the busiest stickyproxy functions (own samples)."""
    categories: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        category = classify(frames)
        categories[category] += n
        if category == "Python: stickyproxy":
            for frame in reversed(frames):
                name, where = _frame(frame)
                if _file(where).startswith("stickyproxy/"):
                    functions[f"{name} ({_file(where)})"] += n
                    break
    total = sum(categories.values())
    busy = total - categories[IDLE]
    return {
        "samples": total,
        "idle_samples": categories[IDLE],
        "busy_samples": busy,
        "busy_share": {c: categories[c] / busy if busy else 0.0 for c in CATEGORY_ORDER},
        "idle_share_of_all": categories[IDLE] / total if total else 0.0,
        "top_functions": [
            {"function": f, "share_of_busy": n / busy if busy else 0.0}
            for f, n in functions.most_common(10)
        ],
    }


PERF_LINE = re.compile(r"^\s*(?P<pct>[\d.]+)%\s+(?P<dso>\S+)\s+\[(?P<kind>.)\]\s+(?P<sym>.*)$")
KERNEL_SCHEDULER = (
    "finish_task_switch",
    "__schedule",
    "schedule",
    "_raw_spin_unlock_irqrestore",
    "try_to_wake_up",
    "ttwu",
    "pick_next",
    "enqueue_",
    "dequeue_",
    "update_curr",
    "__wake_up",
    "psi_",
    "set_next_entity",
    "switch_",
    "__switch_to",
)
KERNEL_NETWORK = (
    "tcp",
    "__tcp",
    "ip_",
    "__ip",
    "ipv4",
    "dev_",
    "__dev",
    "net_",
    "__net",
    "napi",
    "__napi",
    "skb",
    "__skb",
    "kfree_skb",
    "sock",
    "__sock",
    "sk_",
    "__sk",
    "inet",
    "loopback",
    "__inet",
    "release_sock",
    "lock_sock",
    "__release_sock",
    "validate_xmit",
    "process_backlog",
    "__kfree_skb",
    "nf_",
    "raw_v4",
)
PERF_ORDER = (
    "Python interpreter (libpython)",
    "llhttp (httptools)",
    "uvloop / libuv",
    "libc",
    "md5 of the ring (libcrypto, _hashlib)",
    "kernel: TCP/IP over loopback",
    "kernel: scheduler (switches, wake-ups)",
    "kernel: syscalls, epoll, other",
    "other",
)


def perf_category(dso: str, kind: str, symbol: str) -> str:
    if kind == "k" or dso.startswith("[kernel"):
        if symbol.startswith(KERNEL_SCHEDULER):
            return "kernel: scheduler (switches, wake-ups)"
        if symbol.startswith(KERNEL_NETWORK):
            return "kernel: TCP/IP over loopback"
        return "kernel: syscalls, epoll, other"
    if dso.startswith("libpython"):
        return "Python interpreter (libpython)"
    if dso.startswith("parser.cpython") or "httptools" in dso:
        return "llhttp (httptools)"
    if dso.startswith("loop.cpython") or "uvloop" in dso:
        return "uvloop / libuv"
    if dso.startswith("libc."):
        return "libc"
    if dso.startswith(("libcrypto", "_hashlib")):
        return "md5 of the ring (libcrypto, _hashlib)"
    return "other"


def parse_perf_report(text: str) -> dict[str, Any]:
    shares: collections.Counter[str] = collections.Counter()
    symbols: list[tuple[float, str]] = []
    for line in text.splitlines():
        m = PERF_LINE.match(line)
        if not m:
            continue
        share = float(m.group("pct")) / 100
        shares[perf_category(m.group("dso"), m.group("kind"), m.group("sym").strip())] += share
        symbols.append((share, f"{m.group('sym').strip()} ({m.group('dso')})"))
    symbols.sort(reverse=True)
    kernel = sum(v for k, v in shares.items() if k.startswith("kernel"))
    return {
        "share": {k: shares[k] for k in PERF_ORDER},
        "kernel_share": kernel,
        "top_symbols": [{"symbol": name, "share": v} for v, name in symbols[:10]],
    }


def perf_profile(pid: int, seconds: float, workdir: Path) -> dict[str, Any]:
    if shutil.which(PERF) is None:
        return {
            "status": "skipped",
            "reason": "perf is not on the PATH (apt-get install linux-perf)",
        }
    data = workdir / "perf.data"
    record = [
        PERF,
        "record",
        "-F",
        str(PERF_FREQUENCY),
        "-p",
        str(pid),
        "-o",
        str(data),
        "--",
        "sleep",
        f"{seconds:g}",
    ]
    done = subprocess.run(
        record, check=False, capture_output=True, text=True, timeout=seconds + TOOL_GRACE
    )
    if done.returncode != 0 or not data.exists():
        return {
            "status": "skipped",
            "reason": f"perf record failed ({done.returncode}): {done.stderr.strip()[-300:]}",
        }
    report_argv = [
        PERF,
        "report",
        "-i",
        str(data),
        "--stdio",
        "--no-children",
        "-q",
        "--sort",
        "dso,sym",
        "-g",
        "none",
    ]
    report = subprocess.run(
        report_argv, check=False, capture_output=True, text=True, timeout=TOOL_GRACE
    )
    parsed = parse_perf_report(report.stdout)
    if not parsed["top_symbols"]:
        return {"status": "skipped", "reason": f"perf report gave nothing: {report.stderr[-300:]}"}
    return {"status": "ok", "command": f"perf record -F {PERF_FREQUENCY} -p PID", **parsed}


def pyspy_profile(pid: int, seconds: float, workdir: Path) -> dict[str, Any]:
    if shutil.which(PY_SPY) is None:
        return {"status": "skipped", "reason": "py-spy is not on the PATH (pip install py-spy)"}
    raw = workdir / "pyspy.txt"
    argv = [
        PY_SPY,
        "record",
        "--native",
        "-f",
        "raw",
        "-r",
        str(PYSPY_RATE),
        "-d",
        f"{seconds:g}",
        "-p",
        str(pid),
        "-o",
        str(raw),
    ]
    done = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=seconds + TOOL_GRACE
    )
    if done.returncode != 0 or not raw.exists():
        return {
            "status": "skipped",
            "reason": f"py-spy failed ({done.returncode}): {done.stderr.strip()[-300:]}",
        }
    return {
        "status": "ok",
        "command": f"py-spy record --native -f raw -r {PYSPY_RATE} -p PID",
        **parse_raw(raw.read_text()),
    }


def _threads(root: int) -> list[int]:
    tids = []
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            tids += [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    return tids


def _traced(tid: int) -> bool:
    try:
        status = Path(f"/proc/{tid}/status").read_text()
    except OSError:
        return True
    return not re.search(r"^TracerPid:\s+0$", status, re.MULTILINE)


def parse_strace_summary(text: str) -> dict[str, int]:
    calls = {}
    for line in text.splitlines():
        m = STRACE_LINE.match(line)
        if m and m.group("name") != "total":
            calls[m.group("name")] = int(m.group("calls"))
    return calls


def count_syscalls(
    root: int, port: int, requests: int, workdir: Path, label: str
) -> dict[str, Any]:
    """Syscalls the process tree makes while it serves `requests` GETs on keep-alive
    connections (strace -c attached to every thread)."""
    out = workdir / f"strace-{label}.txt"
    tids = _threads(root)
    argv = [STRACE, "-c", "-f", "-qq", "-o", str(out)] + [a for t in tids for a in ("-p", str(t))]
    tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + ATTACH_TIMEOUT
        while not all(_traced(t) for t in tids):
            if time.monotonic() > deadline or tracer.poll() is not None:
                detail = tracer.stderr.read() if tracer.stderr else ""
                raise RuntimeError(f"strace did not attach: {detail}")
            time.sleep(ATTACH_POLL)
        batch = [Request("GET", "/", f"user-{i % LOAD_USERS}") for i in range(requests)]
        answered = sum(
            o.ok for o in run_loop(closed_loop(port, batch, connections=SYSCALL_CONNECTIONS))
        )
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=TOOL_GRACE)
    calls = parse_strace_summary(out.read_text())
    per = 1 / answered if answered else 0.0
    return {
        "requests": answered,
        "total_per_request": sum(calls.values()) * per,
        "per_request": {k: v * per for k, v in sorted(calls.items(), key=lambda kv: -kv[1])},
    }


def syscalls_per_request(
    requests: int, backends: str, progress: Callable[[str], None]
) -> dict[str, Any]:
    if shutil.which(STRACE) is None:
        return {"status": "skipped", "reason": "strace is not on the PATH (apt-get install strace)"}
    kinds = [k for k in TARGET_KINDS.values() if k.tool is None or not missing_tools([k.tool])]
    out: dict[str, Any] = {
        "status": "ok",
        "requests": requests,
        "connections": SYSCALL_CONNECTIONS,
        "targets": {},
    }
    with (
        tempfile.TemporaryDirectory(prefix="stickyproxy-bench-strace-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        ports, _, _ = start_backends(workdir, stack, backends)
        for kind in kinds:
            target = Target(kind, 1, kind.name)
            start_target(target, workdir, ports, stack)
            if not target.active or target.server is None:
                continue
            try:
                counted = count_syscalls(
                    target.server.proc.pid, target.port, requests, workdir, kind.name
                )
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                return {"status": "skipped", "reason": f"strace on {kind.name}: {e}"}
            out["targets"][kind.name] = counted
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(counted["per_request"].items())[:4])
            progress(
                f"profile: {kind.name} makes {counted['total_per_request']:.2f} syscalls "
                f"per request ({top})"
            )
    return out


@contextlib.contextmanager
def background_load(port: int, seconds: float, use_wrk: bool):
    if use_wrk:
        argv = wrk_command(
            port, seconds, LOAD_CONNECTIONS, USERS_SCRIPT, [str(LOAD_USERS), str(SEED)]
        )
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield
        finally:
            proc.wait(timeout=seconds + TOOL_GRACE)
        return

    def drive() -> None:
        requests = (Request("GET", "/", f"user-{i % LOAD_USERS}") for i in range(10**9))
        run_loop(closed_loop(port, requests, connections=LOAD_CONNECTIONS, duration=seconds))

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(seconds + TOOL_GRACE)


def native_profile(
    seconds: int, use_wrk: bool, backends: str, progress: Callable[[str], None]
) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="stickyproxy-bench-profile-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        ports, _, _ = start_backends(workdir, stack, backends)
        target = Target(TARGET_KINDS["stickyproxy"], 1, "stickyproxy")
        start_target(target, workdir, ports, stack)
        if not target.active or target.server is None:
            return {"status": "skipped", "reason": f"stickyproxy did not start: {target.reason}"}
        pid = target.server.proc.pid
        load_tool = "wrk" if use_wrk else "python closed loop"
        progress(
            f"profile: stickyproxy w1 under {load_tool}: /proc and perf for {seconds}s, "
            f"then py-spy for {seconds}s"
        )
        meter = CpuMeter(pid)
        with background_load(target.port, 2 * seconds + 2 * RAMP_SECONDS, use_wrk):
            time.sleep(RAMP_SECONDS)
            meter.start()
            perf = perf_profile(pid, seconds, workdir)
            used = meter.stop()
            pyspy = pyspy_profile(pid, seconds, workdir)
    for name, part in (("perf", perf), ("py-spy", pyspy)):
        if part["status"] != "ok":
            progress(f"profile: {name} skipped: {part['reason']}")
    total = used.total_s or 1.0
    return {
        "status": "ok",
        "seconds": seconds,
        "load": load_tool,
        "cpu_user_s": used.user_s,
        "cpu_system_s": used.system_s,
        "system_share_of_cpu": used.system_s / total,
        "perf": perf,
        "pyspy": pyspy,
    }


def run(smoke: bool, use_wrk: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    requests = SMOKE_HOTPATH_REQUESTS if smoke else HOTPATH_REQUESTS
    cost = hotpath.cost(requests, SMOKE_HOTPATH_ROUNDS if smoke else HOTPATH_ROUNDS)
    progress(
        f"profile: Python path {cost['us_per_request']:.1f} us/request "
        f"({cost['us_per_request_without_metrics']:.1f} without metrics)"
    )
    rows = hotpath.profile_rows(requests)
    backends = NGINX_BACKENDS if not missing_tools(["nginx"]) else PYTHON_BACKENDS
    native = native_profile(
        SMOKE_PROFILE_SECONDS if smoke else PROFILE_SECONDS, use_wrk, backends, progress
    )
    syscalls = syscalls_per_request(
        SMOKE_SYSCALL_REQUESTS if smoke else SYSCALL_REQUESTS, backends, progress
    )
    if syscalls["status"] != "ok":
        progress(f"profile: syscall count skipped: {syscalls['reason']}")
    return {
        "benchmark": "profile",
        "syscalls": syscalls,
        "hotpath": {
            "requests": requests,
            "rounds": SMOKE_HOTPATH_ROUNDS if smoke else HOTPATH_ROUNDS,
            **cost,
            "top_functions": rows,
        },
        "native": native,
    }
