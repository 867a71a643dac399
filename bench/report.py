"""Summaries of a run's rounds, the printed table, the JSON file and the chart."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STATUS_OK = "ok"
TABLE_HEADERS = (
    "target",
    "req/s",
    "x nginx",
    "rounds (req/s)",
    "p50 ms",
    "p99 ms",
    "p99 x nginx",
    "CPU us/req",
    "CPU x nginx",
    "non-2xx",
    "sock err",
)
CHART_SIZE = (11, 4.5)
CHART_DPI = 120
BAR_WIDTH = 0.38


def _median_of(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median req/s, latencies and CPU per request over the rounds, errors summed."""
    return {
        "rps_median": statistics.median(r["rps"] for r in runs),
        "rps_rounds": [r["rps"] for r in runs],
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "cpu_us": _median_of(runs, "cpu_us"),
        "user_us": _median_of(runs, "user_us"),
        "system_us": _median_of(runs, "system_us"),
        "non_2xx": sum(r["non_2xx"] for r in runs),
        "socket_errors": sum(r["socket_errors"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
    }


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def ratios(summary: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, float | None]:
    if baseline is None:
        return {"rps": None, "p50": None, "p99": None, "cpu": None}
    return {
        "rps": _ratio(summary["rps_median"], baseline["rps_median"]),
        "p50": _ratio(summary["p50_ms"], baseline["p50_ms"]),
        "p99": _ratio(summary["p99_ms"], baseline["p99_ms"]),
        "cpu": _ratio(summary["cpu_us"], baseline["cpu_us"]),
    }


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _fmt_us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table_rows(targets: Sequence[dict[str, Any]]) -> list[list[str]]:
    """TABLE_HEADERS' cells for each measured target."""
    return [_row(t) for t in targets if t["status"] == STATUS_OK and t["summary"]]


def _row(target: dict[str, Any]) -> list[str]:
    s, r = target["summary"], target["ratio_to_nginx"]
    return [
        target["label"],
        f"{s['rps_median']:,.0f}",
        _fmt_ratio(r["rps"]),
        " / ".join(f"{x:,.0f}" for x in s["rps_rounds"]),
        f"{s['p50_ms']:.2f}",
        f"{s['p99_ms']:.2f}",
        _fmt_ratio(r["p99"]),
        _fmt_us(s.get("cpu_us")),
        _fmt_ratio(r.get("cpu")),
        f"{s['non_2xx']:,}",
        f"{s['socket_errors']:,}",
    ]


def render_table(targets: Sequence[dict[str, Any]]) -> str:
    rows = [list(TABLE_HEADERS)] + table_rows(targets)
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADERS))]

    def line(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells)

    out = [line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]]
    out += [
        f"{t['label']}: {t['status']}: {t['reason']}" for t in targets if t["status"] != STATUS_OK
    ]
    return "\n".join(out)


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def write_chart(path: Path, targets: Sequence[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [t for t in targets if t["status"] == STATUS_OK and t["summary"]]
    labels = [t["label"] for t in measured]
    xs = range(len(measured))
    fig, (ax_rps, ax_lat) = plt.subplots(1, 2, figsize=CHART_SIZE)

    ax_rps.bar(xs, [t["summary"]["rps_median"] for t in measured], color="tab:blue", label="median")
    for x, t in zip(xs, measured):
        rounds = t["summary"]["rps_rounds"]
        ax_rps.scatter(
            [x] * len(rounds),
            rounds,
            color="black",
            s=12,
            zorder=3,
            label="rounds" if x == 0 else None,
        )
        ratio = t["ratio_to_nginx"]["rps"]
        if ratio is not None:
            ax_rps.annotate(
                f"{ratio:.2f}x",
                (x, t["summary"]["rps_median"]),
                ha="center",
                va="bottom",
                xytext=(0, 3),
                textcoords="offset points",
            )
    ax_rps.set_xticks(list(xs), labels)
    ax_rps.set_ylabel("requests/s")
    ax_rps.set_title("throughput (higher is better)")
    ax_rps.legend(loc="lower right")

    ax_lat.bar(
        [x - BAR_WIDTH / 2 for x in xs],
        [t["summary"]["p50_ms"] for t in measured],
        BAR_WIDTH,
        label="p50",
        color="tab:green",
    )
    ax_lat.bar(
        [x + BAR_WIDTH / 2 for x in xs],
        [t["summary"]["p99_ms"] for t in measured],
        BAR_WIDTH,
        label="p99",
        color="tab:red",
    )
    ax_lat.set_xticks(list(xs), labels)
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_title("latency, median of rounds (lower is better)")
    ax_lat.legend()

    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=CHART_DPI)
    plt.close(fig)
