"""``stickyproxy demo``: Redis, three instances of the example shop (``stickyproxy.demo.shop``)
and the proxy in front of them, on this machine, with a live view.

Shipped inside the package so that it runs from any directory after any install. Importing
this package imports nothing else: the shop's processes start as
``python -m stickyproxy.demo.shop`` and must not pay for the demo's own modules.

- ``run``: the demo itself (start-up, serving, shutting down) and ``main``.
- ``procs``: child processes, each in its own process group, killed with the demo.
- ``watchdog``: the process that cleans up after a demo that died without doing so.
- ``view``, ``commands``, ``traffic``: the live view, key presses, simulated users.
- ``shop``: the example app (also importable as ``shop`` from ``examples/``).
"""
