"""stickyproxy: a sticky, consistent-hashing reverse proxy, and the per-user context
library for the app instances behind it."""

__version__ = "0.1.0"
