-- Each request carries X-User-Id for a user drawn Zipf-distributed from a fixed population:
-- user i (1 = hottest) with weight 1 / i^s, the same law as bench/skew.py's simulation.
-- Arguments (after wrk's "--"): number of users (default 100000), s (default 1.1),
-- random seed (default 1).

local DEFAULT_USERS = 100000
local DEFAULT_S = 1.1
local DEFAULT_SEED = 1

dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "report.lua")

local cumulative = {}    -- cumulative[i] = sum of the weights of users 1..i
local total = 0
local user_count = DEFAULT_USERS
local formatted = {}     -- user -> its request, formatted on first use

function init(args)
   user_count = tonumber(args[1]) or DEFAULT_USERS
   local s = tonumber(args[2]) or DEFAULT_S
   math.randomseed(tonumber(args[3]) or DEFAULT_SEED)
   local sum = 0
   for i = 1, user_count do
      sum = sum + 1 / i ^ s
      cumulative[i] = sum
   end
   total = sum
end

-- The first user whose cumulative weight reaches r (a binary search).
local function draw()
   local r = math.random() * total
   local lo, hi = 1, user_count
   while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if cumulative[mid] < r then lo = mid + 1 else hi = mid end
   end
   return lo
end

function request()
   local user = draw()
   local req = formatted[user]
   if req == nil then
      req = wrk.format("GET", "/", { ["X-User-Id"] = "user-" .. user })
      formatted[user] = req
   end
   return req
end
