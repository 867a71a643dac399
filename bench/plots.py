"""The PNG charts of docs/benchmarks.md, drawn from the results of each benchmark."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DPI = 110
WIDE = (11, 4.2)
COLORS = {
    "direct": "tab:gray",
    "nginx": "tab:green",
    "haproxy": "tab:orange",
    "stickyproxy-py": "tab:cyan",
    "stickyproxy": "tab:blue",
    "sticky": "tab:blue",
    "stateless": "tab:red",
}
BAR = 0.38
BACKEND_COLORS = ("tab:purple", "tab:brown", "tab:olive", "tab:gray", "tab:pink")
STATE_COLORS = {"connect-failed": "tab:orange", "down": "black", "ejected": "tab:purple"}


def _color(label: str) -> str:
    return COLORS.get(label.split(" ")[0], "tab:purple")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _short(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _bars(
    ax: Any,
    labels: Sequence[str],
    values: Sequence[float | None],
    *,
    annotate: Sequence[str] | None = None,
) -> None:
    xs = range(len(labels))
    ax.bar(xs, [v or 0 for v in values], color=[_color(lbl) for lbl in labels])
    ax.set_xticks(list(xs), labels, rotation=20, ha="right")
    for x, v, note in zip(xs, values, annotate or [""] * len(labels)):
        if v and note:
            ax.annotate(
                note,
                (x, v),
                ha="center",
                va="bottom",
                xytext=(0, 2),
                textcoords="offset points",
                fontsize=8,
            )


def dataplane(path: Path, result: dict[str, Any]) -> Path | None:
    measured = [t for t in result["targets"] if t.get("summary")]
    if not measured:
        return None
    labels = [t["label"] for t in measured]
    fig, (ax_rps, ax_cpu) = plt.subplots(1, 2, figsize=WIDE)
    rps = [t["summary"]["rps_median"] for t in measured]
    _bars(ax_rps, labels, rps)
    for x, t in enumerate(measured):
        rounds = t["summary"]["rps_rounds"]
        ax_rps.scatter([x] * len(rounds), rounds, color="black", s=10, zorder=3)
        ratio = t["ratio_to_nginx"]["rps"]
        if ratio:
            ax_rps.annotate(
                f"{ratio:.2f}x",
                (x, max(rounds)),
                ha="center",
                va="bottom",
                xytext=(0, 4),
                textcoords="offset points",
                fontsize=8,
            )
    ax_rps.margins(y=0.08)
    ax_rps.set_ylabel("requests/s (median of rounds; dots: rounds)")
    ax_rps.set_title("throughput, ratio to NGINX at the same worker count")
    user = [t["summary"].get("user_us") or 0 for t in measured]
    system = [t["summary"].get("system_us") or 0 for t in measured]
    xs = list(range(len(measured)))
    ax_cpu.bar(xs, user, color="tab:blue", label="user")
    ax_cpu.bar(xs, system, bottom=user, color="tab:red", label="system (kernel)")
    ax_cpu.set_xticks(xs, labels, rotation=20, ha="right")
    ax_cpu.set_ylabel("CPU microseconds per request")
    ax_cpu.set_title("proxy CPU per request (whole process tree)")
    ax_cpu.legend()
    return _save(fig, path)


def half_load(path: Path, result: dict[str, Any]) -> Path | None:
    groups = result.get("half_load") or []
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=WIDE, squeeze=False)
    for ax, group in zip(axes[0], groups):
        targets = group["targets"]
        labels = [t["label"] for t in targets]
        xs = list(range(len(targets)))
        ax.bar(
            [x - BAR / 2 for x in xs],
            [t["p50_ms"] or 0 for t in targets],
            BAR,
            label="p50",
            color="tab:green",
        )
        ax.bar(
            [x + BAR / 2 for x in xs],
            [t["p99_ms"] or 0 for t in targets],
            BAR,
            label="p99",
            color="tab:red",
        )
        for x, t in zip(xs, targets):
            if t["added_p99_ms"] is not None:
                ax.annotate(
                    f"{t['added_p99_ms']:+.2f} ms",
                    (x + BAR / 2, t["p99_ms"]),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
        ax.set_xticks(xs, labels, rotation=20, ha="right")
        ax.set_ylabel("latency ms (median of rounds)")
        count = group["workers"]
        ax.set_title(f"{count} worker{'' if count == 1 else 's'} at {group['rate']:,.0f} req/s")
        ax.margins(y=0.12)
        ax.legend()
    fig.suptitle("latency at half of stickyproxy's saturation rate (label: p99 added vs direct)")
    return _save(fig, path)


def streams(path: Path, result: dict[str, Any]) -> Path | None:
    uploads, ws = result.get("uploads") or [], result.get("websocket") or []
    if not uploads and not ws:
        return None
    sizes = sorted({u["size_mib"] for u in uploads})
    fig, axes = plt.subplots(1, len(sizes) + 1, figsize=WIDE)
    for ax, size in zip(axes, sizes):
        rows = [u for u in uploads if u["size_mib"] == size]
        _bars(
            ax,
            [r["label"] for r in rows],
            [r["mib_per_s"] for r in rows],
            annotate=[f"{r['x_direct']:.2f}x" if r["x_direct"] else "" for r in rows],
        )
        ax.set_ylabel("MiB/s (median)")
        ax.set_title(f"upload {size} MiB")
    _bars(
        axes[-1],
        [w["label"] for w in ws],
        [w["messages_per_s"] for w in ws],
        annotate=[f"{w['x_direct']:.2f}x" if w["x_direct"] else "" for w in ws],
    )
    axes[-1].set_ylabel("messages/s (median)")
    axes[-1].set_title("WebSocket echo")
    return _save(fig, path)


def shop(path: Path, result: dict[str, Any]) -> Path:
    modes = result["modes"]
    names = list(modes)
    panels = (
        ("round_trips_per_request", "Redis round trips / request"),
        ("commands_executed_per_request", "Redis commands executed / request"),
        ("rps", "requests/s"),
        ("p99_ms", "p99 latency ms"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 3.8))
    for ax, (key, title) in zip(axes, panels):
        values = [modes[m][key] for m in names]
        _bars(ax, names, values, annotate=[_short(v) for v in values])
        ax.set_title(title, fontsize=10)
    fig.suptitle(
        "the shop, sticky (context library) vs stateless (Redis per request); medians of rounds"
    )
    return _save(fig, path)


def shop_sweep(path: Path, result: dict[str, Any]) -> Path:
    rows = result["write_share_sweep"]
    shares = [r["write_share"] * 100 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(
        shares,
        [r["round_trips_per_request"]["fewer"] * 100 for r in rows],
        marker="o",
        label="round trips",
    )
    ax.plot(
        shares,
        [r["commands_executed_per_request"]["fewer"] * 100 for r in rows],
        marker="s",
        label="commands executed",
    )
    ax.axhline(
        result["comparison"]["target"] * 100,
        color="black",
        linestyle="--",
        label="DESIGN.md §8 target",
    )
    mix_share = result["settings"]["write_share"] * 100
    ax.axvline(mix_share, color="gray", linestyle=":", label="the measured mix")
    ax.set_xlabel("% of requests that change state")
    ax.set_ylabel("% fewer Redis operations than stateless")
    ax.set_title("sticky vs stateless, from the single-action runs")
    ax.legend()
    return _save(fig, path)


def failover(path: Path, result: dict[str, Any]) -> Path:
    tl = result["timeline"]
    seconds = tl["seconds"]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    edges = seconds + [seconds[-1] + 1] if seconds else []
    for backend in sorted(tl["served"]):
        values = tl["served"][backend]
        ax.stairs(values, edges, linewidth=2, label=f"served by {backend}")
    failed = [sum(v[i] for v in tl["failed"].values()) for i in range(len(seconds))]
    if any(failed):
        ax.bar(
            seconds,
            failed,
            width=1.0,
            align="edge",
            color="red",
            alpha=0.5,
            label="failed requests",
        )
    shown: set[str] = set()
    for begin, end, state in result.get("victim_states", []):
        if state == "up":
            continue
        ax.axvspan(
            begin,
            end,
            color=STATE_COLORS.get(state, "tab:gray"),
            alpha=0.15,
            label=None if state in shown else f"{result['settings']['victim']} {state} (admin API)",
        )
        shown.add(state)
    for key, text in (("kill_s", "kill"), ("restart_s", "restart")):
        ax.axvline(result[key], color="black", linestyle="--")
        ax.annotate(
            text,
            (result[key], ax.get_ylim()[1]),
            ha="left",
            va="top",
            xytext=(3, -3),
            textcoords="offset points",
        )
    ax.set_xlabel("seconds since the drill started")
    ax.set_ylabel("requests per second")
    ax.set_title(
        f"kill and restart of {result['settings']['victim']} under "
        f"{result['settings']['rate']:g} req/s"
    )
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def ring(path: Path, result: dict[str, Any]) -> Path:
    fig, (ax_bal, ax_move) = plt.subplots(1, 2, figsize=WIDE)
    counts = sorted({b["backends"] for b in result["balance"]})
    for count in counts:
        rows = [b for b in result["balance"] if b["backends"] == count]
        ax_bal.plot(
            [r["vnodes"] for r in rows],
            [r["max_over_avg"] for r in rows],
            marker="o",
            label=f"{count} backends",
        )
        moves = [m for m in result["movement"] if m["backends"] == count]
        vn = [m["vnodes"] for m in moves]
        ax_move.plot(vn, [m["added"] * 100 for m in moves], marker="o", label=f"add to {count}")
        ax_move.plot(
            vn, [m["removed"] * 100 for m in moves], marker="s", label=f"remove from {count}"
        )
        ax_move.axhline(moves[0]["added_ideal"] * 100, color="gray", linestyle=":")
        ax_move.axhline(moves[0]["removed_ideal"] * 100, color="gray", linestyle="--")
    vnodes = sorted({b["vnodes"] for b in result["balance"]})
    for ax in (ax_bal, ax_move):
        ax.set_xscale("log")
        ax.set_xticks(vnodes, [str(v) for v in vnodes])
        ax.minorticks_off()
        ax.set_xlabel("vnodes (points per unit of weight)")
        ax.legend(fontsize=8)
    ax_bal.axhline(1.0, color="gray", linestyle=":")
    ax_bal.set_ylabel("largest share / average share")
    ax_bal.set_title("balance (exact, over the hash space)")
    ax_move.set_ylabel("% of keys that change backend")
    ax_move.set_title("keys moved (gray: 1/(N+1) and 1/N ideal)")
    return _save(fig, path)


def killdrill(path: Path, result: dict[str, Any]) -> Path | None:
    measured = [t for t in result["targets"] if t.get("status") == "ok"]
    if not measured:
        return None
    fig, axes = plt.subplots(1, len(measured), figsize=WIDE, squeeze=False, sharey=True)
    for ax, t in zip(axes[0], measured):
        answered, failed = t["timeline"]["answered"], t["timeline"]["failed"]
        edges = list(range(len(answered) + 1))
        ax.stairs(answered, edges, linewidth=2, color=_color(t["name"]), label="answered 200")
        for (backend, served), color in zip(
            sorted((t["timeline"].get("served") or {}).items()), BACKEND_COLORS
        ):
            ax.stairs(served, edges, linewidth=0.8, color=color, label=f"by {backend}")
        if any(failed):
            twin = ax.twinx()
            twin.bar(range(len(failed)), failed, width=1.0, align="edge", color="red", alpha=0.5)
            twin.set_ylabel("failed GETs per second (red bars)", color="red")
        for e in t["events"]:
            ax.axvline(
                e["at"],
                color="black",
                linewidth=0.8,
                linestyle="--" if e["action"] == "kill" else ":",
            )
        ax.set_title(
            f"{t['name']}: {t['failed']:,} failed of {t['answered'] + t['failed']:,}", fontsize=10
        )
        ax.set_xlabel("s (dashed: kill -9, dotted: started again)", fontsize=9)
        ax.legend(loc="upper right", fontsize=7)
    axes[0][0].set_ylabel("GETs per second")
    fig.suptitle("a backend killed -9 every few seconds under load, each proxy in turn")
    return _save(fig, path)


# (design, Redis path) of each bar in a feature's group, in drawing order, and its look.
OWNER_BARS = (
    ("sticky", "loopback", "owner, Redis on loopback", "tab:blue", ""),
    ("stateless", "loopback", "stateless, Redis on loopback", "tab:red", ""),
    ("sticky", "relay", "owner, Redis behind the relay", "lightsteelblue", "//"),
    ("stateless", "relay", "stateless, Redis behind the relay", "lightsalmon", "//"),
)
OWNER_PANELS = (
    ("round_trips_per_request", "Redis round trips per request"),
    ("redis_commands_per_request", "Redis commands per request"),
    ("rps", "requests/s (higher is better)"),
    ("p99_ms", "p99 ms (lower is better)"),
)
# Following a job's progress: per update delivered, not per request.
FOLLOW_PANELS = (
    ("round_trips_per_update", "Redis round trips per update"),
    ("redis_commands_per_update", "Redis commands per update"),
    ("latency_p50_ms", "change to client, p50 ms (lower is better)"),
    ("latency_p99_ms", "change to client, p99 ms (lower is better)"),
)
COUNT_KEYS = frozenset(
    {
        "round_trips_per_request",
        "redis_commands_per_request",
        "round_trips_per_update",
        "redis_commands_per_update",
    }
)


def _owner_panels(
    axes: Sequence[Any],
    rows: dict[tuple[str, str, str], dict[str, Any]],
    features: Sequence[str],
    panels: Sequence[tuple[str, str]],
    labels: dict[str, str],
) -> None:
    width = 0.8 / len(OWNER_BARS)
    for ax, (key, title) in zip(axes, panels):
        for i, (design, redis_path, label, color, hatch) in enumerate(OWNER_BARS):
            xs = [x + (i - (len(OWNER_BARS) - 1) / 2) * width for x in range(len(features))]
            values = [(rows.get((f, design, redis_path)) or {}).get(key) for f in features]
            ax.bar(
                xs,
                [v or 0 for v in values],
                width,
                color=color,
                hatch=hatch,
                edgecolor="black",
                linewidth=0.4,
                label=labels[design] + "," + label.split(",", 1)[1] if design in labels else label,
            )
            if key in COUNT_KEYS or len(features) == 1:
                for x, v in zip(xs, values):
                    if v is not None:
                        ax.annotate(
                            f"{v:.2g}" if key in COUNT_KEYS else _short(v),
                            (x, v),
                            ha="center",
                            va="bottom",
                            xytext=(0, 2),
                            textcoords="offset points",
                            fontsize=7,
                        )
        ax.set_xticks(list(range(len(features))), features)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(title, fontsize=10)


def owners(path: Path, result: dict[str, Any]) -> Path | None:
    """Top row: the features checked on every request; bottom row (when measured): following
    a running job's progress, pushed over a WebSocket by the owner vs polled from Redis."""
    rows = {(r["feature"], r["design"], r["redis"]): r for r in result["rows"]}
    per_request = list(
        dict.fromkeys(r["feature"] for r in result["rows"] if r.get("kind", "request") == "request")
    )
    follow = list(dict.fromkeys(r["feature"] for r in result["rows"] if r.get("kind") == "follow"))
    if not per_request and not follow:
        return None
    groups = [
        g
        for g in (
            (per_request, OWNER_PANELS, {}),
            (
                follow,
                FOLLOW_PANELS,
                {
                    "sticky": "owner pushes over a WebSocket",
                    "stateless": "stateless, polled from Redis",
                },
            ),
        )
        if g[0]
    ]
    fig, grid = plt.subplots(
        len(groups), len(OWNER_PANELS), figsize=(15, 4.4 * len(groups)), squeeze=False
    )
    for axes, (features, panels, labels) in zip(grid, groups):
        _owner_panels(axes, rows, features, panels, labels)
        counts = [r.get(panels[0][0]) or 0 for r in result["rows"] if r["feature"] in features]
        # headroom above the tallest bar of the first panel, for the legend
        axes[0].set_ylim(0, max(counts) * 2.0 or 1)
        axes[0].legend(loc="upper left", fontsize=6.5, ncol=1)
    added = result.get("relay", {}).get("added_rtt_ms")
    fig.suptitle(
        "owner-local features vs the same kept in Redis"
        + (f" (the relay adds {added:.2f} ms per round trip)" if added else "")
    )
    return _save(fig, path)


TLS_MEASURES = (
    ("plain", None, "plain HTTP\nkeep-alive"),
    ("keepalive", "ecdsa", "TLS\nkeep-alive"),
    ("reconnect", "ecdsa", "TLS reconnect\n(resumed)"),
    ("handshake", "ecdsa", "full handshake\nECDSA P-256"),
    ("handshake", "rsa", "full handshake\nRSA-2048"),
)


def tls(path: Path, result: dict[str, Any]) -> Path | None:
    """Left: stickyproxy's rate over NGINX's for each measure (same run, back to back), the
    0.5x target line; right: each proxy's CPU per request or handshake."""
    rows = {
        (r["mode"], r["key"], r["target"]): r["summary"] for r in result["rows"] if r.get("summary")
    }
    ratios = {(c["mode"], c["key"]): c["rate_ratio"] for c in result["comparisons"]}
    shown = [
        m for m in TLS_MEASURES if any((m[0], m[1], t) in rows for t in ("nginx", "stickyproxy"))
    ]
    if not shown:
        return None
    labels = [m[2] for m in shown]
    xs = list(range(len(shown)))
    fig, (ax_ratio, ax_cpu) = plt.subplots(1, 2, figsize=WIDE)
    cpu_ratios = {(c["mode"], c["key"]): c.get("cpu_ratio") for c in result["comparisons"]}
    series = (
        ("req/s or handshakes/s (median of the rounds' ratios)", ratios, "tab:blue"),
        (
            "per CPU-second (NGINX's CPU per request ÷ stickyproxy's)",
            {k: 1 / v for k, v in cpu_ratios.items() if v},
            "tab:cyan",
        ),
    )
    for i, (name, got, color) in enumerate(series):
        values = [got.get((m[0], m[1])) for m in shown]
        bx = [x + (i - 0.5) * BAR for x in xs]
        ax_ratio.bar(bx, [v or 0 for v in values], BAR, color=color, label=name)
        for bar_x, v in zip(bx, values):
            if v is not None:
                ax_ratio.annotate(
                    f"{v:.2f}x",
                    (bar_x, v),
                    ha="center",
                    va="bottom",
                    xytext=(0, 2),
                    textcoords="offset points",
                    fontsize=7,
                )
    ax_ratio.legend(fontsize=7, loc="upper left")
    ax_ratio.set_ylim(0, 1.35)
    ax_ratio.axhline(0.5, color="black", linestyle="--", linewidth=0.8)
    ax_ratio.axhline(1.0, color=COLORS["nginx"], linewidth=0.8)
    ax_ratio.set_xticks(xs, labels, fontsize=8)
    ax_ratio.set_title("stickyproxy ÷ NGINX, 1 worker each, same run", fontsize=10)
    for i, target in enumerate(("nginx", "stickyproxy")):
        cpu = [(rows.get((m[0], m[1], target)) or {}).get("cpu_us") for m in shown]
        bx = [x + (i - 0.5) * BAR for x in xs]
        ax_cpu.bar(bx, [v or 0 for v in cpu], BAR, color=COLORS[target], label=target)
        for bar_x, v in zip(bx, cpu):
            if v is not None:
                ax_cpu.annotate(
                    _short(v),
                    (bar_x, v),
                    ha="center",
                    va="bottom",
                    xytext=(0, 2),
                    textcoords="offset points",
                    fontsize=7,
                )
    ax_cpu.set_xticks(xs, labels, fontsize=8)
    ax_cpu.set_yscale("log")
    ax_cpu.set_title(
        "proxy CPU µs per request (per connection for handshakes), log scale", fontsize=10
    )
    ax_cpu.legend(fontsize=8)
    return _save(fig, path)
