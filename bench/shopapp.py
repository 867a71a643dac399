"""The example shop (examples/shop) with its Redis traffic counted where it is sent.

    PYTHONPATH=examples python -m bench.shopapp --port P --node-id N --redis URL [--stateless]

Same arguments and behaviour as ``python -m shop``, plus ``GET /_bench/redis``, which
answers what this process has sent to Redis so far:
``{"round_trips": n, "commands": n, "by_command": {"EVALSHA": n, ...}}``.

A round trip is one write of a command or of a pipeline to a Redis connection (redis-py's
``send_packed_command``), each followed by a wait for the reply; ``commands`` counts every
command packed into those writes. Commands a Lua script runs inside Redis are not sent by
the client and are not counted here (Redis's own INFO commandstats counts them).
"""

from __future__ import annotations

import collections
import sys
from typing import Any

import shop.app
from aiohttp import web
from redis.asyncio.connection import AbstractConnection

from .shopstack import COUNTS_PATH


class RedisTally:
    def __init__(self) -> None:
        self.round_trips = 0
        self.by_command: collections.Counter[str] = collections.Counter()

    def as_dict(self) -> dict[str, Any]:
        return {
            "round_trips": self.round_trips,
            "commands": sum(self.by_command.values()),
            "by_command": dict(self.by_command),
        }


def _name(command: Any) -> str:
    text = command.decode() if isinstance(command, bytes) else str(command)
    return text.upper()


def count_redis_calls(tally: RedisTally) -> None:
    """Wrap redis-py's asyncio connection so every command and every send is tallied."""
    send_packed = AbstractConnection.send_packed_command
    pack = AbstractConnection.pack_command

    async def send_packed_command(
        self: AbstractConnection, command: Any, check_health: bool = True
    ) -> None:
        tally.round_trips += 1
        await send_packed(self, command, check_health)

    def pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
        tally.by_command[_name(args[0])] += 1
        return pack(self, *args)

    AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]
    AbstractConnection.pack_command = pack_command  # type: ignore[method-assign]


def with_counts_route(tally: RedisTally):
    create_app = shop.app.create_app

    def create(settings: Any) -> web.Application:
        app = create_app(settings)

        async def counts(_request: web.Request) -> web.Response:
            return web.json_response(tally.as_dict())

        app.router.add_get(COUNTS_PATH, counts)
        return app

    return create


def main() -> int:
    tally = RedisTally()
    count_redis_calls(tally)
    shop.app.create_app = with_counts_route(tally)
    return shop.app.main()


if __name__ == "__main__":
    sys.exit(main())
