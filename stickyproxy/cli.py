"""`stickyproxy run | check | route | plan | demo`.

Exit codes: 0 success, 2 bad configuration or usage, 1 a runtime failure. Errors are one
line each on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from . import __version__
from .config import Config, ConfigError, load
from .plan import exact, ring_of, sampled, synthetic_keys

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def _load(path: str) -> Config:
    return load(path)


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    ring = ring_of(cfg)
    print(f"{args.config}: ok: {len(cfg.backends)} backends, "
          f"{len(cfg.routing.keys)} key sources ({', '.join(s.describe() for s in cfg.routing.keys)}), "
          f"ring {ring.fingerprint}, listen {cfg.listen.host}:{cfg.listen.port}")
    return EXIT_OK


def cmd_route(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    ring = ring_of(cfg)
    for key in args.keys:
        pref = ring.preference(key)
        if args.json:
            print(json.dumps({"key": key, "backend": pref[0] if pref else None,
                              "preference": pref}))
        else:
            print(f"{key}\t{pref[0] if pref else '-'}\t{' > '.join(pref)}")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    old, new = ring_of(_load(args.old)), ring_of(_load(args.new))
    if args.keys:
        try:
            with open(args.keys, encoding="utf-8") as f:
                keys = [line.rstrip("\r\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            print(f"stickyproxy plan: cannot read keys from {args.keys}: {e}", file=sys.stderr)
            return EXIT_CONFIG
        plan = sampled(old, new, keys)
    elif args.sample:
        plan = sampled(old, new, synthetic_keys(args.sample))
    else:
        plan = exact(old, new)
    if args.json:
        print(json.dumps(plan.as_dict()))
        return EXIT_OK
    print(f"ring {plan.old_fingerprint} -> {plan.new_fingerprint} (measured over {plan.basis})")
    print(f"users that move: {plan.moved:.2%} (ideal for these weights: {plan.ideal:.2%})")
    if plan.flows:
        print()
        print(f"{'from':<20} {'to':<20} {'share':>8}")
        for (a, b), s in sorted(plan.flows.items(), key=lambda kv: -kv[1]):
            print(f"{a:<20} {b:<20} {s:>8.2%}")
    print()
    print(f"{'backend':<20} {'before':>8} {'after':>8}")
    for bid in sorted(set(plan.old_share) | set(plan.new_share)):
        a = plan.old_share.get(bid)
        b = plan.new_share.get(bid)
        fa = f"{a:.2%}" if a is not None else "-"
        fb = f"{b:.2%}" if b is not None else "-"
        print(f"{bid:<20} {fa:>8} {fb:>8}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    from .server import serve
    return serve(cfg, args.config, workers=args.workers)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main
    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stickyproxy",
                                description="A sticky, consistent-hashing reverse proxy.")
    p.add_argument("--version", action="version", version=f"stickyproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="serve the proxy")
    r.add_argument("-c", "--config", required=True, help="TOML configuration file")
    r.add_argument("-w", "--workers", type=int, default=1,
                   help="worker processes sharing the port via SO_REUSEPORT (default 1)")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check", help="validate a configuration file")
    c.add_argument("-c", "--config", required=True)
    c.set_defaults(func=cmd_check)

    rt = sub.add_parser("route", help="show where keys are routed")
    rt.add_argument("-c", "--config", required=True)
    rt.add_argument("--json", action="store_true", help="one JSON object per line")
    rt.add_argument("keys", nargs="+", metavar="KEY")
    rt.set_defaults(func=cmd_route)

    pl = sub.add_parser("plan", help="what share of users a configuration change moves")
    pl.add_argument("--from", dest="old", required=True, metavar="OLD.toml")
    pl.add_argument("--to", dest="new", required=True, metavar="NEW.toml")
    g = pl.add_mutually_exclusive_group()
    g.add_argument("--keys", metavar="FILE", help="user keys, one per line")
    g.add_argument("--sample", type=int, metavar="N", help="N synthetic keys")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    d = sub.add_parser("demo", help="run Redis, three example apps and the proxy locally")
    d.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
    d.add_argument("--no-ui", action="store_true", help="no live view; print a line per second")
    d.add_argument("--duration", type=float, default=0.0,
                   help="stop by itself after this many seconds (0 = run until Ctrl-C)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "workers", 1) < 1:
        print("stickyproxy: --workers must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    if getattr(args, "sample", None) is not None and args.sample < 1:
        print("stickyproxy plan: --sample must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return args.func(args)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
