"""`stickyproxy run | check | route | plan | demo`.

Exit codes: 0 success, 2 bad configuration or usage, 1 a runtime failure (or a start-up
check that failed), 130 interrupted (Ctrl-C), 141 the output pipe was closed early (e.g.
``| head``: the rest of the output is dropped quietly). Errors are one line each on stderr,
never a traceback.

Routing questions (``check``, ``route``, ``plan``) never need the runtime secrets a
configuration names (``admin.token_env``, a jwt source's ``secret_env``): they parse with
secrets unresolved. ``run`` resolves them, and refuses to start without them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Sequence

from . import __version__
from .config import Config, ConfigError, load, secret_variables
from .routing.plan import exact, ring_of, sampled, synthetic_keys

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130
# 128 + SIGPIPE: what a shell reports for a writer whose reader went away.
EXIT_PIPE = 141
# Entries of a preference list `route` prints unless asked for more: the owner and the
# first few failover targets are what an operator looks at; a 1,000-backend list is noise.
ROUTE_DEPTH = 5

EXIT_CODES = """\
exit codes:
  0    success
  1    runtime failure, or a start-up check failed (run, demo)
  2    bad configuration or usage; every configuration error is printed with its key path
  130  interrupted (Ctrl-C)
  141  the output pipe was closed early (e.g. piped into head)"""


def _routing_config(path: str) -> Config:
    """A configuration for answering routing questions: runtime secrets left unread."""
    return load(path, secrets=False)


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _routing_config(args.config)
    ring = ring_of(cfg)
    keys = cfg.routing.keys
    line = (
        f"{args.config}: ok: {plural(len(cfg.backends), 'backend')}, "
        f"{plural(len(keys), 'key source')} ({', '.join(s.describe() for s in keys)}), "
        f"ring {ring.fingerprint}, listen {cfg.listen.host}:{cfg.listen.port}"
    )
    secrets = secret_variables(cfg)
    if secrets:
        line += "; run reads from the environment: " + ", ".join(
            f"{var} ({path}, {'set' if os.environ.get(var) else 'unset here'})"
            for path, var in secrets
        )
    print(line)
    return EXIT_OK


def route_line(key: str, pref: list[str], depth: int | None) -> str:
    """``key<TAB>owner<TAB>a > b > c``, the list cut after ``depth`` entries with a count
    of the rest (``depth`` None: the whole list)."""
    shown = pref if depth is None else pref[:depth]
    more = len(pref) - len(shown)
    tail = f" > ... (+{more} more; --all shows them)" if more else ""
    return f"{key}\t{pref[0] if pref else '-'}\t{' > '.join(shown)}{tail}"


def route_json(key: str, pref: list[str], depth: int | None) -> dict:
    shown = pref if depth is None else pref[:depth]
    return {
        "key": key,
        "backend": pref[0] if pref else None,
        "preference": shown,
        "more": len(pref) - len(shown),
    }


def ramp_return(key: str, delay: float, ramp: float) -> dict:
    """When ``key`` returns to a backend that recovers (or is added) under this
    configuration: the ramp progress at which it returns and the seconds after the
    recovery (``failback_delay`` first, then its share of ``failback_ramp``)."""
    from .routing.ramp import POINT_SPACE, key_point

    share = key_point(key) / POINT_SPACE
    return {"at_progress": round(share, 6), "after": round(delay + share * ramp, 3)}


def cmd_route(args: argparse.Namespace) -> int:
    cfg = _routing_config(args.config)
    ring = ring_of(cfg)
    depth = None if args.all else args.depth
    delay, ramp = cfg.health.failback_delay, cfg.health.failback_ramp
    for key in args.keys:
        pref = ring.preference(key)
        back = ramp_return(key, delay, ramp) if ramp > 0 else None
        if args.json:
            out = route_json(key, pref, depth)
            if back is not None:
                out["returns"] = back
            print(json.dumps(out))
        else:
            line = route_line(key, pref, depth)
            if back is not None:
                line += (
                    f"\treturns {back['after']:g}s after its backend recovers "
                    f"(at {back['at_progress']:.1%} of the ramp)"
                )
            print(line)
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    old, new = ring_of(_routing_config(args.old)), ring_of(_routing_config(args.new))
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
        was = plan.old_share.get(bid)
        now = plan.new_share.get(bid)
        fa = f"{was:.2%}" if was is not None else "-"
        fb = f"{now:.2%}" if now is not None else "-"
        print(f"{bid:<20} {fa:>8} {fb:>8}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    from .control.server import serve

    return serve(cfg, args.config, workers=args.workers, watch=args.watch_config)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import main as demo_main

    return demo_main(args)


def _sub(sub, name: str, help_: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help_,
        description=textwrap.fill(description, 79),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stickyproxy",
        description="A sticky, consistent-hashing reverse proxy.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--version",
        action="version",
        version=f"stickyproxy {__version__}",
        help="print the version and exit",
    )
    sub = p.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="what to do; COMMAND --help tells more",
    )

    r = _sub(
        sub,
        "run",
        "serve the proxy",
        "Serve the proxy: SIGHUP reloads the configuration, SIGTERM drains and exits. "
        "Secrets named by the configuration (admin.token_env, secret_env) are read "
        "from the environment here, and nowhere else.",
    )
    r.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML configuration file")
    r.add_argument(
        "-w",
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes sharing the port via SO_REUSEPORT (default 1)",
    )
    r.add_argument(
        "--watch-config",
        action="store_true",
        help="reload when the configuration file or a key file it names changes "
        "(as SIGHUP does; looked at every second)",
    )
    r.set_defaults(func=cmd_run)

    c = _sub(
        sub,
        "check",
        "validate a configuration file",
        "Validate a configuration file: a one-line summary, or every error with its "
        "key path. Needs none of the secrets the file names.",
    )
    c.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML configuration file")
    c.set_defaults(func=cmd_check)

    rt = _sub(
        sub,
        "route",
        "show where keys are routed",
        "Each key's owner and preference list (where it fails over to, in order). "
        "With health.failback_ramp set, also when the key returns to a backend that "
        "recovers (the admin API's GET /route says whether it has, live). "
        f"Lists are cut after {ROUTE_DEPTH} entries unless --depth or --all says otherwise.",
    )
    rt.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML configuration file")
    rt.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per key: {"key", "backend", "preference", "more"}',
    )
    depth = rt.add_mutually_exclusive_group()
    depth.add_argument(
        "--depth",
        type=int,
        default=ROUTE_DEPTH,
        metavar="N",
        help=f"show the first N entries of each preference list (default {ROUTE_DEPTH})",
    )
    depth.add_argument(
        "--all", action="store_true", help="show every entry of each preference list"
    )
    rt.add_argument("keys", nargs="+", metavar="KEY", help="user keys to look up")
    rt.set_defaults(func=cmd_route)

    pl = _sub(
        sub,
        "plan",
        "what share of users a configuration change moves",
        "Before changing the backends: what share of users moves, from which backend to "
        "which. Exact over the hash space unless --keys or --sample is given.",
    )
    pl.add_argument(
        "--from",
        dest="old",
        required=True,
        metavar="OLD.toml",
        help="the configuration running now",
    )
    pl.add_argument(
        "--to", dest="new", required=True, metavar="NEW.toml", help="the configuration to change to"
    )
    g = pl.add_mutually_exclusive_group()
    g.add_argument("--keys", metavar="FILE", help="measure over these user keys, one per line")
    g.add_argument("--sample", type=int, metavar="N", help="measure over N synthetic keys")
    pl.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    pl.set_defaults(func=cmd_plan)

    d = _sub(
        sub,
        "demo",
        "run Redis, three example apps and the proxy locally",
        "Redis, three instances of the example shop and the proxy on 127.0.0.1, with a "
        "live view and simulated users. Needs redis-server on the PATH. The last line "
        "is 'demo summary: answers=N failed=N rate_limited=N lost=N'.",
    )
    d.add_argument("--port", type=int, default=8080, metavar="N", help="proxy port (default 8080)")
    d.add_argument("--no-ui", action="store_true", help="no live view; print a line per second")
    d.add_argument(
        "--duration",
        type=float,
        default=0.0,
        metavar="S",
        help="stop by itself after S seconds of serving (0 = run until q or Ctrl-C)",
    )
    d.set_defaults(func=cmd_demo)
    return p


def _quiet_stdout() -> None:
    """The reader of stdout went away: send whatever is still buffered nowhere, so the
    interpreter's final flush cannot fail with a traceback either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "workers", 1) < 1:
        print("stickyproxy: --workers must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    if getattr(args, "sample", None) is not None and args.sample < 1:
        print("stickyproxy plan: --sample must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    if getattr(args, "depth", 1) < 1:
        print("stickyproxy route: --depth must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
