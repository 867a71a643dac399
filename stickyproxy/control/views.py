"""What the admin API shows: built from a routing table, backend states and the data
plane's counts (in-flight requests and tunnels per backend, summed over workers), no I/O."""

from __future__ import annotations

from typing import Any

from ..routing.router import Router


def backends_view(router: Router, now: float, inflight: dict[str, int],
                  tunnels: dict[str, int]) -> list[dict[str, Any]]:
    share = router.ring.key_share()
    out = []
    for b in router.config.backends:
        st = router.backends[b.id]
        out.append({
            "id": b.id,
            "url": b.url,
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
        })
    return out


def ring_view(router: Router) -> dict[str, Any]:
    share = router.ring.key_share()
    return {
        "fingerprint": router.fingerprint,
        "vnodes": router.ring.vnodes,
        "points": len(router.ring.points()),
        "members": [{"id": m.id, "weight": m.weight, "key_share": round(share[m.id], 6)}
                    for m in router.ring.members],
    }


_WHY = {
    "primary": "the key's owner is usable",
    "failover": "the owner is not usable; first usable backend along the preference list",
    "panic": "too few backends usable (panic mode): routing by the plain ring",
    "none": "no backend is usable",
}


def route_view(router: Router, key: str, now: float) -> dict[str, Any]:
    r = router.route(key, now)
    pref = router.ring.preference(key)
    return {
        "key": key,
        "owner": r.owner,
        "preference": pref,
        "chosen": r.backend.id if r.backend else None,
        "route": r.kind,
        "why": _WHY.get(r.kind, r.kind),
        "states": {bid: router.backends[bid].state(now) for bid in pref},
        "ring": router.fingerprint,
    }
