"""Helpers the tests share, by what they hold; the fixtures that use them live in conftest.py.

- ``net``: loopback constants, free ports, ``eventually`` (poll with a deadline).
- ``http``: a raw HTTP/1.x client with a strict response reader, and request bytes.
- ``backends``: recording aiohttp backends and byte-exact scripted raw backends.
- ``config``: proxy configuration files built from backends plus overrides, the ring a
  config describes, and keys picked by their preference lists.
- ``proxy``: the proxy in process (``Service``) or as a ``stickyproxy run`` subprocess.
- ``procs``: what /proc says about processes and their sockets.
- ``redis``: a redis-server of the test's own on a free port (never the shared 6379).
- ``admin``: an in-process proxy with its admin API, as an operator drives it.
- ``metrics``: a parsed Prometheus exposition (the proxy's /metrics).
- ``health``: backends whose health endpoint a test scripts, and the rise/fall reference.
- ``logs``: log capture that keeps what a probe said when each record was logged.
- ``load``: a bounded load loop whose every outcome is kept.

tests/ is on ``sys.path`` (tests/conftest.py is a rootdir conftest outside any package, and
the suites under it are packages rooted there), so tests import ``from support.http import
Client``.
"""
