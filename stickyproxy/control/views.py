"""What the admin API shows: built from a routing table, backend states and the data
plane's counts (in-flight requests and tunnels per backend, summed over workers), no I/O."""

from __future__ import annotations

from typing import Any

from ..routing.hotkeys import HotKeys
from ..routing.ramp import POINT_SPACE, key_point
from ..routing.router import Router, has_returned


def backends_view(
    router: Router, now: float, inflight: dict[str, int], tunnels: dict[str, int]
) -> list[dict[str, Any]]:
    share = router.ring.key_share()
    out = []
    for b in router.config.backends:
        st = router.backends[b.id]
        out.append(
            {
                "id": b.id,
                "url": b.url,
                "protocol": b.protocol,
                "weight": b.weight,
                "state": st.state(now),
                "usable": st.usable(now),
                "healthy": st.healthy,
                "drained": st.drained,
                "ejected_for": round(max(0.0, st.ejected_until - now), 3),
                "ejections": st.ejections,
                "failback_in": round(max(0.0, st.failback_until - now), 3),
                "inflight": inflight.get(b.id, 0),
                "websocket_tunnels": tunnels.get(b.id, 0),
                "key_share": round(share.get(b.id, 0.0), 6),
                "reason": st.reason,
                "since_change": round(now - st.last_change, 3) if st.last_change else None,
            }
        )
        ramp = _ramp(st, now)
        if ramp is not None:
            out[-1]["ramp"] = ramp  # only while its users are returning
    return out


def ring_view(router: Router) -> dict[str, Any]:
    share = router.ring.key_share()
    return {
        "fingerprint": router.fingerprint,
        "vnodes": router.ring.vnodes,
        "points": len(router.ring.points()),
        "members": [
            {"id": m.id, "weight": m.weight, "key_share": round(share[m.id], 6)}
            for m in router.ring.members
        ],
    }


def _ramp(st: Any, now: float) -> dict[str, Any] | None:
    """A backend's failback ramp, or None when it is not ramping."""
    ramp = st.ramp
    if ramp is None or not ramp.active(now):
        return None
    return {
        "progress": round(ramp.progress(now), 6),
        "duration": ramp.duration,
        "starts_in": round(max(0.0, ramp.start - now), 3),
        "ends_in": round(max(0.0, ramp.end - now), 3),
    }


_WHY = {
    "primary": "the key's owner is usable",
    "failover": "the owner is not usable (or the key has not returned to it yet); first "
    "usable backend along the preference list that the key may use",
    "panic": "too few backends usable (panic mode): routing by the plain ring",
    "none": "no backend is usable",
}


def route_view(router: Router, key: str, now: float) -> dict[str, Any]:
    pref = router.ring.preference(key)
    # whether the key has returned to each ramping backend, and when it does (the field
    # is there only while a backend on the key's list is ramping)
    ramps: dict[str, Any] = {}
    point = key_point(key)
    for bid in pref:
        st = router.backends[bid]
        ramp = st.ramp
        if ramp is None or not ramp.active(now):
            continue
        at = ramp.return_time(point)
        ramps[bid] = {
            "returned": has_returned(st, key, now),
            "returns_in": round(max(0.0, at - now), 3),
            "returns_at_progress": round(point / POINT_SPACE, 6),
            "progress": round(ramp.progress(now), 6),
        }
    r = router.route(key, now)
    return {
        "key": key,
        "owner": r.owner,
        "preference": pref,
        "chosen": r.backend.id if r.backend else None,
        "route": r.kind,
        "why": _WHY.get(r.kind, r.kind),
        "states": {bid: router.backends[bid].state(now) for bid in pref},
        "ring": router.fingerprint,
        **({"ramps": ramps} if ramps else {}),
    }


def hotkeys_view(
    sketch: HotKeys | None, n: int, router: Router, workers: int = 1
) -> dict[str, Any]:
    """The ``n`` hottest user keys (hashed as in the access log unless the keys are raw)
    with their estimated requests, upper bound and share of all requests counted; a raw
    key also shows its owner on the ring."""
    if sketch is None:
        return {"enabled": False, "keys": []}
    keys = []
    for hk in sketch.top(n):
        row: dict[str, Any] = {
            "key": hk.key,
            "requests": hk.requests,
            "upper": hk.upper,
            "share": round(hk.share, 6),
        }
        if sketch.raw:
            row["owner"] = router.ring.owner(hk.key)
        keys.append(row)
    return {
        "enabled": True,
        "hashed": not sketch.raw,
        "requests": sketch.total,
        "error_bound": sketch.offset,
        "sample_every": sketch.sample_every,
        "processes": workers,
        "keys": keys,
    }
