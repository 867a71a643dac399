"""Redis key layout and the Lua scripts that fence ownership. Each script touches one key
(``ns:{user}``), so in a Cluster it runs on the user's slot; PUBLISH on the fixed takeover channel
is allowed from a script in a Cluster and is broadcast to every node over the cluster bus.

Record (one hash per user): ``uid`` the user id, ``epoch`` incremented by every acquire and
delete (never reset while the key lives), ``owner`` the node id of the last acquirer ("" after a
delete), ``data`` the serialized context (absent when empty or deleted).
Takeover message: ``<epoch>\\n<owner>\\n<user>`` (the user last, so it may hold any character).
"""

from __future__ import annotations

FIELD_UID = "uid"
FIELD_EPOCH = "epoch"
FIELD_OWNER = "owner"
FIELD_DATA = "data"


def record_key(namespace: str, user: str) -> str:
    """``ns:{user}``: the braces make the user the Cluster hash tag."""
    return f"{namespace}:{{{user}}}"


def takeover_channel(namespace: str) -> str:
    return f"{namespace}:takeovers"


# KEYS[1] record; ARGV node, user, ttl_ms, channel.
# -> {0, stored_uid} when the key holds another user (nothing changed)
# -> {1, uid, epoch, data|nil, previous_owner|nil}
ACQUIRE = """
local uid = redis.call('HGET', KEYS[1], 'uid')
if uid and uid ~= ARGV[2] then
  return {0, uid}
end
local prev = redis.call('HGET', KEYS[1], 'owner')
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'uid', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], epoch .. '\\n' .. ARGV[1] .. '\\n' .. ARGV[2])
return {1, redis.call('HGET', KEYS[1], 'uid'), epoch, redis.call('HGET', KEYS[1], 'data'), prev}
"""

# KEYS[1] record; ARGV node, user, epoch, ttl_ms, data (data absent: refresh the TTL only).
# -> {-1, stored_uid} the key holds another user;
# -> {0, epoch|false, owner|false} fenced off: epoch or owner moved (false: no record at all);
# -> {1} committed.
WRITE = """
local cur = redis.call('HMGET', KEYS[1], 'uid', 'epoch', 'owner')
if cur[1] and cur[1] ~= ARGV[2] then
  return {-1, cur[1]}
end
if cur[2] ~= ARGV[3] or cur[3] ~= ARGV[1] then
  return {0, cur[2], cur[3]}
end
if ARGV[5] then
  redis.call('HSET', KEYS[1], 'data', ARGV[5])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1}
"""

# KEYS[1] record; ARGV user, ttl_ms, channel.
# Leaves a tombstone (no data, epoch incremented, owner "") so epochs never go backwards and
# every holder drops its copy. -> {0, stored_uid} other user; {1, epoch}.
DELETE = """
local uid = redis.call('HGET', KEYS[1], 'uid')
if uid and uid ~= ARGV[1] then
  return {0, uid}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HDEL', KEYS[1], 'data')
redis.call('HSET', KEYS[1], 'owner', '', 'uid', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], epoch .. '\\n\\n' .. ARGV[1])
return {1, epoch}
"""
