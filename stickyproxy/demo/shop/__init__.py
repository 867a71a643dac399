"""The shop: an aiohttp app holding the kinds of per-user state that "stateless" designs push
into Redis, in either of two modes.

- sticky (default): the cart, the counter and the revoked tokens live in the user's context
  (``stickyproxy.context``); the rate limiter, the jobs and the price cache in this process's
  memory (the library's ``RateLimiter``, ``Jobs``, ``GuardedCache``). Reads and token checks
  cost no Redis call; each change (a logout too) is one fenced write; another instance
  rehydrates the user from Redis after a failover.
- ``--stateless``: every request reads and writes Redis (cart hash, counter, rate-limit
  counter, job progress, revocation list, shared price cache): the design the context library
  replaces, kept for comparison.

Run one instance from any directory: ``python -m stickyproxy.demo.shop --port 9001 --node-id
app-1 --redis URL`` (from ``examples/``, ``python -m shop`` is the same app).
"""
