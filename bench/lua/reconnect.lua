-- As users.lua, but every request carries "Connection: close": the server answers and closes,
-- and wrk connects again for the next request. Over TLS wrk keeps the closed connection's
-- session (OpenSSL's SSL_clear keeps a cleanly shut session) and offers it on the new one,
-- so each reconnect is a resumed handshake, not a full one (bench/tls.py measures full
-- handshakes with `openssl s_time -new`).
-- Arguments (after wrk's "--"): number of users (default 10000), random seed (default 1).

local DEFAULT_USERS = 10000
local DEFAULT_SEED = 1

dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "report.lua")

local requests = {}
local user_count = DEFAULT_USERS

function init(args)
   user_count = tonumber(args[1]) or DEFAULT_USERS
   math.randomseed(tonumber(args[2]) or DEFAULT_SEED)
   for i = 1, user_count do
      requests[i] = wrk.format("GET", "/", { ["X-User-Id"] = "user-" .. i,
                                             ["Connection"] = "close" })
   end
end

function request()
   return requests[math.random(user_count)]
end
