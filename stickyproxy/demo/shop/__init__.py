"""The shop: an aiohttp app holding the three kinds of per-user state that "stateless" designs
push into Redis, in either of two modes.

- sticky (default): the cart and the counter live in the user's context
  (``stickyproxy.context``), the rate limiter and the jobs in this process's memory. Reads cost
  no Redis call; each change is one fenced write; another instance rehydrates the user from
  Redis after a failover.
- ``--stateless``: every request reads and writes Redis (cart hash, counter, rate-limit
  counter, job progress): the design the context library replaces, kept for comparison.

Run one instance from any directory: ``python -m stickyproxy.demo.shop --port 9001 --node-id
app-1 --redis URL`` (from ``examples/``, ``python -m shop`` is the same app).
"""
