"""The data plane: asyncio protocols + llhttp (httptools), no aiohttp on the request path."""

from .events import Events
from .proxy import Proxy

__all__ = ["Events", "Proxy"]
