"""docs/benchmarks.md, written from the results of `python -m bench`."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .failover import IDEMPOTENT_METHODS

HALF_LOAD_TARGET_MS = 2.0
WRITE_ACTIONS = ("add item", "increment")
THROUGHPUT_TARGET = 0.5
MET, MISSED, NOT_MEASURED = "met", "**missed**", "not measured"
REFERENCE = "stickyproxy"
INTERPRETED = "stickyproxy-py"  # bench/targets.py: the same, from its pure-Python sources


def dash(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, left: int = 1) -> str:
    """A Markdown table; the first `left` columns are left-aligned, the rest right-aligned."""
    rule = ["---" if i < left else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def workers(n: int) -> str:
    return f"{n} worker" + ("" if n == 1 else "s")


def duration(seconds: float) -> str:
    return f"{seconds:.0f} seconds" if seconds < 120 else f"{seconds / 60:.0f} minutes"


def image(path: Path | None, doc_dir: Path, alt: str) -> str:
    if path is None:
        return ""
    return f"![{alt}]({path.relative_to(doc_dir).as_posix()})"


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    verdict: str
    note: str = ""


def _stickyproxy_rows(dataplane: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in dataplane["targets"] if t["name"] == REFERENCE and t.get("summary")]


def _verdict(ok: bool | None) -> str:
    return NOT_MEASURED if ok is None else (MET if ok else MISSED)


def dataplane_verdicts(dataplane: dict[str, Any] | None) -> list[Verdict]:
    if not dataplane:
        return [
            Verdict("proxy throughput ≥ 0.5× NGINX", "-", NOT_MEASURED),
            Verdict("p99 added latency ≤ 2 ms at half of saturation", "-", NOT_MEASURED),
        ]
    out = []
    for t in _stickyproxy_rows(dataplane):
        r = t["ratio_to_nginx"]["rps"]
        out.append(
            Verdict(
                f"proxy throughput ≥ 0.5× NGINX ({workers(t['workers'])})",
                ratio(r),
                _verdict(None if r is None else r >= THROUGHPUT_TARGET),
            )
        )
    for group in dataplane.get("half_load") or []:
        row = next((t for t in group["targets"] if t["label"].split(" ")[0] == REFERENCE), None)
        added = row["added_p99_ms"] if row else None
        shared = "" if group.get("pinned") else ", sharing its CPUs with the load client"
        out.append(
            Verdict(
                f"p99 added latency ≤ 2 ms at half of saturation "
                f"({workers(group['workers'])}, {group['rate']:,.0f} req/s{shared})",
                "-" if added is None else f"{added:+.2f} ms",
                _verdict(None if added is None else added <= HALF_LOAD_TARGET_MS),
            )
        )
    return out


def ring_verdicts(ring: dict[str, Any] | None) -> list[Verdict]:
    if not ring:
        return [Verdict("ring lookup ≥ 500k keys/s in one process", "-", NOT_MEASURED)]
    rate = ring["lookups"]["owner_per_s"]
    return [
        Verdict(
            "ring lookup ≥ 500k keys/s in one process",
            f"{rate:,.0f} keys/s",
            _verdict(rate >= ring["lookups"]["target_per_s"]),
        )
    ]


def shop_verdicts(shop: dict[str, Any] | None) -> list[Verdict]:
    if not shop:
        return [
            Verdict("≥ 95% fewer Redis operations per request", "-", NOT_MEASURED),
            Verdict("higher throughput than the stateless app", "-", NOT_MEASURED),
        ]
    c = shop["comparison"]
    fewer = c["fewer_round_trips"]["median"]
    executed = c["fewer_commands_executed"]["median"]
    through = c["throughput_ratio"]["median"]
    return [
        Verdict(
            "≥ 95% fewer Redis operations per request (judged on round trips)",
            f"{pct(fewer)} fewer round trips ({pct(executed)} fewer commands executed)",
            _verdict(None if fewer is None else fewer >= c["target"]),
            f"mix with {pct(shop['settings']['write_share'], 0)} writes",
        ),
        Verdict(
            "higher throughput than the stateless app",
            ratio(through),
            _verdict(None if through is None else through > 1),
        ),
    ]


def rebalance_seconds(failover: dict[str, Any]) -> float:
    """Seconds after the kill until the last failed request (0 when none failed)."""
    return max(0.0, failover["last_failure_after_kill_s"] or 0.0)


def failover_verdicts(failover: dict[str, Any] | None) -> list[Verdict]:
    if not failover:
        return [Verdict("kill one of three under load", "-", NOT_MEASURED)]
    interval = failover["health_interval_s"]
    rebalance = rebalance_seconds(failover)
    idempotent = sum(
        v["requests"] for m, v in failover["by_method"].items() if m in IDEMPOTENT_METHODS
    )
    return [
        Verdict(
            "kill one of three: zero failed idempotent requests",
            f"{failover['failed_idempotent']} of {idempotent:,}",
            _verdict(failover["failed_idempotent"] == 0),
        ),
        Verdict(
            "kill one of three: zero lost context updates",
            f"{failover['lost_increments']} of "
            f"{failover['increments_acknowledged']:,} acknowledged increments",
            _verdict(failover["lost_increments"] == 0 and failover["unreadable_counters"] == 0),
        ),
        Verdict(
            "kill one of three: traffic rebalanced within one health-check interval",
            f"{rebalance:.2f} s (interval {interval:g} s)",
            _verdict(rebalance <= interval),
        ),
    ]


def summary_section(results: dict[str, dict[str, Any]]) -> str:
    verdicts = (
        dataplane_verdicts(results.get("dataplane"))
        + ring_verdicts(results.get("ring"))
        + shop_verdicts(results.get("shop"))
        + failover_verdicts(results.get("failover"))
        + killdrill_verdicts(results.get("killdrill"))
        + owners_verdicts(results.get("owners"))
        + tls_verdicts(results.get("tls"))
        + grpc_verdicts(results.get("grpc"))
    )
    rows = [
        (v.target, v.measured + (f" ({v.note})" if v.note else ""), v.verdict) for v in verdicts
    ]
    return "## DESIGN.md §8, target by target\n\n" + table(
        ("target", "measured", "verdict"), rows, left=3
    )


def dataplane_section(
    d: dict[str, Any],
    streams: dict[str, Any] | None,
    profile: dict[str, Any] | None,
    images: dict[str, Path | None],
    doc_dir: Path,
) -> str:
    s = d["settings"]
    rows = []
    for t in d["targets"]:
        if not t.get("summary"):
            rows.append((t["label"], f"{t['status']}: {t['reason']}", *["-"] * 9))
            continue
        m, r = t["summary"], t["ratio_to_nginx"]
        rows.append(
            (
                t["label"],
                f"{m['rps_median']:,.0f}",
                ratio(r["rps"]),
                " / ".join(f"{x:,.0f}" for x in m["rps_rounds"]),
                f"{m['p50_ms']:.2f}",
                f"{m['p99_ms']:.2f}",
                dash(m.get("cpu_us"), ".1f"),
                f"{dash(m.get('user_us'), '.1f')} / {dash(m.get('system_us'), '.1f')}",
                ratio(r.get("cpu")),
                m["non_2xx"],
                m["socket_errors"],
            )
        )
    parts = [
        "## 1. Data plane\n",
        (
            f"Three backends (one {d['backends']['kind']} process, `200 ok`), each proxy in front of "
            "them with the same hashing (`X-User-Id`, consistent) and keep-alive settings "
            "(bench/README.md lists the generated configurations). Load: `wrk -t1 "
            f"-c{s['connections']} -d{s['duration_s']:g}s`, a random user among {s['users']:,} per "
            f"request, {s['rounds']} interleaved rounds after a {s['warmup_s']:g} s warm-up. CPU per "
            "request is the utime+stime of the proxy's whole process tree (/proc) over the run, "
            "divided by the requests wrk completed.\n"
        ),
        table(
            (
                "target",
                "req/s",
                "x nginx",
                "rounds",
                "p50 ms",
                "p99 ms",
                "CPU µs/req",
                "user / sys µs",
                "CPU x nginx",
                "non-2xx",
                "sock err",
            ),
            rows,
        ),
        "\n" + image(images.get("dataplane"), doc_dir, "throughput and CPU per request"),
    ]
    parts.append(half_load_section(d, images, doc_dir))
    if streams:
        parts.append(streams_section(streams, images, doc_dir))
    if profile:
        parts.append(profile_section(profile, d))
    return "\n".join(parts)


def half_load_section(d: dict[str, Any], images: dict[str, Path | None], doc_dir: Path) -> str:
    groups = d.get("half_load") or []
    if not groups:
        return ""
    rows = []
    for g in groups:
        for t in g["targets"]:
            rows.append(
                (
                    g["workers"],
                    t["label"],
                    f"{g['rate']:,.0f}",
                    f"{t['achieved_rps']:,.0f}",
                    f"{t['p50_ms']:.2f}",
                    f"{t['p99_ms']:.2f}",
                    f"{t['p999_ms']:.2f}",
                    "-" if t["added_p99_ms"] is None else f"{t['added_p99_ms']:+.2f}",
                    "-"
                    if not t["added_p99_rounds_ms"]
                    else " / ".join(f"{x:+.2f}" for x in t["added_p99_rounds_ms"]),
                    t["errors"],
                )
            )
    basis = "; ".join(f"{workers(g['workers'])}: {g['rate_basis']}" for g in groups)
    placements = "; ".join(
        f"{workers(g['workers'])}: {g.get('placement', 'not pinned')}" for g in groups
    )
    return "\n".join(
        [
            "\n### Latency at half of saturation\n",
            (
                "An open-loop client (bench/httpclient.py: requests issued on a fixed schedule whatever "
                "the answers, those due within the same millisecond together as wrk2 does, 64 "
                "connections at most, latency counted from the moment a request is issued, including "
                "any wait for a free connection; uvloop, its garbage collector off during a run) sends "
                "the same rate straight to a backend (`direct`) and through each proxy, "
                f"{groups[0]['rounds']} interleaved rounds of {groups[0]['duration_s']:g} s. Rate: "
                f"{basis}. CPUs: {placements}. *Added p99* is the proxy's p99 minus the direct p99 "
                "of the same round, median over rounds. wrk2 is not used (not packaged); the client "
                "is Python, so the direct figures include its own scheduling delays, which the "
                "subtraction removes. Pinning (bench/placement.py) keeps the client, which costs about "
                "as much CPU per request as a proxy, off the proxy's cores, as a separate load machine "
                "would; every target is placed alike. On this shared machine slow requests also come "
                "in clusters of 100–300 ms that hit whichever target is running at the time, so a "
                "single round's p99 can move by tens of milliseconds; the median over rounds damps "
                "that and the per-round column shows it.\n"
            ),
            table(
                (
                    "workers",
                    "target",
                    "rate",
                    "achieved",
                    "p50 ms",
                    "p99 ms",
                    "p99.9 ms",
                    "added p99 ms",
                    "added p99 per round",
                    "errors",
                ),
                rows,
                left=2,
            ),
            "\n" + image(images.get("half_load"), doc_dir, "latency at half load"),
            half_load_note(d),
        ]
    )


def half_load_note(d: dict[str, Any]) -> str:
    """Why stickyproxy's added p99 exceeds the target, when it does."""
    missed, shared = [], []
    for g in d.get("half_load") or []:
        row = next((t for t in g["targets"] if t["label"].split(" ")[0] == REFERENCE), None)
        if row and row["added_p99_ms"] is not None and row["added_p99_ms"] > HALF_LOAD_TARGET_MS:
            (missed if g.get("pinned") else shared).append(workers(g["workers"]))
    cpu = [t["ratio_to_nginx"]["cpu"] for t in _stickyproxy_rows(d) if t["ratio_to_nginx"]["cpu"]]
    if not (missed or shared) or not cpu:
        return ""
    times = f"{min(cpu):.1f}" if len(cpu) == 1 else f"{min(cpu):.1f} to {max(cpu):.1f}"
    out = [
        f"\nAt the same request rate stickyproxy spends {times} times NGINX's CPU per "
        "request (table above), so its queueing tail is longer at any given rate."
    ]
    if missed:
        out.append(f"The target is missed with {' and '.join(missed)} on cores of its own.")
    if shared:
        out.append(
            f"With {' and '.join(shared)} there is no core to spare for pinning: "
            "the proxy shares the machine's CPUs with the load client and the backends, "
            "so its figure includes waiting for a core they hold, and it is missed."
        )
    out.append(
        "Read it together with the per-round values: a round disturbed by other work "
        "on the machine moves it by milliseconds."
    )
    return " ".join(out)


def streams_section(st: dict[str, Any], images: dict[str, Path | None], doc_dir: Path) -> str:
    up_rows = [
        (
            u["label"],
            f"{u['size_mib']} MiB",
            len(u["runs"][0]["seconds"]),
            f"{u['median_ms']:,.1f}",
            f"{u['mib_per_s']:,.0f}",
            ratio(u["x_direct"]),
            dash(u["cpu_ms_per_mib"], ".2f"),
        )
        for u in sorted(st["uploads"], key=lambda u: (u["size_mib"], u["label"] != "direct"))
    ]
    ws_rows = [
        (
            w["label"],
            f"{w['messages_per_s']:,.0f}",
            ratio(w["x_direct"]),
            f"{w['rtt_p50_ms']:.2f}",
            f"{w['rtt_p99_ms']:.2f}",
            dash(w["cpu_us_per_message"], ".1f"),
        )
        for w in st["websocket"]
    ]
    failures = "".join(f"\n- {label}: {reason}" for label, reason in st["failures"].items())
    ws = st["ws"]
    return "\n".join(
        [
            "\n### Large bodies and WebSocket\n",
            (
                "Backends: bench/backend.py (aiohttp, one process on three ports), which reads a whole "
                "upload before answering and echoes WebSocket messages; the proxies as above, 1 worker "
                "(NGINX with `proxy_request_buffering off` and `client_max_body_size 0`, so it streams "
                "the body as the others do). Uploads: POSTs on one keep-alive connection, time from "
                "the first byte sent to the whole answer; CPU ms/MiB is the proxy's. WebSocket: "
                f"{ws['connections']} connections, one {ws['payload_bytes']}-byte message in flight on "
                f"each, {ws['duration_s']:g} s; medians of {st['rounds']} interleaved rounds.\n"
            ),
            table(
                (
                    "target",
                    "body",
                    "requests/round",
                    "ms per request",
                    "MiB/s",
                    "x direct",
                    "proxy CPU ms/MiB",
                ),
                up_rows,
            ),
            "",
            table(
                (
                    "target",
                    "messages/s",
                    "x direct",
                    "round trip p50 ms",
                    "p99 ms",
                    "proxy CPU µs/message",
                ),
                ws_rows,
            ),
            ("\nNot measured:" + failures) if failures else "",
            "\n" + image(images.get("streams"), doc_dir, "uploads and WebSocket"),
        ]
    )


def profile_section(p: dict[str, Any], d: dict[str, Any]) -> str:
    hp = p["hotpath"]
    fn_rows = [
        (
            f"`{r['function']}`",
            r["where"],
            f"{r['calls_per_request']:.1f}",
            f"{r['own_us_per_request']:.2f}",
            pct(r["own_share"]),
        )
        for r in hp["top_functions"][:12]
    ]
    parts = [
        "\n### Where the time goes\n",
        (
            "**The Python path alone** (bench/hotpath.py: a request and its response fed through "
            "the protocol objects in memory, no sockets; CPU time, best of "
            f"{hp.get('rounds', 1)} runs of {hp['requests']:,} requests): "
            f"{hp['us_per_request']:.1f} µs per request "
            f"({hp['us_per_request_without_metrics']:.1f} µs with metrics off). cProfile, own time "
            "per request:\n"
        ),
        table(("function", "where", "calls/req", "own µs/req", "share"), fn_rows, left=2),
    ]
    parts.append(syscalls_text(p.get("syscalls") or {}))
    native = p["native"]
    if native.get("status") != "ok":
        parts.append(f"\nThe running proxy was not profiled: {native.get('reason')}.")
    else:
        parts.append(native_profile_text(native))
    parts.append(dataplane_explanation(d, p))
    return "\n".join(parts)


SYSCALL_GROUPS = (
    ("reads", ("read", "readv", "recvfrom", "recvmsg")),
    ("writes", ("write", "writev", "sendto", "sendmsg")),
    ("epoll", ("epoll_wait", "epoll_pwait", "epoll_pwait2", "epoll_ctl")),
)


def syscalls_text(sc: dict[str, Any]) -> str:
    if sc.get("status") != "ok":
        return f"\nSyscalls per request were not counted: {sc.get('reason', 'not run')}."
    rows = []
    for label, counted in sc["targets"].items():
        calls = counted["per_request"]
        grouped = {name: sum(calls.get(c, 0) for c in members) for name, members in SYSCALL_GROUPS}
        known = {c for _, members in SYSCALL_GROUPS for c in members}
        others = {c: v for c, v in calls.items() if c not in known}
        rows.append(
            (
                label,
                f"{counted['total_per_request']:.2f}",
                *[f"{grouped[name]:.2f}" for name, _ in SYSCALL_GROUPS],
                f"{sum(others.values()):.2f}",
                ", ".join(f"{c} {v:.2f}" for c, v in calls.items() if v >= 0.005),
            )
        )
    return "\n".join(
        [
            (
                f"\n**Syscalls per request** (`strace -c` attached to every thread of each proxy, 1 "
                f"worker, while it serves {sc['requests']:,} GETs on {sc['connections']} keep-alive "
                "connections; strace slows the proxy down, the counts stay right):\n"
            ),
            table(("proxy", "all", *[name for name, _ in SYSCALL_GROUPS], "other", "calls"), rows),
        ]
    )


def native_profile_text(native: dict[str, Any]) -> str:
    parts = [
        (
            f"\n**The running proxy** (1 worker, under {native['load']}, {native['seconds']} s "
            "each): /proc counts "
            f"{pct(native['system_share_of_cpu'])} of its CPU time in the kernel "
            f"({native['cpu_user_s']:.2f} s user, {native['cpu_system_s']:.2f} s system)."
        ),
    ]
    perf = native["perf"]
    if perf["status"] == "ok":
        rows = [(k, pct(v)) for k, v in perf["share"].items() if v]
        top = [(f"`{t['symbol']}`", pct(t["share"])) for t in perf["top_symbols"][:6]]
        parts += [
            f"\n`{perf['command']}` samples what the CPU is doing (on-CPU only):\n",
            table(("on-CPU samples of the proxy", "share"), rows),
            "",
            table(("busiest symbols", "share"), top),
        ]
    else:
        parts.append(f"\nperf: {perf['reason']}.")
    spy = native["pyspy"]
    if spy["status"] == "ok":
        busy = spy["busy_share"]
        in_syscalls = sum(v for k, v in busy.items() if k.startswith("syscall"))
        rows = [(k, pct(v)) for k, v in busy.items() if v]
        top = [(f"`{f['function']}`", pct(f["share_of_busy"])) for f in spy["top_functions"][:8]]
        parts += [
            (
                f"\n`{spy['command']}` samples wall-clock time with Python frames: "
                f"{spy['samples']:,} samples, {pct(spy['idle_share_of_all'])} waiting in epoll; of "
                f"the rest, {pct(in_syscalls)} are inside a syscall. That share is larger than "
                "the kernel's share of CPU above because a write on loopback wakes the peer "
                "(wrk or a backend) and, on two oversubscribed cores, the proxy is often preempted "
                "right there and sampled while it waits for a CPU. Its Python frames show which "
                "functions the interpreter time belongs to:\n"
            ),
            table(("wall-clock samples, innermost frame", "share"), rows),
            "",
            table(("stickyproxy function (innermost own frame)", "share"), top),
        ]
    else:
        parts.append(f"\npy-spy: {spy['reason']}.")
    return "\n".join(parts)


def dataplane_explanation(d: dict[str, Any], p: dict[str, Any]) -> str:
    ours = {t["workers"]: t for t in _stickyproxy_rows(d)}
    nginx = {t["workers"]: t for t in d["targets"] if t["name"] == "nginx" and t.get("summary")}
    lines = []
    for count, t in sorted(ours.items()):
        n = nginx.get(count)
        if not n or not t["summary"].get("cpu_us") or not n["summary"].get("cpu_us"):
            continue
        a, b = t["summary"], n["summary"]
        user, kernel = a["user_us"] - b["user_us"], a["system_us"] - b["system_us"]
        lines.append(
            f"- {workers(count)}: stickyproxy uses {a['cpu_us']:.1f} µs of CPU per request "
            f"({a['user_us']:.1f} user + {a['system_us']:.1f} kernel), NGINX {b['cpu_us']:.1f} "
            f"({b['user_us']:.1f} + {b['system_us']:.1f}): {user:+.1f} µs in user space and "
            f"{kernel:+.1f} µs in the kernel, so {pct(user / (user + kernel), 0)} of the "
            "difference is user space."
        )
    if not lines:
        return ""
    missed = [
        workers(c)
        for c, t in sorted(ours.items())
        if (t["ratio_to_nginx"]["rps"] or 0) < THROUGHPUT_TARGET
    ]
    heading = (
        f"Why the throughput target is missed ({' and '.join(missed)})"
        if missed
        else "Where stickyproxy's CPU goes"
    )
    if "(compiled)" in d.get("tools", {}).get("stickyproxy", ""):
        what = (
            "the protocol callbacks, header handling, routing and metrics, compiled with "
            "mypyc but still working on Python objects through the C API (a bytes object "
            "per header, a dict and tuple per metric)"
        )
        profile = "cProfile sees each compiled callback as one opaque entry"
    else:
        what = (
            "the interpreter running the protocol callbacks, header handling, routing and metrics"
        )
        profile = "cProfile table above"
    user_part = (
        f"- The user-space part is {what}: that path alone costs "
        f"{p['hotpath']['us_per_request']:.1f} µs per request without any I/O "
        f"({profile}), and in the running process the event-loop callbacks, "
        "allocation and caches shared with wrk and the backends add to it. Closing "
        "the gap means less work per request, not fewer syscalls."
    )
    return "\n".join(
        [
            f"\n**{heading}.**",
            *lines,
            *compile_lines(d),
            *kernel_lines(p),
            user_part,
            (
                "- On two cores shared with wrk and the backends every µs per request is "
                "throughput lost at saturation; a second worker gives stickyproxy more of "
                "the machine, while NGINX is already limited by wrk and the backends."
            ),
        ]
    )


def compile_lines(d: dict[str, Any]) -> list[str]:
    """What compiling the hot path buys: the compiled and interpreted builds, same run."""

    def rows(name: str) -> dict[int, dict[str, Any]]:
        return {
            t["workers"]: t["summary"]
            for t in d["targets"]
            if t["name"] == name and t.get("summary") and t["summary"].get("cpu_us")
        }

    compiled, interpreted = rows(REFERENCE), rows(INTERPRETED)
    out = []
    for count in sorted(set(compiled) & set(interpreted)):
        c, i = compiled[count], interpreted[count]
        out.append(
            f"- Compiled against interpreted ({workers(count)}, same run): "
            f"{c['cpu_us']:.1f} against {i['cpu_us']:.1f} µs of CPU per request "
            f"({c['cpu_us'] / i['cpu_us'] - 1:+.0%}), {c['rps_median']:,.0f} against "
            f"{i['rps_median']:,.0f} req/s ({c['rps_median'] / i['rps_median']:.2f}x)."
        )
    return out


def kernel_lines(p: dict[str, Any]) -> list[str]:
    """What the syscall count and the on-CPU profile say about the kernel part."""
    sc = p.get("syscalls") or {}
    perf = (p.get("native") or {}).get("perf") or {}
    if sc.get("status") != "ok" or "stickyproxy" not in sc["targets"]:
        return []
    ours = sc["targets"]["stickyproxy"]["total_per_request"]
    others = ", ".join(
        f"{name} {c['total_per_request']:.2f}"
        for name, c in sc["targets"].items()
        if name != "stickyproxy"
    )
    text = (
        f"- The kernel part is not more syscalls: stickyproxy makes {ours:.2f} per request "
        f"({others}), the same two reads and two writes as the others."
    )
    if perf.get("status") == "ok":
        scheduler = perf["share"].get("kernel: scheduler (switches, wake-ups)", 0.0)
        network = perf["share"].get("kernel: TCP/IP over loopback", 0.0)
        text += (
            f" perf puts {pct(scheduler, 0)} of its on-CPU samples in the scheduler "
            f"(context switches and wake-ups) and {pct(network, 0)} in loopback TCP/IP."
        )
    return [text]


def shop_section(sh: dict[str, Any], images: dict[str, Path | None], doc_dir: Path) -> str:
    s, c = sh["settings"], sh["comparison"]
    m = sh["modes"]
    mix = ", ".join(f"{name} {w}" for name, w in s["mix"].items())
    rows = []
    for mode, v in m.items():
        rows.append(
            (
                mode,
                f"{v['rps']:,.0f}",
                " / ".join(f"{x:,.0f}" for x in v["rps_rounds"]),
                f"{v['p50_ms']:.2f}",
                f"{v['p99_ms']:.2f}",
                f"{v['round_trips_per_request']:.3f}",
                f"{v['commands_sent_per_request']:.3f}",
                f"{v['commands_executed_per_request']:.3f}",
                int(v["acquisitions"]),
                v["non_2xx"],
                v["socket_errors"],
            )
        )
    cmp_rows = [
        (
            "fewer Redis round trips / request",
            pct(c["fewer_round_trips"]["median"]),
            " / ".join(pct(x) for x in c["fewer_round_trips"]["rounds"]),
        ),
        (
            "fewer commands sent / request",
            pct(c["fewer_commands_sent"]["median"]),
            " / ".join(pct(x) for x in c["fewer_commands_sent"]["rounds"]),
        ),
        (
            "fewer commands executed / request",
            pct(c["fewer_commands_executed"]["median"]),
            " / ".join(pct(x) for x in c["fewer_commands_executed"]["rounds"]),
        ),
        (
            "throughput, sticky / stateless",
            ratio(c["throughput_ratio"]["median"]),
            " / ".join(ratio(x) for x in c["throughput_ratio"]["rounds"]),
        ),
        (
            "p99, sticky / stateless",
            ratio(c["p99_ratio"]["median"]),
            " / ".join(ratio(x) for x in c["p99_ratio"]["rounds"]),
        ),
    ]
    action_rows = []
    for action in sh["per_action"]["sticky"]:
        a, b = sh["per_action"]["sticky"][action], sh["per_action"]["stateless"][action]
        action_rows.append(
            (
                action,
                f"{a['redis']['round_trips_per_request']:.3f}",
                f"{b['redis']['round_trips_per_request']:.3f}",
                f"{a['redis']['commands_executed_per_request']:.3f}",
                f"{b['redis']['commands_executed_per_request']:.3f}",
                _top_commands(a["redis"]["client_by_command"]),
                _top_commands(b["redis"]["client_by_command"]),
                f"{a['rps']:,.0f}",
                f"{b['rps']:,.0f}",
            )
        )
    sweep_rows = [
        (
            pct(r["write_share"], 0),
            (
                f"{r['round_trips_per_request']['sticky']:.3f} / "
                f"{r['round_trips_per_request']['stateless']:.3f}"
            ),
            pct(r["round_trips_per_request"]["fewer"]),
            pct(r["commands_executed_per_request"]["fewer"]),
        )
        for r in sh["write_share_sweep"]
    ]
    fewer = c["fewer_round_trips"]["median"]
    breakeven = breakeven_write_share(sh)
    verdict = "meets" if fewer is not None and fewer >= c["target"] else "misses"
    return "\n".join(
        [
            "## 2. Sticky vs stateless: the shop\n",
            (
                f"The example shop, {s['instances']} instances per mode, one private redis-server "
                f"(started by the benchmark on a free port). **sticky**: cart and counter in the context "
                f"library, rate limit in memory; proxy: {s['proxy']['sticky']}. **stateless** "
                f"(`--stateless`): everything in Redis on every request; proxy: {s['proxy']['stateless']} "
                "— the same proxy code for both, so the difference is the app's design. Rate limit "
                "raised so that no benchmark user is refused (the stateless limiter still does its "
                f"Redis work on every request). Load: {s['load_tool']}, {s['connections']} connections, "
                f"{s['users']:,} users, mix (weights): {mix} — {pct(s['write_share'], 0)} of requests "
                f"change state. Every user was touched once and each mode warmed up for "
                f"{s['warmup_s']:g} s before {s['rounds']} interleaved rounds of {s['duration_s']:g} s "
                "(steady state: the *acquisitions* column counts rehydrations during the rounds).\n"
            ),
            (
                "Redis cost per request answered by the instances (the denominator is the instances' own "
                "request counters): *round trips* are writes of a command or a pipeline by the apps, "
                "each waited on, counted inside the app processes (bench/shopapp.py wraps redis-py's "
                "send); *commands sent* count each command in them (an `EVALSHA` is one, the stateless "
                "rate limiter's pipelined `INCRBY`+`PEXPIRE` two); *commands executed* come from Redis's "
                "`INFO commandstats`, which also counts what a Lua script runs inside the server (the "
                "context library's fenced write, `EVALSHA` running `HMGET`, `HSET`, `PEXPIRE`, counts 4). "
                "**The ≥ 95% claim is judged on round trips**, what a request waits for; for the stateless "
                "app they are fewer than its commands (one pipeline carries two), so this is the "
                "stricter reading.\n"
            ),
            table(
                (
                    "mode",
                    "req/s",
                    "rounds",
                    "p50 ms",
                    "p99 ms",
                    "round trips/req",
                    "commands sent/req",
                    "commands executed/req",
                    "acquisitions",
                    "non-2xx",
                    "sock err",
                ),
                rows,
            ),
            "",
            table(("sticky vs stateless, same round", "median", "rounds"), cmp_rows),
            "\n" + image(images.get("shop"), doc_dir, "sticky vs stateless"),
            (
                "\nEach action on its own (one run each, "
                f"{s['action_duration_s']:g} s), what it costs in each mode:\n"
            ),
            table(
                (
                    "action",
                    "round trips sticky",
                    "stateless",
                    "executed sticky",
                    "stateless",
                    "sent by sticky",
                    "sent by stateless",
                    "req/s sticky",
                    "stateless",
                ),
                action_rows,
            ),
            (
                "\nThe reduction therefore depends on how many requests change state. From the "
                "single-action costs, reweighting reads and writes:\n"
            ),
            table(
                (
                    "requests that change state",
                    "round trips/req sticky / stateless",
                    "fewer round trips",
                    "fewer commands executed",
                ),
                sweep_rows,
            ),
            "\n" + image(images.get("shop_sweep"), doc_dir, "reduction against write share"),
            shop_conclusion(sh, verdict, fewer, breakeven),
        ]
    )


def _mean_round_trips(runs: dict[str, dict[str, Any]], actions: list[str]) -> float:
    values = [runs[a]["redis"]["round_trips_per_request"] for a in actions]
    return sum(values) / len(values) if values else 0.0


def shop_conclusion(
    sh: dict[str, Any], verdict: str, fewer: float | None, breakeven: float | None
) -> str:
    per_action = sh["per_action"]
    writes = [a for a, w in sh["settings"]["mix"].items() if a in WRITE_ACTIONS and w]
    reads = [a for a in per_action["sticky"] if a not in WRITE_ACTIONS]
    sticky_write = _mean_round_trips(per_action["sticky"], writes)
    sticky_read = _mean_round_trips(per_action["sticky"], reads)
    stateless = _mean_round_trips(per_action["stateless"], list(per_action["stateless"]))
    return (
        f"\nThis mix {verdict} the ≥ 95% target: {pct(fewer)} fewer round trips. In steady "
        f"state a sticky read costs {sticky_read:.2f} Redis round trips and a change "
        f"{sticky_write:.2f} (one fenced `EVALSHA`), while a stateless request costs "
        f"{stateless:.2f} whatever it does (the rate limiter's pipeline, then the state), so "
        f"the reduction is about 1 − {sticky_write:.2f} × (write share) / {stateless:.2f}"
        + (
            f" and reaches 95% when at most {pct(breakeven)} of requests change state."
            if breakeven is not None
            else "."
        )
        + write_throughput_note(per_action, writes)
    )


def write_throughput_note(per_action: dict[str, dict[str, Any]], writes: list[str]) -> str:
    sticky = sum(per_action["sticky"][a]["rps"] for a in writes)
    stateless = sum(per_action["stateless"][a]["rps"] for a in writes)
    if not writes or not stateless:
        return ""
    if sticky < stateless:
        return (
            f" Writes alone are slower in sticky mode ({sticky / stateless:.2f}x the stateless "
            "req/s in the single-action runs): each change runs the fencing script (a read "
            "and two writes inside Redis) and serializes the user's whole context; the gain "
            "is in reads, which cost no Redis call at all."
        )
    return (
        f" Writes alone are also faster in sticky mode ({sticky / stateless:.2f}x the "
        "stateless req/s in the single-action runs)."
    )


def _top_commands(by_command: dict[str, float], limit: int = 3) -> str:
    total = sum(by_command.values()) or 1
    top = sorted(by_command.items(), key=lambda kv: kv[1], reverse=True)[:limit]
    return ", ".join(f"{name} {n / total:.0%}" for name, n in top) or "none"


def breakeven_write_share(sh: dict[str, Any]) -> float | None:
    """Largest share of state-changing requests at which round trips are still ≥ 95% fewer
    (linear in the share, from the sweep's end points)."""
    rows = sh["write_share_sweep"]
    if len(rows) < 2:
        return None
    (w0, r0), (w1, r1) = [
        (r["write_share"], r["round_trips_per_request"]) for r in (rows[0], rows[-1])
    ]
    keep = 1 - sh["comparison"]["target"]

    def line(key: str) -> tuple[float, float]:
        slope = (r1[key] - r0[key]) / (w1 - w0)
        return r0[key] - slope * w0, slope

    a, b = line("sticky")
    c, d = line("stateless")
    denominator = b - keep * d
    if denominator <= 0:
        return None
    return max(0.0, min(1.0, (keep * c - a) / denominator))


def failover_section(f: dict[str, Any], images: dict[str, Path | None], doc_dir: Path) -> str:
    s = f["settings"]
    h = s["health"]
    method_rows = [
        (m, f"{v['requests']:,}", v["failed"]) for m, v in sorted(f["by_method"].items())
    ]
    kinds = ", ".join(f"{k}: {v}" for k, v in f["failure_kinds"].items()) or "none"
    moments = [
        ("killed (SIGKILL) at", f"{f['kill_s']:.2f} s"),
        ("proxy's admin API showed it not up after", _secs(f["proxy_saw_down_after_s"])),
        (
            "last failed request after the kill",
            _secs(f["last_failure_after_kill_s"], "none failed"),
        ),
        (
            "first whole second without failures after the kill",
            dash(f["first_clean_second_after_kill"]) + " s",
        ),
        ("started again at", f"{f['restart_s']:.2f} s"),
        ("…accepting connections after", _secs(_minus(f["restarted_accepting_s"], f["restart_s"]))),
        ("…shown up by the proxy after", _secs(f["proxy_saw_up_after_restart_s"])),
        ("…serving its users again after", _secs(f["first_served_after_restart_s"])),
    ]
    state_rows = [(f"{b:.2f}", f"{e:.2f}", state) for b, e, state in f.get("victim_states", [])]
    context_rows = []
    for label, apps in f["context"].items():
        for app, v in sorted(apps.items()):
            acq = v["acquisitions"]
            context_rows.append(
                (
                    label.replace("_", " "),
                    app,
                    int(acq.get("first", 0)),
                    int(acq.get("takeover", 0)),
                    int(acq.get("revalidate", 0)),
                    int(v["takeovers_received"]),
                    int(v["conflicts"]),
                )
            )
    return "\n".join(
        [
            "## 3. Failover drill\n",
            f"Three shop instances (sticky mode) behind stickyproxy, health checks every "
            f"{h['interval']} (timeout {h['timeout']}, rise {h['rise']}, fall {h['fall']}), passive "
            f"checks at their defaults. The open-loop client sends {s['rate']:g} requests/s for "
            f"{s['duration_s']:g} s from {s['users']} users (mix: "
            + ", ".join(f"{k} {v}" for k, v in s["mix"].items())
            + f"); {s['victim']} is killed with SIGKILL at {s['kill_at_s']:g} s and started again "
            f"at {s['restart_at_s']:g} s. The client never retries. At the end every user's counter "
            "is read through the proxy and compared with the increments acknowledged (200) to that "
            "user.\n",
            table(("method", "requests", "failed"), method_rows),
            (
                f"\nFailures by kind: {kinds}. Latency p99 over the drill: "
                f"{dash(f['latency_p99_ms'], '.2f')} ms.\n"
            ),
            table(("moment", "seconds"), moments),
            (
                f"\n{s['victim']} as the proxy's admin API (`GET /backends`, polled every 0.1 s) "
                "showed it:\n"
            ),
            table(("from s", "to s", "state"), state_rows, left=3),
            f"\nThe proxy's log about {s['victim']}:\n",
            table(
                ("s", "log line"),
                [(f"{t:.2f}", msg.replace("|", "\\|")) for t, msg in f.get("proxy_log", [])],
                left=2,
            ),
            restart_note(f),
            "",
            table(
                ("counter increments", "count"),
                [
                    ("acknowledged", f"{f['increments_acknowledged']:,}"),
                    ("lost (acknowledged but missing at the end)", f["lost_increments"]),
                    (
                        "applied but not acknowledged (request failed after the write)",
                        f["unacknowledged_but_applied"],
                    ),
                    ("counters that could not be read at the end", f["unreadable_counters"]),
                ],
            ),
            (
                "\nRehydrations (`stickyctx_acquisitions_total` by reason), takeover messages and write "
                "conflicts, from each instance's /metrics (a killed instance's counters die with it; "
                "the restarted one counts from its start):\n"
            ),
            table(
                (
                    "when",
                    "instance",
                    "first",
                    "takeover",
                    "revalidate",
                    "takeovers received",
                    "conflicts",
                ),
                context_rows,
                left=2,
            ),
            "\n" + image(images.get("failover"), doc_dir, "requests per second per instance"),
            (
                "\nA killed instance's port refuses connections at once, and a refused connect is "
                "retried on the key's next backend whatever the method (nothing was sent), so its users "
                "are served by their fallbacks from the next request on; a request in flight on it at "
                "the moment of the kill can fail (a POST is not retried). Coming back is paced by the "
                f"active checks: rise {h['rise']} × {h['interval']}, plus the instance's own start-up."
            ),
        ]
    )


def restart_note(f: dict[str, Any]) -> str:
    """What kept the restarted instance out of routing, if anything did."""
    restart = f["restart_s"]
    ejected = [(b, e) for b, e, state in f.get("victim_states", []) if state == "ejected"]
    served = f["first_served_after_restart_s"]
    if not ejected:
        return ""
    begin, end = ejected[-1]
    back = (
        f"its users came back {served:.1f} s after the restart"
        if served is not None
        else "it got no request again before the drill ended"
    )
    return (
        f"\nAfter the restart the active checks passed, but the proxy showed the instance "
        f"`ejected` from {begin:.1f} s to {end:.1f} s ({end - restart:.1f} s after the "
        f"restart): passive health had ejected it for `base_ejection` (30 s by default) after "
        f"the failed exchanges at the kill, and an ejection is not lifted by passing active "
        f"checks. So {back}. (Envoy lifts an outlier ejection on a successful active check by "
        f"default; HAProxy has no separate ejection.)"
    )


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _secs(value: float | None, none: str = "-") -> str:
    return none if value is None else f"{value:.2f} s"


def ring_section(r: dict[str, Any], images: dict[str, Path | None], doc_dir: Path) -> str:
    lk = r["lookups"]
    bal = [
        (
            b["backends"],
            b["vnodes"],
            f"{b['max_over_avg']:.3f}",
            f"{b['min_over_avg']:.3f}",
            f"{b['keys_max_over_avg']:.3f}",
        )
        for b in r["balance"]
    ]
    mv = [
        (
            m["backends"],
            m["vnodes"],
            pct(m["added"]),
            pct(m["added_ideal"]),
            "yes" if m["added_only_to_new"] else "**no**",
            pct(m["removed"]),
            pct(m["removed_ideal"]),
            "yes" if m["removed_only_from_leaver"] else "**no**",
        )
        for m in r["movement"]
    ]
    return "\n".join(
        [
            "## 4. The ring\n",
            (
                f"`stickyproxy.routing.ring.Ring`, {lk['backends']} backends, {lk['vnodes']} vnodes, "
                f"{lk['keys']:,} distinct keys, best of {lk['repeats']} passes, one process:\n"
            ),
            table(
                ("lookup", "keys/s"),
                [
                    (
                        "`owner(key)`, a key's first lookup (the proxy's hot path)",
                        f"{lk['owner_per_s']:,.0f}",
                    ),
                    *(
                        [
                            (
                                "`owner(key)` again (from the ring's owner cache)",
                                f"{lk['owner_repeat_per_s']:,.0f}",
                            )
                        ]
                        if "owner_repeat_per_s" in lk
                        else []
                    ),
                    ("`pick(key)` (owner as a `Pick`)", f"{lk['pick_per_s']:,.0f}"),
                    (
                        "`preference(key)` (the whole failover order)",
                        f"{lk['preference_per_s']:,.0f}",
                    ),
                ],
            ),
            (
                "\nBalance: the largest and smallest backend's share of the hash space against the "
                f"average (exact), and the largest count of {r['balance'][0]['sample_keys']:,} sampled "
                "user keys against the average:\n"
            ),
            table(
                ("backends", "vnodes", "max/avg (exact)", "min/avg (exact)", "max/avg (keys)"), bal
            ),
            (
                "\nMovement (exact share of the hash space): adding backend N+1, and removing one of N, "
                "against the ideal 1/(N+1) and 1/N; and whether every moved key went to the new backend "
                "/ came from the removed one (P2):\n"
            ),
            table(
                (
                    "backends",
                    "vnodes",
                    "moved on add",
                    "ideal",
                    "all to the new one",
                    "moved on remove",
                    "ideal",
                    "all from the removed one",
                ),
                mv,
            ),
            "\n" + image(images.get("ring"), doc_dir, "ring balance and movement"),
        ]
    )


DRILL_NAMES = {"nginx": "NGINX", "haproxy": "HAProxy", "stickyproxy": "stickyproxy"}


def _drill_measured(k: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in k["targets"] if t.get("status") == "ok"}


def killdrill_verdicts(k: dict[str, Any] | None) -> list[Verdict]:
    every = f" {k['settings']['period_s']:g} s" if k else ""
    target = (
        f"kill one of three every{every} under load, beside NGINX and HAProxy: zero failed GETs"
    )
    ours = _drill_measured(k).get(REFERENCE) if k else None
    if not k or ours is None:
        return [Verdict(target, "-", NOT_MEASURED)]
    others = ", ".join(
        f"{DRILL_NAMES[n]} {t['failed']:,}" for n, t in _drill_measured(k).items() if n != REFERENCE
    )
    measured = f"{ours['failed']:,} of {ours['answered'] + ours['failed']:,}"
    return [
        Verdict(
            target, measured + (f" ({others})" if others else ""), _verdict(ours["failed"] == 0)
        )
    ]


def drill_configuration(name: str, s: dict[str, Any]) -> str:
    """How the drill configured each proxy (bench/targets.py `*_drill_launch`)."""
    h, n = s["health"], s["nginx"]
    if name == "nginx":
        return (
            f"`hash $http_x_user_id consistent`, `max_fails={n['max_fails']} "
            f"fail_timeout={n['fail_timeout']}` (passive only: open-source NGINX has no "
            f"active checks), `keepalive {n['keepalive']}`, `proxy_next_upstream error "
            f"timeout http_502`, `proxy_next_upstream_tries {n['tries']}`"
        )
    if name == "haproxy":
        return (
            f"`balance hdr(X-User-Id)`, `hash-type consistent`, `option redispatch`, "
            f"`retries {s['haproxy']['retries']}`, `retry-on conn-failure empty-response "
            f"response-timeout`, `option httpchk GET /` with `check inter "
            f"{h['interval_ms']} fall {h['fall']} rise {h['rise']}`, `http-reuse always`"
        )
    return (
        f'its defaults, plus `[health] interval = "{h["interval_ms"]}ms"`, '
        f'`timeout = "{h["interval_ms"]}ms"` (it may not exceed the interval), '
        f"`fall = {h['fall']}`, `rise = {h['rise']}`"
    )


def _counts(values: dict[str, float]) -> str:
    return (
        ", ".join(f"{k or '-'} {v:,.0f}" for k, v in sorted(values.items(), key=lambda kv: -kv[1]))
        or "none"
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def drill_counter_rows(name: str, counters: dict[str, Any]) -> list[tuple[str, str, str]]:
    label = DRILL_NAMES[name]
    if "unavailable" in counters:
        return [(label, "its own counters", f"not read: {counters['unavailable']}")]
    if name == "stickyproxy":
        return [
            (
                label,
                "`stickyproxy_retries_total` by reason",
                _counts(counters.get("retries_total", {})),
            ),
            (
                label,
                "`stickyproxy_retries_denied_total` by reason",
                _counts(counters.get("retries_denied_total", {})),
            ),
            (
                label,
                "`stickyproxy_upstream_errors_total` by kind",
                _counts(counters.get("upstream_errors_total", {})),
            ),
        ]
    if name == "haproxy":
        return [
            (
                label,
                "stats of backend `apps` (`wretr`, `wredis`, `econ`, `eresp`)",
                _counts(counters),
            )
        ]
    return [(label, "error-log lines about an upstream, by kind", _counts(counters))]


# HAProxy waits min(`timeout connect`, 1 s) before retrying a failed connect on the same
# server (its configuration manual, `retries`); GETs this slow waited for that.
HAPROXY_TURNAROUND_MS = 900


def drill_failure_groups(measured: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    """The kept failures of each proxy grouped by the kill they followed and their reason."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for t in measured.values():
        for f in t["failure_samples"]:
            victim, after = f["after_kill"] or ("", 0.0)
            kill = f"{victim} at {f['at'] - after:.1f} s" if victim else "before any kill"
            groups.setdefault((DRILL_NAMES[t["name"]], kill, f["reason"]), []).append(after)
    return [
        (
            proxy,
            kill,
            str(len(after)),
            f"{min(after) * 1000:,.0f}"
            + ("" if max(after) - min(after) < 0.0005 else f" to {max(after) * 1000:,.0f}"),
            _cell(reason),
        )
        for (proxy, kill, reason), after in groups.items()
    ]


def drill_notes(measured: dict[str, dict[str, Any]]) -> str:
    """What the figures above show about each proxy's failures and slowest GETs."""
    out = []
    ours = measured.get(REFERENCE)
    if ours and ours["failed"]:
        after = [f["after_kill"][1] for f in ours["failure_samples"] if f["after_kill"]]
        denied = (ours.get("proxy_counters") or {}).get("retries_denied_total") or {}
        when = (
            f" The {len(after)} shown below came {min(after) * 1000:,.0f} to "
            f"{max(after) * 1000:,.0f} ms after a kill."
            if after
            else ""
        )
        out.append(
            f"stickyproxy failed {ours['failed']:,} GETs.{when} Retries it did not "
            f"make (`stickyproxy_retries_denied_total`), by reason: {_counts(denied)}."
        )
    haproxy = measured.get("haproxy")
    slowest = ((haproxy or {}).get("latency_ms") or {}).get("max") or 0.0
    if slowest >= HAPROXY_TURNAROUND_MS:
        out.append(
            f"HAProxy's slowest GETs ({slowest:,.0f} ms at most) are those that met the "
            "killed server: before retrying a failed connect on the same server it waits "
            "min(`timeout connect`, 1 s), and with `retries 2` and `option redispatch` "
            "only the last retry goes to another server (its configuration manual, "
            "`retries`)."
        )
    return " ".join(out)


def killdrill_section(k: dict[str, Any], images: dict[str, Path | None], doc_dir: Path) -> str:
    s = k["settings"]
    rows, counter_rows, skipped, configs = [], [], [], []
    for t in k["targets"]:
        label = DRILL_NAMES.get(t["name"], t["name"])
        if t.get("status") != "ok":
            skipped.append(f"{label}: {t.get('status')}: {t.get('reason')}")
            continue
        reasons = "; ".join(
            f"{_cell(r)} ({n:,})"
            for r, n in sorted(t["failure_reasons"].items(), key=lambda kv: -kv[1])
        )
        lat = t.get("latency_ms") or {}
        rows.append(
            (
                label,
                f"{t['answered']:,}",
                f"**{t['failed']:,}**",
                f"{t['gets_per_s']:,.0f}",
                *(dash(lat.get(p), ",.1f") for p in ("p50", "p99", "p999", "max")),
                reasons or "-",
            )
        )
        configs.append(f"- **{label}**: {drill_configuration(t['name'], s)}")
        counter_rows += drill_counter_rows(t["name"], t.get("proxy_counters") or {})
    measured = _drill_measured(k)
    first = next(iter(measured.values()), None)
    plan = ", ".join(
        f"{e['action']} {e['backend']} at {e['at']:.1f} s" for e in (first or {}).get("events", [])
    )
    samples = drill_failure_groups(measured)
    parts = [
        "## 5. Backends killed under load, beside NGINX and HAProxy\n",
        (
            f"Three backends (bench/backend.py, one process per port), {s['clients']} keep-alive "
            f"clients each sending its next GET when the last is answered, for a random user of "
            f"{s['users']:,} (`X-User-Id`), for {s['duration_s']:g} s per proxy; every "
            f"{s['period_s']:g} s one backend, in turn, is killed with SIGKILL and started again on "
            f"the same port {s['down_s']:g} s later. The three proxies run one after another in the "
            "same run, against the same backend processes. A GET counts as failed on any status "
            f"but 200, a reset or a timeout ({s['request_timeout_s']:g} s); the client never "
            "retries. The reason of a failure is its status and the first bytes of the body, or "
            "the client's error. Each proxy is configured as its users would for this job: "
            "consistent hashing on `X-User-Id`, an idempotent request that failed retried on the "
            f"next server, health checks every {s['health']['interval_ms']} ms (fall "
            f"{s['health']['fall']}, rise {s['health']['rise']}) (bench/targets.py, "
            "`*_drill_launch`):\n"
        ),
        "\n".join(configs) + "\n",
        table(
            (
                "proxy",
                "GETs answered 200",
                "failed",
                "GETs/s",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "max ms",
                "why they failed (count)",
            ),
            rows,
        ),
        (
            "\nLatencies are those of the GETs answered 200, from sending the GET to the whole "
            "answer; a GET a proxy retried includes its retries."
        ),
    ]
    if skipped:
        parts.append("\nNot measured: " + "; ".join(skipped) + ".")
    if plan:
        parts.append(
            f"\nThe schedule as done during the {DRILL_NAMES[first['name']]} run "
            f"(seconds since its start): {plan}. GETs/s differ between the proxies "
            "because the client, the backends and the proxy share two CPUs; compare "
            "the failures, not the rates."
        )
    parts += [
        "\nWhat each proxy counted itself over its run (after the drill):\n",
        table(("proxy", "counter", "values"), counter_rows, left=3),
    ]
    notes = drill_notes(measured)
    if notes:
        parts.append("\n" + notes)
    if samples:
        parts += [
            (
                f"\nThe failed GETs (the first {s.get('failure_samples_kept', 40)} of each "
                "proxy), by the kill they followed:\n"
            ),
            table(("proxy", "kill", "failed", "ms after the kill", "reason"), samples, left=2),
        ]
    parts.append(
        "\n" + image(images.get("killdrill"), doc_dir, "GETs per second and failures, each proxy")
    )
    return "\n".join(parts)


# -- owner-local features (bench/owner_features.py) ----------------------------------------
OWNER_FEATURES = (
    ("ratelimit", "a rate limit on every call"),
    ("revocation", "a token-revocation check on every call"),
    ("jobpoll", "a poll of a running job's progress"),
    ("cache", "a cache hit"),
    (
        "jobfollow",
        (
            "following a running job's progress: pushed over a WebSocket "
            "by the owner vs polled from Redis"
        ),
    ),
)
# The feature measured per progress update delivered instead of per request.
FOLLOW_FEATURE = "jobfollow"
OWNER, STATELESS = "sticky", "stateless"
REDIS_PATHS = ("loopback", "relay")


def _owner_rows(o: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The rows of owners.json by (feature, Redis path, design)."""
    return {(r["feature"], r["redis"], r["design"]): r for r in o["rows"]}


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _unit(row: dict[str, Any]) -> str:
    """What a row's Redis figures are counted per: a request, or a progress update delivered."""
    return "update" if row.get("kind") == "follow" else "request"


def owner_commands(row: dict[str, Any]) -> float:
    """Redis commands (as Redis counted them) per request or per update delivered."""
    return float(row[f"redis_commands_per_{_unit(row)}"])


def owner_round_trips(row: dict[str, Any]) -> float | None:
    """Round trips to Redis the app made per request or per update; None in older results."""
    return row.get(f"round_trips_per_{_unit(row)}")


def owner_pairs(o: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per (feature, Redis path) measured both ways: the two rows and the ratios
    owner ÷ stateless of throughput (req/s, or updates/s) and p99 (of a request, or of the
    delay from a change to the client), in OWNER_FEATURES then REDIS_PATHS order."""
    rows = _owner_rows(o)
    out = []
    for feature, what in OWNER_FEATURES:
        rate, p99 = (
            ("updates_per_s", "latency_p99_ms") if feature == FOLLOW_FEATURE else ("rps", "p99_ms")
        )
        for path in REDIS_PATHS:
            mine, theirs = rows.get((feature, path, OWNER)), rows.get((feature, path, STATELESS))
            if mine and theirs:
                out.append(
                    {
                        "feature": feature,
                        "what": what,
                        "redis": path,
                        "owner": mine,
                        "stateless": theirs,
                        "rps_ratio": _over(mine.get(rate), theirs.get(rate)),
                        "p99_ratio": _over(mine.get(p99), theirs.get(p99)),
                    }
                )
    return out


def owners_verdicts(o: dict[str, Any] | None) -> list[Verdict]:
    target = "owner-local features: zero Redis commands per request in steady state"
    pairs = owner_pairs(o) if o else []
    if not pairs:
        return [Verdict(target, "-", NOT_MEASURED)]
    worst = max(pairs, key=lambda p: owner_commands(p["owner"]))
    most = owner_commands(worst["owner"])
    stateless = sorted(owner_commands(p["stateless"]) for p in pairs)
    owner = (
        f"0.000 in all {len(pairs)} runs"
        if most == 0
        else f"at most {most:.3f} ({worst['feature']}, {worst['redis']})"
    )
    measured = f"{owner}; stateless {stateless[0]:.3f} to {stateless[-1]:.3f}"
    return [Verdict(target, measured, _verdict(most == 0))]


def _commands_text(row: dict[str, Any]) -> str:
    per = max(1, row["updates"] if row.get("kind") == "follow" else row["requests"])
    spent = sorted(row.get("commands", {}).items(), key=lambda kv: -kv[1])
    return ", ".join(f"`{name.upper()}` {n / per:.3f}" for name, n in spent) or "none"


def _trips(row: dict[str, Any]) -> str:
    return dash(owner_round_trips(row), ".3f")


def owner_feature_table(pairs: Sequence[dict[str, Any]], relay_label: str) -> str:
    rows = []
    for p in pairs:
        mine, theirs = p["owner"], p["stateless"]
        rows.append(
            (
                "loopback" if p["redis"] == "loopback" else relay_label,
                _trips(mine),
                _trips(theirs),
                f"{mine['redis_commands_per_request']:.3f}",
                f"{theirs['redis_commands_per_request']:.3f}",
                f"{mine['rps']:,}",
                f"{theirs['rps']:,}",
                ratio(p["rps_ratio"]),
                f"{mine['p99_ms']:.2f}",
                f"{theirs['p99_ms']:.2f}",
                ratio(p["p99_ratio"]),
            )
        )
    return table(
        (
            "Redis",
            "round trips / request, owner",
            "round trips / request, stateless",
            "commands / request, owner",
            "commands / request, stateless",
            "req/s, owner",
            "req/s, stateless",
            "req/s owner ÷ stateless",
            "p99 ms, owner",
            "p99 ms, stateless",
            "p99 owner ÷ stateless",
        ),
        rows,
    )


def owner_follow_table(pairs: Sequence[dict[str, Any]], relay_label: str) -> str:
    rows = []
    for p in pairs:
        mine, theirs = p["owner"], p["stateless"]
        rows.append(
            (
                "loopback" if p["redis"] == "loopback" else relay_label,
                _trips(mine),
                _trips(theirs),
                f"{mine['redis_commands_per_update']:.3f}",
                f"{theirs['redis_commands_per_update']:.3f}",
                f"{mine['updates_per_s']:,}",
                f"{theirs['updates_per_s']:,}",
                f"{mine['latency_p50_ms']:.2f}",
                f"{theirs['latency_p50_ms']:.2f}",
                f"{mine['latency_p99_ms']:.2f}",
                f"{theirs['latency_p99_ms']:.2f}",
                ratio(p["p99_ratio"]),
            )
        )
    return table(
        (
            "Redis",
            "round trips / update, WebSocket",
            "round trips / update, polling",
            "commands / update, WebSocket",
            "commands / update, polling",
            "updates/s, WebSocket",
            "updates/s, polling",
            "change → client p50 ms, WebSocket",
            "p50 ms, polling",
            "p99 ms, WebSocket",
            "p99 ms, polling",
            "p99 WebSocket ÷ polling",
        ),
        rows,
    )


def _cost_text(cost: dict[str, Any] | None) -> str:
    """A measured one-off cost: round trips and commands per operation, by command."""
    if not cost:
        return "not measured"
    by = ", ".join(
        f"`{k}` {v:.3f}" for k, v in sorted(cost["by_command"].items(), key=lambda kv: -kv[1])
    )
    return (
        f"{cost['round_trips']:.3f} round trips, {cost['commands']:.3f} commands"
        + (f" ({by})" if by else "")
        + f" each, over {cost['count']:,}"
    )


def owner_costs(o: dict[str, Any]) -> list[str]:
    """Where the owner-local versions send Redis commands, as bullet lines: what was measured
    in this run (one-off costs outside the timed windows, any steady-state command) and the
    rate limit's snapshot writes, which this load never triggers."""
    rows = _owner_rows(o)
    lines = []
    first = [
        (f, r["costs"]["first_request"])
        for (f, path, d), r in rows.items()
        if d == OWNER and path == "loopback" and r.get("costs", {}).get("first_request")
    ]
    if first:
        lines.append(
            "- **A user's first request on an instance** acquires the user (one Lua call "
            "that fences out the previous owner and returns the context), Redis on "
            "loopback: "
            + "; ".join(f"`{f}` {_cost_text(c)}" for f, c in first)
            + ". `jobpoll`'s first request also starts the user's job, saved with it."
        )
    for path in REDIS_PATHS:
        revocation = rows.get(("revocation", path, OWNER), {}).get("costs", {}).get("revocation")
        if revocation and path == "loopback":
            theirs = (
                rows.get(("revocation", path, STATELESS), {}).get("costs", {}).get("revocation")
            )
            lines.append(
                f"- **A revocation** (a logout; one `jti`): owner {_cost_text(revocation)}; "
                f"stateless `SET` of the `jti` with its expiry: {_cost_text(theirs)}."
            )
    follow = rows.get((FOLLOW_FEATURE, "loopback", OWNER), {}).get("costs", {})
    if follow.get("job_start"):
        lines.append(
            f"- **A job's start and its outcome**: start {_cost_text(follow['job_start'])}; "
            f"end (cancelled, outcome recorded) {_cost_text(follow.get('job_end'))}. "
            "Its progress costs none: it stays in the owner's memory."
        )
    if any(
        "SCRIPT" in (c or {}).get("by_command", {})
        for r in rows.values()
        for c in r.get("costs", {}).values()
    ):
        lines.append(
            "- `SCRIPT` above is a load after a `NOSCRIPT` reply: a script's first "
            "calls on a Redis that had not seen it (here, on this run's new Redis)."
        )
    lines.append(
        "- **A rate limit's snapshot**: at most one fenced write per half burst consumed "
        "(`MATERIAL_SHARE`), and only by a user who spends faster than the budget "
        "refills; a user within the rate never causes one. Not exercised here: the limit "
        "is set so that nobody nears it."
    )
    nonzero = [p for p in owner_pairs(o) if owner_commands(p["owner"]) > 0]
    lines.append(
        "- **In steady state** (the timed windows): "
        + (
            "none of the owner-local versions sent Redis a command."
            if not nonzero
            else "owner-local versions that still sent Redis commands: "
            + "; ".join(
                f"{p['feature']} ({p['redis']}) "
                f"{owner_commands(p['owner']):.3f} per {_unit(p['owner'])} "
                f"({_commands_text(p['owner'])})"
                for p in nonzero
            )
            + "."
        )
    )
    return lines


def owners_section(o: dict[str, Any], images: dict[str, Path | None], doc_dir: Path) -> str:
    s, relay = o["settings"], o["relay"]
    added = relay["added_rtt_ms"]
    samples = (
        f"median of {relay['ping_samples']} `PING`s" if relay.get("ping_samples") else "a median"
    )
    relay_label = f"relay, +{added:.2f} ms"
    pairs = owner_pairs(o)
    followers = s.get("followers")
    parts = [
        "## 6. Owner-local features vs the same done statelessly in Redis\n",
        (
            "Per-user features of `stickyproxy.context` beside the usual stateless version that "
            "keeps the same state in Redis (bench/owner_features.py). Each variant is one aiohttp "
            "app process (uvloop). Four answer `GET /` with 2 bytes after the feature's work, on "
            "every request: the owner-local rate limiter (`rate_limit_middleware`) vs `INCR` + "
            "`PEXPIRE … NX` pipelined; the owner-local revocation check (`revocation_middleware`) "
            "vs `EXISTS` of the token's `jti` + `GET` of the user's cut-off pipelined; "
            "`Jobs.status` of the user's running job vs `HGETALL` of its hash; a `GuardedCache` "
            f"hit vs a Redis `GET` of the cached value. wrk, {s['connections']} connections, "
            f"{s['duration_s']:g} s per variant, requests spread at random over {s['users']:,} "
            "users each with a signed token; before each timed run every user is touched once "
            "(its context loaded, its job started, its value cached) and "
            + (f"the load runs {s['warmup_s']:g} s" if s["warmup_s"] else "no load runs before")
            + ". Limits are set so that nobody is refused and no token is "
            "revoked, so both designs do their full work on every request.\n"
        ),
    ]
    if followers:
        parts.append(
            f"The fifth follows running jobs: {followers:,} users each have a job that changes "
            f"its progress every {s['progress_interval_ms']:g} ms, and a client follows all of "
            "them for the same timed window. Owner: the job runs in the app (`Jobs`), and the "
            "client holds one WebSocket per job, on which the app sends each change "
            "(`Jobs.follow`: from memory). Stateless: the job writes each step to a Redis hash "
            "(`HSET`), and the client polls `GET /progress` (one `HGETALL`) once per progress "
            "interval, as the shop's `--stateless` jobs do. A change carries the time it was "
            "made; the delay to the client seeing it is taken on the machine's one monotonic "
            "clock. An update is a new step seen by the client (a poll that finds none is not "
            "one); Redis traffic is divided by updates delivered.\n"
        )
    parts.append(
        "Redis commands are counted by Redis (`INFO commandstats` around each timed window, "
        "the library's listener `PING`s excluded; commands a Lua script runs count too). Round "
        "trips are counted in each app, where redis-py sends: one per command or pipeline "
        "written, connection bookkeeping excluded (handshake, health checks, the takeover "
        "listener). Each variant runs twice: with Redis on loopback and with Redis behind a "
        "relay in its own process that delays each chunk by half a round trip each way; "
        f"measured, it adds {added:.2f} ms to a `PING` ({samples}; "
        f"{relay['direct_ping_ms']:.3f} ms direct), standing in for a Redis on another host. "
        "The machine has 2 cores shared with other work: compare the two designs within a "
        "row (same run, same minute), not figures across runs.\n"
    )
    for feature, what in OWNER_FEATURES:
        mine = [p for p in pairs if p["feature"] == feature]
        if not mine:
            parts.append(f"**{what[0].upper() + what[1:]}** (`{feature}`): not measured.\n")
            continue
        commands = "; ".join(
            f"{'loopback' if p['redis'] == 'loopback' else 'relay'}: "
            f"{'WebSocket' if feature == FOLLOW_FEATURE else 'owner'} "
            f"{_commands_text(p['owner'])}, "
            f"{'polling' if feature == FOLLOW_FEATURE else 'stateless'} {_commands_text(p['stateless'])}"
            for p in mine
        )
        unit = "update" if feature == FOLLOW_FEATURE else "request"
        parts += [
            f"**{what[0].upper() + what[1:]}** (`{feature}`)\n",
            (owner_follow_table if feature == FOLLOW_FEATURE else owner_feature_table)(
                mine, relay_label
            ),
            f"\nRedis commands per {unit}, by command: {commands}.\n",
        ]
    if pairs:
        parts.append(
            "Every stateless version makes one Redis round trip per request (the rate limit's "
            "and the revocation check's two commands are pipelined); polling a job costs the "
            "poll's round trip plus the runner's write of each step. The owner-local versions "
            "answer from the process's memory. Ratios are owner ÷ stateless: above 1x the "
            "owner serves more per second; below 1x its p99 is shorter.\n"
        )
        parts.append(
            "**Where the owner-local versions do use Redis** (measured in the same "
            "run, outside the timed windows, unless said; round trips and commands "
            "as the app sent them):\n"
        )
        parts.append("\n".join(owner_costs(o)) + "\n")
    parts.append(
        "\n"
        + image(
            images.get("owners"),
            doc_dir,
            "owner-local features vs stateless, Redis on loopback and behind a relay",
        )
    )
    return "\n".join(parts)


def _factor(value: float | None) -> str:
    return "off" if value is None else f"{value:g}"


def skew_section(k: dict[str, Any], images: dict[str, Path | None], doc_dir: Path) -> str:
    """Skewed users (bench/skew.py): bounded load's spread and moves, and the rehydrations
    after a recovery with and without a failback ramp. A simulation with the real decisions,
    so its figures are the model's, the same on every machine."""
    b, f = k["balance"], k["failback"]
    ids = k["backends"]
    parts = [
        "## 7. Skewed users: bounded load and gradual failback",
        (
            f"{k['users']:,} users drawn Zipf(s = {k['zipf_s']}) over {len(ids)} backends on "
            f"the real ring; routing decisions are `routing/spill.py` and `routing/ramp.py`, "
            f"arrivals and service times simulated (seeded, no sockets), so these figures are "
            f"exact for the model and the same on every machine. The hottest user alone sends "
            f"{pct(b['hottest_user_share'])} of the requests (owner {b['hottest_user_owner']}). "
            f"See [routing-quality.md](routing-quality.md) for what each setting trades."
        ),
    ]
    rows = []
    for r in b["runs"]:
        rows.append(
            [_factor(r["factor"])]
            + [pct(r["share"][i]) for i in ids]
            + [
                f"{r['busiest_over_mean']['p99']:.2f}×",
                pct(r["off_owner_share"], 2),
                f"{r['user_moves_per_1000']:.1f}",
            ]
        )
    parts.append(
        f"**Load spread** ({b['requests']:,} requests, {b['inflight_mean']} in flight on "
        "average; key-space shares "
        + ", ".join(f"{i} {pct(b['key_share'][i])}" for i in ids)
        + "):\n\n"
        + table(
            ["balance_factor"]
            + [f"share {i}" for i in ids]
            + [
                "busiest in flight ÷ mean, p99",
                "served off owner",
                "user moves per 1,000 requests",
            ],
            rows,
        )
    )
    fs = f["summary"]
    fb_rows = [
        [
            name,
            fs[key]["rehydrations"],
            fs[key]["peak_per_s"],
            fs[key]["first_second"],
            fs[key]["first_5_seconds"],
            fs[key]["fleet_disagreements"],
        ]
        for key, name in (("no_ramp", "no ramp"), ("ramp", f"failback_ramp = {f['ramp_s']:g} s"))
    ]
    parts.append(
        f"**Failback** ({f['victim']} recovers {f['recovery_at']:g} s into a "
        f"{f['window_s']:g} s window at {f['rate']:,.0f} requests/s; a rehydration is a "
        "request of one of its users that lands on it for the first time since; the "
        f"last column counts requests two proxies whose ramps start {f['fleet_skew_s']:g} s "
        "apart send to different backends):\n\n"
        + table(
            [
                "",
                "rehydrations",
                "peak per second",
                "first second",
                "first 5 s",
                "proxies disagree",
            ],
            fb_rows,
        )
        + f"\n\nThe ramp cuts the peak of rehydrations per second by "
        f"{f['peak_reduction']:.1f}×."
    )
    chart = images.get("skew") or (Path(k["chart"]) if k.get("chart") else None)
    if chart is not None and chart.is_relative_to(doc_dir):
        parts.append(image(chart, doc_dir, "load spread and rehydrations per second"))
    real = k.get("real") or {}
    if "balance" in real:
        parts.append(skew_measured(k, real, images, doc_dir))
    elif real.get("skipped"):
        parts.append(f"Not measured through the proxy in this run: {real['skipped']}.")
    return "\n\n".join(parts)


def _spread(values: list[float]) -> float:
    """(highest - lowest) / lowest: how far a set of rates moved."""
    low = min(values)
    return (max(values) - low) / low if low else 0.0


def _skew_speed(runs: list[dict[str, Any]]) -> str:
    """The request path's speed with bounded load off and on, and how far apart the runs were."""
    spread = _spread([r["load"]["rps"] for r in runs])
    on = ", ".join(
        f"{_factor(r['factor'])} {r['rps_over_off']:.2f}×"
        for r in runs[1:]
        if r.get("rps_over_off")
    )
    return (
        f"Throughput with the bound on, against off: {on}; the variants' rates differ by "
        f"{pct(spread, 0)} from lowest to highest on this shared machine (wrk, the "
        "proxy and the backends share its two cores), so that is within noise; compare "
        "shares and counts, not req/s."
    )


def _skew_simulated_failback(f: dict[str, Any]) -> str:
    sim = f.get("simulated")
    if not sim:
        return ""
    return (
        f" (the simulation at the same rate and ramp: {sim['no_ramp']['peak_per_s']} → "
        f"{sim['ramp']['peak_per_s']} per second at the peak, "
        f"{sim['no_ramp']['first_second']} → {sim['ramp']['first_second']} in the first "
        "second)"
    )


def skew_measured(
    k: dict[str, Any], real: dict[str, Any], images: dict[str, Path | None], doc_dir: Path
) -> str:
    """The measured half of the skew section: the same questions through `stickyproxy run`."""
    b, f = real["balance"], real["failback"]
    ids = k["backends"]
    simulated = {r["factor"]: r for r in k["balance"]["runs"]}
    load = real.get("loadavg_at_start")
    parts = [
        "### Measured through the proxy",
        (
            f"The same questions asked of `stickyproxy run` (1 worker): three aiohttp backends "
            f"that take {real['service_ms']:g} ms per request (a sleep, so in-flight load "
            f"exists), wrk with {b['connections']} connections sending {real['users']:,} "
            f"users drawn Zipf(s = {k['zipf_s']}) (`bench/lua/zipf.lua`, seeded), health "
            f"checks every {real['health_interval_ms']} ms. The variants ran back to back "
            f"in one run" + (f" (load average {load[0]:.2f} at its start)" if load else "") + "."
        ),
    ]
    rows = []
    for r in b["runs"]:
        sim = simulated.get(r["factor"])
        peak = r["backend_peak_inflight"]
        rows.append(
            [
                _factor(r["factor"]),
                f"{r['load']['rps']:,.0f}",
                " / ".join(pct(r["share"][i]) for i in ids),
                " / ".join(pct(sim["share"][i]) for i in ids) if sim else "-",
                " / ".join(str(peak[i]) for i in ids),
                f"{r['busiest_mean_over_mean']:.2f}×",
                pct(r["spill_share"], 2),
                f"{r['spills']:.0f}",
                r["users_on_two_backends"],
            ]
        )
    parts.append(
        f"**Load spread** ({b['seconds']:g} s per factor):\n\n"
        + table(
            [
                "balance_factor",
                "req/s",
                "share " + " / ".join(ids),
                "simulated share",
                "peak in flight (counted by each backend)",
                "busiest mean in flight ÷ mean",
                "spilled (route decisions)",
                "spills_total",
                "users served by a second backend",
            ],
            rows,
        )
        + "\n\n"
        + _skew_speed(b["runs"])
        + " "
        '`spilled` is `stickyproxy_route_decisions_total{result="spill"}` over '
        "all decisions, `spills_total` the sum of `stickyproxy_spills_total`; the last "
        "column counts users that more than one backend served during the run: each "
        "cost at least one rehydration from Redis."
    )
    speed = real.get("speed")
    if speed and speed.get("median_ratio"):
        parts.append(
            f"**The request path's speed** (the three features on: hot keys, "
            f'`balance_factor = 1.25`, `failback_ramp = "{f["ramp_s"]:g}s"` with no ramp '
            f"running; against off: hot keys disabled, the others 0): two proxies side by side "
            f"in front of backends that answer at once, wrk with {speed['connections']} "
            f"connections against each in turn, {speed['rounds']} interleaved rounds of "
            f"{speed['seconds']:g} s. On ÷ off, median {ratio(speed['median_ratio'])}; per "
            "round "
            + ", ".join(ratio(r) for r in speed["ratios"])
            + " (off "
            + ", ".join(f"{x:,.0f}" for x in speed["rps"]["off"])
            + " req/s; on "
            + ", ".join(f"{x:,.0f}" for x in speed["rps"]["on"])
            + "). The proxy with "
            f"the features off alone moved by {pct(_spread(speed['rps']['off']), 0)} from "
            "round to round on this shared machine, so a difference much smaller than that is "
            "not resolved here; `python -m bench.hotpath` measures the in-memory request path "
            "more finely (docs/routing-quality.md)."
        )
    runs = f["runs"]
    fb_rows = []
    for key, name in (("no_ramp", "no ramp"), ("ramp", f"failback_ramp = {f['ramp_s']:g} s")):
        r = runs[key]
        fb_rows.append(
            [
                name,
                r["rehydrations"],
                r["peak_per_s"],
                r["first_second"],
                sum(r["per_second"][:5]),
                dash(r["median_s"], ".1f") + " s",
                f"{r['load'].get('rps', 0):,.0f}",
            ]
        )
    parts.append(
        f"**Failback** ({f['victim']} fails its health checks until the proxy marks it "
        f"down, then passes them again {f['recover_after_s']:g} s into a "
        f"{f['window_s']:g} s wrk run; the backend counts the first request of each "
        "user it sees after that, which is when the context library would rehydrate "
        "the user from Redis):\n\n"
        + table(
            [
                "",
                "rehydrations",
                "peak per second",
                "first second",
                "first 5 s",
                "median, after recovery",
                "req/s",
            ],
            fb_rows,
        )
        + f"\n\nMeasured, the ramp cuts the peak of rehydrations per second by "
        f"{f['peak_reduction']:.1f}× and the first second's by "
        f"{runs['no_ramp']['first_second'] / max(1, runs['ramp']['first_second']):.0f}×"
        + _skew_simulated_failback(f)
        + ". "
        "After the first seconds both curves settle at the rate at which users the "
        "backend has not seen since it came back arrive at all (the Zipf tail), which "
        "bounds what a ramp shorter than that tail can flatten."
    )
    chart = images.get("skew-measured") or (
        Path(k["chart_measured"]) if k.get("chart_measured") else None
    )
    if chart is not None and chart.is_relative_to(doc_dir):
        parts.append(
            image(
                chart, doc_dir, "measured load spread and rehydrations per second after a recovery"
            )
        )
    return "\n\n".join(parts)


# -- TLS (bench/tls.py) ---------------------------------------------------------------------
TLS_MEASURES = (
    ("plain", None, "plain HTTP, keep-alive", "req/s"),
    ("keepalive", "ecdsa", "TLS, keep-alive", "req/s"),
    ("reconnect", "ecdsa", "TLS, a new connection per request (resumed)", "req/s"),
    ("handshake", "ecdsa", "TLS, full handshakes, ECDSA P-256", "handshakes/s"),
    ("handshake", "rsa", "TLS, full handshakes, RSA-2048", "handshakes/s"),
)
TLS_KEEPALIVE_TARGET = 0.5
# Below this share of one core the proxy was not the bottleneck: the load client was.
TLS_SATURATED_CORE = 0.85


def _tls_rows(t: dict[str, Any]) -> dict[tuple[str, str | None, str], dict[str, Any]]:
    return {(r["mode"], r["key"], r["target"]): r for r in t["rows"] if r.get("summary")}


def _tls_comparison(t: dict[str, Any], mode: str, key: str | None) -> dict[str, Any] | None:
    return next((c for c in t["comparisons"] if c["mode"] == mode and c["key"] == key), None)


def tls_busy(summary: dict[str, Any]) -> float | None:
    """The share of one core the proxy used: rate x CPU seconds per request."""
    cpu = summary.get("cpu_us")
    return None if cpu is None else summary["rate"] * cpu / 1e6


def tls_verdicts(t: dict[str, Any] | None) -> list[Verdict]:
    name = "TLS keep-alive ≥ 0.5× NGINX (1 worker, same certificate)"
    c = _tls_comparison(t, "keepalive", "ecdsa") if t else None
    if c is None or c["rate_ratio"] is None:
        return [Verdict(name, "-", NOT_MEASURED)]
    per_cpu = 1 / c["cpu_ratio"] if c.get("cpu_ratio") else None
    return [
        Verdict(
            name,
            ratio(c["rate_ratio"]),
            _verdict(c["rate_ratio"] >= TLS_KEEPALIVE_TARGET),
            "rounds "
            + ", ".join(ratio(r) for r in c["round_ratios"])
            + (f"; per CPU-second {ratio(per_cpu)}" if per_cpu else ""),
        )
    ]


def tls_section(
    t: dict[str, Any],
    dataplane: dict[str, Any] | None,
    images: dict[str, Path | None],
    doc_dir: Path,
) -> str:
    """TLS termination (bench/tls.py): stickyproxy and NGINX with the same certificate, 1
    worker each, in front of the same backends; every figure back to back in one run."""
    s, rows = t["settings"], _tls_rows(t)
    negotiated = sorted({f"{v['version']} {v['cipher']}" for v in t["negotiated"].values()})
    parts = [
        "## 8. TLS termination",
        (
            f"NGINX (`worker_processes 1`, `ssl_protocols TLSv1.2 TLSv1.3`, keep-alive, its "
            f"defaults otherwise) and stickyproxy (1 worker, `[listen.tls]` with only `cert` and "
            f"`key`) serve the same certificates, made by trustme for `localhost`/127.0.0.1 "
            f"({', '.join(t['certificates'].values())}), in front of the same three backends "
            f"and with the data plane's proxy settings; every client negotiated "
            f"{' / '.join(negotiated) or '-'}. stickyproxy {t['tools']['stickyproxy']}, "
            f"Python's {t['tools']['python_ssl']}. {s['rounds']} interleaved "
            f"round{'' if s['rounds'] == 1 else 's'} of {s['duration_s']:g} s after a {s['warmup_s']:g} s warm-up per listener; in each "
            f"round the two proxies are measured back to back for each line (which goes first "
            f"alternates), and each ratio (`× NGINX`, `CPU × NGINX`) is the median of the "
            f"rounds' ratios: on this shared 2-CPU machine a slow moment hits both of a pair, "
            f"while a ratio of two medians could pair a fast round with a slow one. CPU is "
            f"the proxy's process tree's CPU time over the run divided by the requests (or "
            f"handshakes) completed; `cores used` is that CPU time over the run's length."
        ),
    ]
    table_rows = []
    for mode, key, label, unit in TLS_MEASURES:
        ng, sp = rows.get((mode, key, "nginx")), rows.get((mode, key, "stickyproxy"))
        if not ng and not sp:
            continue
        c = _tls_comparison(t, mode, key) or {}
        ngs, sps = (ng or {}).get("summary") or {}, (sp or {}).get("summary") or {}
        errors = sum(x.get("non_2xx", 0) + x.get("socket_errors", 0) for x in (ngs, sps))
        table_rows.append(
            (
                f"{label} ({unit})",
                dash(ngs.get("rate"), ",.0f"),
                dash(sps.get("rate"), ",.0f"),
                ratio(c.get("rate_ratio")),
                " / ".join(ratio(r) for r in c.get("round_ratios", [])),
                dash(ngs.get("cpu_us"), ".0f"),
                dash(sps.get("cpu_us"), ".0f"),
                ratio(c.get("cpu_ratio")),
                ratio(1 / c["cpu_ratio"] if c.get("cpu_ratio") else None),
                " / ".join(dash(tls_busy(x), ".2f") for x in (ngs, sps) if x),
                errors,
            )
        )
    parts.append(
        table(
            (
                "",
                "NGINX",
                "stickyproxy",
                "× NGINX",
                "per round",
                "CPU µs NGINX",
                "CPU µs stickyproxy",
                "CPU × NGINX",
                "per CPU-second × NGINX",
                "cores used (NGINX / sticky)",
                "errors",
            ),
            table_rows,
        )
    )
    notes = []
    over = t.get("tls_over_plain") or {}
    added = {
        name: _minus(
            (rows.get(("keepalive", "ecdsa", name)) or {}).get("summary", {}).get("cpu_us"),
            (rows.get(("plain", None, name)) or {}).get("summary", {}).get("cpu_us"),
        )
        for name in ("nginx", "stickyproxy")
    }
    if over.get("nginx") and over.get("stickyproxy") and None not in added.values():
        notes.append(
            f"- **What TLS costs once connections are open**: "
            f"{added['stickyproxy']:+.0f} µs of CPU per request to stickyproxy, "
            f"{added['nginx']:+.0f} µs to NGINX (OpenSSL encrypts the records in both); "
            f"keep-alive TLS made {pct(over['stickyproxy'], 0)} of stickyproxy's "
            f"plain-HTTP rate and {pct(over['nginx'], 0)} of NGINX's (medians of the "
            f"rounds' ratios)."
        )
    busy = {
        (m, k): [
            b
            for b in (
                tls_busy(r["summary"])
                for r in (rows.get((m, k, "nginx")), rows.get((m, k, "stickyproxy")))
                if r
            )
            if b is not None
        ]
        for m, k, _, _ in TLS_MEASURES
    }
    unsaturated = [
        label
        for m, k, label, _ in TLS_MEASURES
        if busy[(m, k)] and max(busy[(m, k)]) < TLS_SATURATED_CORE
    ]
    if unsaturated:
        every = len(unsaturated) == sum(1 for v in busy.values() if v)
        most = max(b for v in busy.values() for b in v)
        notes.append(
            "- **Neither proxy had a core to itself** "
            + (
                f"in any line (at most {most:.2f} of one): "
                if every
                else f"in: {'; '.join(unsaturated)}: "
            )
            + "the load client (wrk, or s_time, which pays a key exchange and a signature "
            "check per connection too), the backends and other sessions share the two CPUs, "
            "so those rates and their ratios measure the machine as much as the proxy. The "
            "CPU per request is the comparison that holds: `per CPU-second × NGINX` is "
            "stickyproxy's requests (or handshakes) per CPU-second over NGINX's, what each "
            "would make with one busy core."
        )
    notes.append(
        f"- **How new connections are made.** `reconnect`: wrk with `Connection: close` on "
        f"every request (bench/lua/reconnect.lua); wrk offers the closed connection's session "
        f"on the next one, so these handshakes are *resumed* (TLS 1.3 PSK with a fresh key "
        f"exchange, no certificate signature), as clients that keep sessions make them. "
        f"`handshake`: "
        f"{s['handshake_clients']} `openssl s_time -new -www /` processes at once, a new "
        f"session on every connection (never resumed), one HTTP/1.0 GET each, without a user "
        f"key; wrk cannot be made to "
        f"skip resumption, and h2load is not installed here. tests/test_bench_tls.py checks "
        f"against NGINX's `$ssl_session_reused` that the first are resumed and the second "
        f"never are."
    )
    pre = t.get("plain_over_pre_tls")
    if pre and pre.get("rate_ratio") is not None:
        notes.append(
            f"- **Plain HTTP, no regression**: stickyproxy now over the same sources before TLS "
            f"was wired in (`{t['pre_tls_commit']}`, both interpreted, plain HTTP, back to "
            f"back): {ratio(pre['cpu_ratio'])} the CPU per request (the figure that holds when "
            f"neither has a core to itself), {ratio(pre['rate_ratio'])} the req/s (rounds "
            f"{', '.join(ratio(r) for r in pre['round_ratios'])})."
        )
    plain = _tls_comparison(t, "plain", None)
    dp = (
        next((x for x in _stickyproxy_rows(dataplane) if x["workers"] == 1), None)
        if dataplane
        else None
    )
    if plain and plain.get("rate_ratio") is not None:
        if dp and dp["ratio_to_nginx"]["rps"] is not None:
            same = (
                str(dataplane.get("started_at", ""))[:10] == str(t.get("started_at", ""))[:10]
                if dataplane
                else False
            )
            notes.append(
                f"- **Plain HTTP beside the data-plane benchmark**: here stickyproxy made "
                f"{ratio(plain['rate_ratio'])} NGINX's plain req/s; the data-plane benchmark "
                f"({'same day' if same else 'an earlier run'}, started "
                f"{dataplane.get('started_at', '-') if dataplane else '-'}, stickyproxy "
                f"{(dataplane or {}).get('tools', {}).get('stickyproxy', '-')}) measured "
                f"{ratio(dp['ratio_to_nginx']['rps'])} at 1 worker "
                f"({dp['summary']['rps_median']:,.0f} req/s). Compare the ratios, and only "
                f"between runs of the same build."
            )
        else:
            notes.append(
                f"- **Plain HTTP beside the data-plane benchmark**: here stickyproxy made "
                f"{ratio(plain['rate_ratio'])} NGINX's plain req/s; the data-plane benchmark was "
                f"not run in this invocation (`python -m bench --only dataplane,tls` runs both)."
            )
    if t.get("skipped"):
        notes.append("- Not measured: " + "; ".join(t["skipped"]) + ".")
    parts.append("\n".join(notes))
    chart = images.get("tls") or (Path(t["chart"]) if t.get("chart") else None)
    if chart is not None and chart.is_relative_to(doc_dir):
        parts.append(image(chart, doc_dir, "stickyproxy over NGINX with TLS, and CPU per request"))
    return "\n\n".join(parts)


# -- gRPC and HTTP/2 (bench/grpc.py) ---------------------------------------------------------
GRPC_MEASURES = (  # measure, its name, its unit, what one of them is
    ("grpc", "gRPC unary calls", "calls/s", "call"),
    ("h2", "HTTP/2 streams", "req/s", "request"),
)
GRPC_TARGETS = (("nginx", "NGINX"), ("stickyproxy", "stickyproxy"))
# DESIGN.md §8 asks for HTTP/2 and gRPC "measured against NGINX the same way" as TLS, whose
# bar (like plain HTTP's) is 0.5x: the verdict says which side of it they are, not met/missed.
GRPC_REFERENCE_RATIO = 0.5


def _grpc_rows(g: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["measure"], r["target"]): r for r in g["rows"] if r.get("summary")}


def _grpc_comparison(g: dict[str, Any], measure: str) -> dict[str, Any] | None:
    return next((c for c in g["comparisons"] if c["measure"] == measure), None)


def _cores(summary: dict[str, Any], key: str) -> float | None:
    """CPU time over the run's length: rate x CPU seconds per request (`key`: the proxy's
    `cpu_us` or the backends' `backend_cpu_us`)."""
    cpu = summary.get(key)
    return None if cpu is None else summary["rate"] * cpu / 1e6


def grpc_verdicts(g: dict[str, Any] | None) -> list[Verdict]:
    names = {
        "grpc": "gRPC unary calls/s against NGINX (grpc_pass, 1 worker)",
        "h2": "HTTP/2 streams, req/s against NGINX (h2c, 1 worker)",
    }
    out = []
    for measure, _, _, _ in GRPC_MEASURES:
        c = _grpc_comparison(g, measure) if g else None
        if c is None or c["rate_ratio"] is None:
            out.append(Verdict(names[measure], "-", NOT_MEASURED))
            continue
        per_cpu = 1 / c["cpu_ratio"] if c.get("cpu_ratio") else None
        side = "below" if c["rate_ratio"] < GRPC_REFERENCE_RATIO else "at or above"
        out.append(
            Verdict(
                names[measure],
                ratio(c["rate_ratio"]),
                f"measured, {side} {GRPC_REFERENCE_RATIO:g}×",
                "rounds "
                + ", ".join(ratio(r) for r in c["round_ratios"])
                + (f"; per CPU-second {ratio(per_cpu)}" if per_cpu else ""),
            )
        )
    return out


def _grpc_pace(
    label: str,
    one: str,
    ng: dict[str, Any] | None,
    sp: dict[str, Any] | None,
    c: dict[str, Any] | None,
) -> str | None:
    """What each proxy and its backends used of the CPUs in one measure, and which figure
    compares the proxies: the CPU per call when NGINX's backends, not NGINX, set its rate."""
    if not ng or not sp or not c or not c.get("cpu_ratio"):
        return None
    used = [u for x in (ng, sp) for k in ("cpu_us", "backend_cpu_us") if (u := _cores(x, k))]
    if len(used) < 4:
        return None
    ng_proxy, ng_backends, sp_proxy, sp_backends = used
    text = (
        f"- **{label}**: NGINX used {ng_proxy:.2f} of a core, its backends {ng_backends:.2f} "
        f"together; stickyproxy {sp_proxy:.2f}, its backends {sp_backends:.2f}. "
    )
    if ng_backends > ng_proxy:
        text += (
            f"NGINX's rate was set by its backends, not by NGINX, so the rate ratio "
            f"({ratio(c['rate_ratio'])}) understates the gap between the proxies; the fairer "
            f"figure is the CPU per {one}: "
        )
    else:
        text += f"Per {one}, "
    return text + (
        f"stickyproxy spent {ratio(c['cpu_ratio'])} NGINX's CPU ({ratio(1 / c['cpu_ratio'])} "
        f"of its {one}s per CPU-second)."
    )


def grpc_section(g: dict[str, Any]) -> str:
    """gRPC and HTTP/2 (bench/grpc.py): stickyproxy and NGINX, 1 worker each, h2load on
    both, back to back in interleaved rounds of one run."""
    s, rows, tools = g["settings"], _grpc_rows(g), g["tools"]
    source = g.get("source") or {}
    measured = f"from {source.get('from', 'this checkout')} at `{source.get('commit', '-')}`"
    if source.get("uncommitted"):
        measured += " with uncommitted changes to " + ", ".join(source["uncommitted"])
    parts = [
        "## 9. gRPC and HTTP/2",
        (
            f"stickyproxy (1 worker, `listen.h2c = true`) beside NGINX (`worker_processes 1`, "
            f"`listen PORT http2`: HTTP/2 with prior knowledge), both loaded by "
            f"{tools.get('h2load', 'h2load')}. **gRPC**: unary calls (`{s['grpc_request']}`, "
            f"`content-type: application/grpc`, `te: trailers`), the user in the `x-user-id` "
            f"metadata, {s['grpc']} (h2load sends the same fields on every request, so one "
            f"user per process, the users spread over the backends), to three grpcio {tools.get('grpcio', '')} "
            f"servers (grpc.aio, a process each); stickyproxy speaks HTTP/2 to them "
            f'(`protocol = "h2"`), NGINX `grpc_pass` with `hash $http_x_user_id consistent`. '
            f"h2load counts a gRPC error (HTTP 200 with a `grpc-status` trailer) as a success, "
            f"so each proxy was first probed with the grpcio client (status OK, every user on "
            f"one backend) and after every run the backends' own count of calls answered had "
            f"to reach h2load's successes. **HTTP/2**: GETs, {s['h2']} (`?user=uN`), to the "
            f"data-plane benchmark's HTTP/1.1 backends, which both proxies reach over HTTP/1.1 "
            f"keep-alive (NGINX: `proxy_pass`, `hash $arg_user consistent`). "
            f"{s['rounds']} interleaved round{'' if s['rounds'] == 1 else 's'} of "
            f"{s['duration_s']:g} s after a {s['warmup_s']:g} s warm-up per listener, the two "
            f"proxies back to back in each (which goes first alternates); each `÷ NGINX` is "
            f"the median of the rounds' ratios. CPU per call or request: the proxy's process "
            f"tree's CPU time over the run divided by the requests completed; the backends': "
            f"their processes' CPU together divided by the calls they answered (gRPC) or the "
            f"requests (HTTP/2); `cores`: CPU time over the run's length. stickyproxy "
            f"{tools.get('stickyproxy', '-')} {measured}; "
            f"{tools.get('nginx', 'nginx').removeprefix('nginx version: ')}."
        ),
    ]
    notes = []
    for measure, label, unit, one in GRPC_MEASURES:
        ng, sp = rows.get((measure, "nginx")), rows.get((measure, "stickyproxy"))
        if not ng and not sp:
            continue
        table_rows = []
        for target, name in GRPC_TARGETS:
            x = (rows.get((measure, target)) or {}).get("summary")
            if not x:
                continue
            table_rows.append(
                (
                    name,
                    dash(x["rate"], ",.0f"),
                    " / ".join(f"{r:,.0f}" for r in x["rounds"]),
                    dash(x.get("cpu_us"), ".0f"),
                    dash(_cores(x, "cpu_us"), ".2f"),
                    dash(x.get("backend_cpu_us"), ".0f"),
                    dash(_cores(x, "backend_cpu_us"), ".2f"),
                    x.get("failed", 0) + x.get("non_2xx", 0),
                )
            )
        c = _grpc_comparison(g, measure)
        if c is not None:
            table_rows.append(
                (
                    "stickyproxy ÷ NGINX",
                    ratio(c["rate_ratio"]),
                    " / ".join(ratio(r) for r in c["round_ratios"]),
                    ratio(c["cpu_ratio"]),
                    "",
                    "",
                    "",
                    "",
                )
            )
        parts.append(
            f"**{label}** ({unit})\n\n"
            + table(
                (
                    "",
                    unit,
                    "per round",
                    f"CPU µs/{one}",
                    "cores",
                    f"backends' CPU µs/{one}",
                    "backends' cores",
                    "errors",
                ),
                table_rows,
            )
        )
        note = _grpc_pace(label, one, (ng or {}).get("summary"), (sp or {}).get("summary"), c)
        if note:
            notes.append(note)
    proxies = [
        (busy, label, name)
        for measure, label, _, _ in GRPC_MEASURES
        for target, name in GRPC_TARGETS
        if (busy := _cores((rows.get((measure, target)) or {}).get("summary") or {}, "cpu_us"))
        is not None
    ]
    before, after = g.get("loadavg_before"), g.get("loadavg_after")
    text = "- **The machine was shared**"
    if before and after:
        text += (
            f" (load average over 1 minute: {before[0]:.2f} as the run began, {after[0]:.2f} "
            f"as it ended)"
        )
    text += (
        ": the h2load processes (one thread each; their CPU is not measured), the backends "
        "and the proxy under test compete for the same CPUs"
    )
    if proxies:
        most, label, name = max(proxies)
        if most < TLS_SATURATED_CORE:
            text += f", and neither proxy had a core to itself (at most {most:.2f} of one)"
        else:
            text += f"; {name} used {most:.2f} of a core ({label}), its own limit there"
    notes.append(
        text + ". Rates and their ratios measure the machine as much as the proxies; the CPU "
        "per call or request is the comparison that holds."
    )
    if g.get("skipped"):
        notes.append("- Not measured: " + "; ".join(g["skipped"]) + ".")
    parts.append("\n".join(notes))
    return "\n\n".join(parts)


def run_header(meta: dict[str, Any]) -> str:
    rows = [
        (
            name,
            v.get("started_at", "-"),
            duration(v["seconds"]) if "seconds" in v else v.get("status", "-"),
            " / ".join(f"{x:.2f}" for x in v["loadavg_at_start"])
            if v.get("loadavg_at_start")
            else "-",
        )
        for name, v in meta["scenarios"].items()
    ]
    tools = ", ".join(f"{k} {v}" for k, v in meta["tools"].items())
    return "\n".join(
        [
            (
                f"Written by `{meta['command']}` on {meta['started_at']}; {meta['cpus']} CPUs "
                f"({meta['platform']}); {tools}. When each benchmark ran, and how busy the machine "
                "was as it started (load average over 1, 5 and 15 minutes):\n"
            ),
            table(("benchmark", "started", "took", "load average at start"), rows, left=2),
            "",
        ]
    )


def render(
    results: dict[str, dict[str, Any]],
    images: dict[str, Path | None],
    doc_path: Path,
    meta: dict[str, Any],
) -> str:
    doc_dir = doc_path.parent
    parts = [
        "<!-- generated by `python -m bench`; edit bench/document.py, not this file -->",
        "# Benchmarks\n",
        run_header(meta),
        (
            "**How to read these numbers.** The machine is small (2 CPUs) and shared: the load "
            "generator, the backends, Redis and the proxy under test all compete for the same two "
            "cores, and other tenants may too. Absolute figures move by tens of percent from run to "
            "run; what is reported is ratios *within one run*, each the median of interleaved "
            "rounds (target A, B, C, then A, B, C again…) so that a slow moment hits every target "
            "alike. Per-round figures are shown so the spread can be judged. Raw results, with every "
            "round, are written to `bench/results/*.json` (not committed).\n"
        ),
        summary_section(results),
    ]
    if "dataplane" in results:
        parts.append(
            dataplane_section(
                results["dataplane"],
                results.get("streams"),
                results.get("profile"),
                images,
                doc_dir,
            )
        )
    if "shop" in results:
        parts.append(shop_section(results["shop"], images, doc_dir))
    if "failover" in results:
        parts.append(failover_section(results["failover"], images, doc_dir))
    if "ring" in results:
        parts.append(ring_section(results["ring"], images, doc_dir))
    if "killdrill" in results:
        parts.append(killdrill_section(results["killdrill"], images, doc_dir))
    if "owners" in results:
        parts.append(owners_section(results["owners"], images, doc_dir))
    if "skew" in results:
        parts.append(skew_section(results["skew"], images, doc_dir))
    if "tls" in results:
        parts.append(tls_section(results["tls"], results.get("dataplane"), images, doc_dir))
    if "grpc" in results:
        parts.append(grpc_section(results["grpc"]))
    parts.append("## Reproducing\n\n" + REPRODUCE)
    return "\n\n".join(p.strip("\n") for p in parts if p) + "\n"


# -- keeping the previous report's parts whose results are absent ---------------------------
# bench/results/ is not committed, so on a fresh checkout `--only NAME` has no results for the
# other benchmarks: their sections, summary rows and header rows are kept from the report
# being replaced instead of dropped. Each benchmark's section heading and summary targets:
SECTION_HEADINGS = (
    ("dataplane", "## 1. Data plane"),
    ("shop", "## 2. Sticky vs stateless"),
    ("failover", "## 3. Failover drill"),
    ("ring", "## 4. The ring"),
    ("killdrill", "## 5. Backends killed under load"),
    ("owners", "## 6. Owner-local features"),
    ("skew", "## 7. Skewed users"),
    ("tls", "## 8. TLS termination"),
    ("grpc", "## 9. gRPC and HTTP/2"),
)
VERDICT_PREFIXES = (
    ("dataplane", ("proxy throughput", "p99 added latency")),
    ("ring", ("ring lookup",)),
    ("shop", ("≥ 95% fewer Redis", "higher throughput than the stateless")),
    ("killdrill", ("kill one of three every",)),
    ("failover", ("kill one of three",)),
    ("owners", ("owner-local features",)),
    ("tls", ("TLS keep-alive",)),
    ("grpc", ("gRPC unary calls", "HTTP/2 streams")),
)
SUMMARY_HEADING = "## DESIGN.md §8"
HEADER_TABLE = "| benchmark | started |"
SECTION_START = re.compile(r"(?m)^(?=## )")


def _sections(text: str) -> tuple[str, list[str]]:
    """The text before the first `## ` heading, and each section (heading line first)."""
    parts = SECTION_START.split(text)
    return parts[0], [p.rstrip("\n") for p in parts[1:]]


def _section_owner(section: str) -> str | None:
    return next((name for name, heading in SECTION_HEADINGS if section.startswith(heading)), None)


def _row_owner(row: str) -> str | None:
    target = row.strip("| ").split(" | ")[0]
    return next((name for name, prefixes in VERDICT_PREFIXES if target.startswith(prefixes)), None)


def _table_rows(text: str, start: str) -> list[str]:
    """The body rows of the Markdown table whose header line starts with `start`."""
    lines = text.splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith(start)), None)
    if at is None:
        return []
    rows = []
    for line in lines[at + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def _replace_rows(text: str, start: str, rows: list[str]) -> str:
    old = _table_rows(text, start)
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith(start)) + 2
    new_lines = [r + "\n" for r in rows]
    return "".join(lines[:at] + new_lines + lines[at + len(old) :])


def carry_over(new: str, old: str, measured: Iterable[str]) -> str:
    """`new` (a rendered report) with what `old` (the report it replaces) showed of the
    benchmarks absent from `measured`: their sections, in their places; their rows of the
    summary, instead of "not measured"; their rows of the header's table of runs."""
    measured = set(measured)
    new_pre, new_sections = _sections(new)
    old_pre, old_sections = _sections(old)
    present = {_section_owner(s) for s in new_sections}
    kept = [
        s
        for s in old_sections
        if _section_owner(s) not in measured
        and _section_owner(s) not in present
        and _section_owner(s) is not None
    ]
    if not kept:
        return new
    carried = {_section_owner(s) for s in kept}
    order = [name for name, _ in SECTION_HEADINGS]
    sections = list(new_sections)
    for section in kept:
        rank = order.index(_section_owner(section) or "")
        at = next(
            (
                i
                for i, s in enumerate(sections)
                if (_section_owner(s) is not None and order.index(_section_owner(s) or "") > rank)
                or s.startswith("## Reproducing")
            ),
            len(sections),
        )
        sections.insert(at, section)
    for i, section in enumerate(sections):
        if section.startswith(SUMMARY_HEADING):
            old_summary = next((s for s in old_sections if s.startswith(SUMMARY_HEADING)), "")
            sections[i] = _merge_summary(section, old_summary, carried)
    header = _table_rows(new_pre, HEADER_TABLE)
    names = {r.strip("| ").split(" | ")[0] for r in header}
    earlier = [
        r for r in _table_rows(old_pre, HEADER_TABLE) if r.strip("| ").split(" | ")[0] not in names
    ]
    if header and earlier:
        new_pre = _replace_rows(new_pre, HEADER_TABLE, earlier + header)
    return _name_earlier_run(new_pre, old_pre) + "\n\n".join(sections) + "\n"


WRITTEN_BY, RUNS_TABLE_INTRO, KEPT = "Written by ", " When each benchmark ran", " The sections "


def _name_earlier_run(new_pre: str, old_pre: str) -> str:
    """The header, saying which run wrote the sections kept from the report before (its
    command, date and tool versions), as that report said it."""
    old_line = next((ln for ln in old_pre.splitlines() if ln.startswith(WRITTEN_BY)), "")
    written, _, kept = old_line.split(RUNS_TABLE_INTRO)[0].partition(KEPT)
    if not written or RUNS_TABLE_INTRO not in new_pre:
        return new_pre
    # a report that already kept sections from an earlier run names that run
    note = (
        KEPT + kept
        if kept
        else f"{KEPT}of the benchmarks not run by that command are kept from the report before, "
        f"w{written[1:]}"
    )
    return new_pre.replace(RUNS_TABLE_INTRO, note + RUNS_TABLE_INTRO, 1)


def _merge_summary(new: str, old: str, carried: set[str]) -> str:
    """The summary table with the rows of `carried` benchmarks taken from `old`, each group
    where the new table had that benchmark's rows."""
    start = "| target |"
    old_rows = _table_rows(old, start)
    rows: list[str] = []
    done: set[str] = set()
    for row in _table_rows(new, start):
        owner = _row_owner(row)
        if owner not in carried:
            rows.append(row)
        elif owner not in done:
            done.add(owner)
            rows += [r for r in old_rows if _row_owner(r) == owner] or [row]
    return _replace_rows(new, start, rows).rstrip("\n")


REPRODUCE = """```sh
pip install -e '.[bench]'
python -m bench --install        # apt-get installs nginx, haproxy, wrk, redis-server if missing
python -m bench                  # everything, about 25 minutes; rewrites this file
python -m bench --only shop      # one benchmark (dataplane, streams, shop, failover, killdrill,
                                 # owners, ring, profile, skew, tls, grpc)
python -m bench --smoke          # tiny counts, about two minutes: checks the harness, not the speed
```

See [bench/README.md](../bench/README.md) for what each benchmark does and its options."""
