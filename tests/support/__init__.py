"""Helpers the tests share, by what they hold; the fixtures that use them live in conftest.py.

- ``net``: loopback constants, free ports, ``eventually`` (poll with a deadline).
- ``http``: a raw HTTP/1.x client with a strict response reader, and request bytes.
- ``backends``: recording aiohttp backends and byte-exact scripted raw backends.
- ``config``: proxy configuration files built from backends plus overrides, and rings.
- ``proxy``: the proxy in process (``Service``) or as a ``stickyproxy run`` subprocess.
- ``procs``: what /proc says about processes and their sockets.
- ``redis``: a redis-server of the test's own on a free port (never the shared 6379).

tests/ is on ``sys.path`` (tests/conftest.py is a rootdir conftest outside any package, and
the suites under it are packages rooted there), so tests import ``from support.http import
Client``.
"""
