"""Process and access logging: text or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from ..config import Logging as LoggingConfig


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(cfg: LoggingConfig) -> None:
    """Process log on stderr; the access log (if on) on stdout, one line per request."""
    root = logging.getLogger("stickyproxy")
    root.setLevel(cfg.level.upper())
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if cfg.format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    access = logging.getLogger("stickyproxy.access")
    access.propagate = False
    for h in list(access.handlers):
        access.removeHandler(h)
    ah = logging.StreamHandler(sys.stdout)
    ah.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(ah)
    access.setLevel(logging.INFO)


def access_record(
    *,
    client: str | None,
    method: str,
    path: str,
    status: int,
    sent: int,
    duration: float,
    backend: str | None,
    route: str,
    retries: int,
    key: str | None,
) -> dict[str, Any]:
    return {
        "time": round(time.time(), 3),
        "client": client,
        "method": method,
        "path": path,
        "status": status,
        "bytes": sent,
        "duration_ms": round(duration * 1000, 3),
        "backend": backend,
        "route": route,
        "retries": retries,
        "key": key,
    }


def format_access(rec: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rec, ensure_ascii=False)
    return (
        '{client} "{method} {path}" {status} {bytes} {duration_ms}ms backend={backend} '
        "route={route} retries={retries} key={key}"
    ).format(**rec)
