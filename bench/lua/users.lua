-- Each request carries X-User-Id for a user drawn at random from a fixed population.
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
      requests[i] = wrk.format("GET", "/", { ["X-User-Id"] = "user-" .. i })
   end
end

function request()
   return requests[math.random(user_count)]
end
