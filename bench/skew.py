"""Skewed users over three backends: bounded load and gradual failback, simulated (no sockets).

Users are Zipf-distributed (s = 1.1) over the real ring (stickyproxy.routing.ring), and the
decisions are the real ones (stickyproxy.routing.spill, stickyproxy.routing.ramp); only time,
arrivals and service are simulated, so the figures are exact for the model and the same on
every machine (seeded).

- **Load spread** (``balance``): requests arrive as a Poisson stream and stay in flight for an
  exponential time (mean in flight across the three backends: ``INFLIGHT_MEAN``). Each is
  sent to its owner, or, with a balance factor, spilled along its preference list by
  ``spill.choose`` on the in-flight counts of that instant. Per factor: each backend's share
  of requests and its peak in flight against the mean, the share of requests served off
  their owner, and user moves (a request served by another backend than the same user's
  previous one: each is a rehydration from Redis for the context library).
- **Failback** (``failback``): one backend is down, its users on their failover targets; it
  recovers at ``RECOVERY_AT`` seconds. A rehydration is a request of one of its users that
  lands on it for the first time since the recovery. Counted per second without a ramp (all
  of them return at once) and with ``health.failback_ramp`` = ``RAMP`` seconds; also how many
  requests two proxies whose ramps start ``FLEET_SKEW`` apart (one health-check interval)
  send to different backends.

    python -m bench.skew [--smoke] [--out DIR]      # also: python -m bench --only skew
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any, Callable

from stickyproxy.routing import ramp, spill
from stickyproxy.routing.ring import Member, Ring

BACKENDS = ("app-1", "app-2", "app-3")
ZIPF_S = 1.1
USERS, SMOKE_USERS = 100_000, 20_000
SEED = 22
# -- balance
BALANCE_REQUESTS, SMOKE_BALANCE_REQUESTS = 300_000, 40_000
# Mean requests in flight over all backends (Little's law: arrival rate x service time);
# about what 3 small app instances hold under a moderate load.
INFLIGHT_MEAN = 48
FACTORS: tuple[float | None, ...] = (None, 2.0, 1.5, 1.25)
# -- failback
REQUEST_RATE, SMOKE_REQUEST_RATE = 4000.0, 1500.0     # requests per second, all users
RECOVERY_AT = 5.0                                       # seconds into the simulated window
RAMP, SMOKE_RAMP = 30.0, 10.0                           # health.failback_ramp
AFTER_RAMP = 15.0                                       # seconds simulated after the ramp
FLEET_SKEW = 0.5                                        # seconds between two proxies' starts
VICTIM = "app-2"

RESULTS = Path(__file__).resolve().parent / "results"


class Sim:
    """A simulated backend: its in-flight count and weight."""

    __slots__ = ("id", "inflight", "weight")

    def __init__(self, backend_id: str):
        self.id = backend_id
        self.inflight = 0
        self.weight = 1


def zipf_users(users: int, count: int, rng: random.Random, s: float = ZIPF_S) -> list[int]:
    """``count`` draws of a user index (0 = hottest), user i with weight 1 / (i + 1)**s."""
    cum = list(itertools.accumulate(1.0 / i ** s for i in range(1, users + 1)))
    top = cum[-1]
    return [bisect.bisect_left(cum, rng.random() * top) for _ in range(count)]


def user_key(i: int) -> str:
    return f"user-{i + 1}"


class Users:
    """``count`` users and each one's preference list on the ring (computed once per user)."""

    def __init__(self, ring: Ring, count: int):
        self.ring = ring
        self.count = count
        self._pref: dict[int, list[str]] = {}

    def preference(self, user: int) -> list[str]:
        pref = self._pref.get(user)
        if pref is None:
            pref = self._pref[user] = self.ring.preference(user_key(user))
        return pref


# -- load spread -------------------------------------------------------------------------

def balance_run(users: Users, draws: list[int], gaps: list[float], services: list[float],
                factor: float | None) -> dict[str, Any]:
    sims = {b: Sim(b) for b in BACKENDS}
    pct = spill.percent(factor) if factor is not None else 0
    served = dict.fromkeys(BACKENDS, 0)
    peak = dict.fromkeys(BACKENDS, 0)
    finishing: list[tuple[float, str]] = []
    last: dict[int, str] = {}
    ratios: list[float] = []
    off_owner = moves = total = 0
    now = 0.0
    weight = len(BACKENDS)
    for user, gap, service in zip(draws, gaps, services):
        now += gap
        while finishing and finishing[0][0] <= now:
            sims[heapq.heappop(finishing)[1]].inflight -= 1
            total -= 1
        pref = users.preference(user)
        if factor is None:
            chosen = sims[pref[0]]
        else:
            cands = [sims[b] for b in pref]
            chosen = cands[spill.choose([c.inflight for c in cands], [c.weight for c in cands],
                                        total, weight, pct)]
        chosen.inflight += 1
        total += 1
        if chosen.inflight > peak[chosen.id]:
            peak[chosen.id] = chosen.inflight
        # the busiest backend against the mean of this instant (this request counted)
        ratios.append(max(s.inflight for s in sims.values()) * len(BACKENDS) / total)
        heapq.heappush(finishing, (now + service, chosen.id))
        served[chosen.id] += 1
        off_owner += chosen.id != pref[0]
        previous = last.get(user)
        moves += previous is not None and previous != chosen.id
        last[user] = chosen.id
    n = len(draws)
    ratios.sort()
    return {"factor": factor, "requests": n,
            "share": {b: served[b] / n for b in BACKENDS},
            "max_share_over_mean": max(served.values()) / (n / len(BACKENDS)),
            "peak_inflight": peak,
            "busiest_over_mean": {"mean": sum(ratios) / n, "p50": ratios[n // 2],
                                  "p99": ratios[min(n - 1, n * 99 // 100)]},
            "off_owner_share": off_owner / n,
            "user_moves": moves, "user_moves_per_1000": 1000 * moves / n}


def balance(users: Users, requests: int, rng: random.Random,
            progress: Callable[[str], None]) -> dict[str, Any]:
    draws = zipf_users(users.count, requests, rng)
    # arrival rate 1 per time unit, so the mean service time is the mean in flight
    gaps = [rng.expovariate(1.0) for _ in range(requests)]
    services = [rng.expovariate(1.0 / INFLIGHT_MEAN) for _ in range(requests)]
    key_share = users.ring.key_share()
    hottest = users.preference(0)[0]
    hot_share = sum(1 for d in draws if d == 0) / requests
    runs = []
    for factor in FACTORS:
        r = balance_run(users, draws, gaps, services, factor)
        runs.append(r)
        progress(f"skew: balance factor {factor or 'off'}: shares "
                 + " ".join(f"{r['share'][b]:.1%}" for b in BACKENDS)
                 + f", busiest in flight p99 {r['busiest_over_mean']['p99']:.2f}x mean, off owner "
                 f"{r['off_owner_share']:.2%}, user moves {r['user_moves_per_1000']:.1f}/1000 req")
    return {"requests": requests, "inflight_mean": INFLIGHT_MEAN, "key_share": key_share,
            "hottest_user_owner": hottest, "hottest_user_share": hot_share, "runs": runs}


# -- failback ----------------------------------------------------------------------------

def failback(users: Users, rate: float, ramp_s: float, rng: random.Random,
             progress: Callable[[str], None]) -> dict[str, Any]:
    """Rehydrations per second on the recovered backend, without and with the ramp."""
    window = RECOVERY_AT + ramp_s + AFTER_RAMP
    count = int(rate * window)
    draws = zipf_users(users.count, count, rng)
    times = list(itertools.accumulate(rng.expovariate(rate) for _ in range(count)))
    keep = bisect.bisect_left(times, int(window))
    draws, times = draws[:keep], times[:keep]
    seconds = int(window)   # whole seconds: the last partial one is left out
    points: dict[int, int] = {}

    def point(user: int) -> int:
        p = points.get(user)
        if p is None:
            p = points[user] = ramp.key_point(user_key(user))
        return p

    curves: dict[str, list[int]] = {}
    summary: dict[str, dict[str, Any]] = {}
    for label, duration in (("no_ramp", 0.0), ("ramp", ramp_s)):
        per_second = [0] * seconds
        back: set[int] = set()
        for user, t in zip(draws, times):
            if users.preference(user)[0] != VICTIM or t < RECOVERY_AT or user in back:
                continue
            if ramp.returned(point(user), RECOVERY_AT, duration, t):
                back.add(user)                 # its first request on the victim: rehydrate
                per_second[int(t)] += 1
        curves[label] = per_second
        first = int(RECOVERY_AT)
        summary[label] = {"rehydrations": sum(per_second), "peak_per_s": max(per_second),
                          "first_second": per_second[first],
                          "first_5_seconds": sum(per_second[first:first + 5])}

    # Two proxies of a fleet whose ramps (or instant failbacks) start FLEET_SKEW apart.
    disagree = {"no_ramp": 0, "ramp": 0}
    for user, t in zip(draws, times):
        if users.preference(user)[0] != VICTIM:
            continue
        for label, duration in (("no_ramp", 0.0), ("ramp", ramp_s)):
            a = t >= RECOVERY_AT and ramp.returned(point(user), RECOVERY_AT, duration, t)
            b = t >= RECOVERY_AT + FLEET_SKEW and ramp.returned(
                point(user), RECOVERY_AT + FLEET_SKEW, duration, t)
            disagree[label] += a != b
    for label in summary:
        summary[label]["fleet_disagreements"] = disagree[label]
        progress(f"skew: failback {label.replace('_', ' ')}: {summary[label]['rehydrations']} "
                 f"rehydrations in the window, peak {summary[label]['peak_per_s']}/s, first 5 s "
                 f"{summary[label]['first_5_seconds']}; requests two proxies "
                 f"{FLEET_SKEW:g} s apart route differently: {disagree[label]}")
    return {"rate": rate, "ramp_s": ramp_s, "recovery_at": RECOVERY_AT, "window_s": window,
            "requests": count, "victim": VICTIM, "fleet_skew_s": FLEET_SKEW,
            "per_second": curves, "summary": summary,
            "peak_reduction": (summary["no_ramp"]["peak_per_s"]
                               / max(1, summary["ramp"]["peak_per_s"]))}


# -- chart -------------------------------------------------------------------------------

def chart(path: Path, result: dict[str, Any]) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_share, ax_fb) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = result["balance"]["runs"]
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(BACKENDS))]
        label = (f"factor {r['factor']:g}: {r['off_owner_share']:.1%} off owner"
                 if r["factor"] else "no balance factor")
        ax_share.bar(xs, [r["share"][b] for b in BACKENDS], width, label=label)
    ax_share.axhline(1 / len(BACKENDS), color="black", linewidth=0.8, linestyle=":")
    ax_share.set_xticks(range(len(BACKENDS)), BACKENDS)
    ax_share.set_ylabel("share of requests")
    ax_share.set_ylim(0, 0.55)
    ax_share.set_title(f"Zipf s={ZIPF_S} users over 3 backends: load spread", fontsize=10)
    ax_share.legend(fontsize=8, loc="upper left", ncols=2)
    fb = result["failback"]
    for label, style in (("no_ramp", "tab:red"), ("ramp", "tab:blue")):
        curve = fb["per_second"][label]
        name = "no ramp" if label == "no_ramp" else f"ramp {fb['ramp_s']:g} s"
        ax_fb.step([s - fb["recovery_at"] for s in range(len(curve))], curve, where="post",
                   color=style, label=name)
    ax_fb.axvline(0, color="black", linewidth=0.8, linestyle=":")
    ax_fb.set_xlabel(f"seconds since {fb['victim']} recovered")
    ax_fb.set_ylabel("rehydrations per second")
    ax_fb.set_title(f"failback at {fb['rate']:,.0f} req/s", fontsize=10)
    ax_fb.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- entry points ------------------------------------------------------------------------

def run(smoke: bool, progress: Callable[[str], None],
        images_dir: Path | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    ring = Ring([Member(b) for b in BACKENDS])
    users = Users(ring, SMOKE_USERS if smoke else USERS)
    rng = random.Random(SEED)
    result: dict[str, Any] = {
        "benchmark": "skew", "smoke": smoke, "zipf_s": ZIPF_S, "users": users.count,
        "backends": list(BACKENDS), "seed": SEED,
        "balance": balance(users, SMOKE_BALANCE_REQUESTS if smoke else BALANCE_REQUESTS, rng,
                           progress),
        "failback": failback(users, SMOKE_REQUEST_RATE if smoke else REQUEST_RATE,
                             SMOKE_RAMP if smoke else RAMP, rng, progress)}
    result["seconds"] = round(time.perf_counter() - started, 2)
    if images_dir is not None:
        drawn = chart(images_dir / "skew.png", result)
        result["chart"] = str(drawn) if drawn else None
        if drawn is None:
            progress("skew: no chart (pip install -e '.[bench]' for matplotlib)")
    return result


def run_suite(settings: Any) -> dict[str, Any]:
    """For bench/__main__.py: settings has ``smoke`` and ``images_dir``."""
    from .console import progress
    return run(settings.smoke, progress, settings.images_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.skew", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="small counts, a few seconds")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for skew.json and skew.png (default bench/results[/smoke])")
    args = p.parse_args(argv)
    from .console import progress
    out = args.out or (RESULTS / "smoke" if args.smoke else RESULTS)
    result = run(args.smoke, progress, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "skew.json").write_text(json.dumps(result, indent=1) + "\n")
    progress(f"skew: {out / 'skew.json'}, chart {result.get('chart')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
