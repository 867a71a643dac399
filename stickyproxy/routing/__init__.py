"""Where a request goes: the ring, key extraction, JWT verification, the router and the move planner. Pure logic, no I/O."""
