-- The shop's request mix: each request is one action of a user drawn at random.
-- Arguments (after wrk's "--"): number of users, random seed, then the weights of the
-- actions in this order: read cart, add item, read counter, increment counter.

local ITEMS = { "apple", "bread", "coffee", "milk", "tea" }
local ACTIONS = {
   function(user) return wrk.format("GET", "/cart", { ["X-User-Id"] = user }) end,
   function(user, item)
      return wrk.format("POST", "/cart/items",
                        { ["X-User-Id"] = user, ["Content-Type"] = "application/json" },
                        '{"item": "' .. item .. '", "qty": 1}')
   end,
   function(user) return wrk.format("GET", "/counter", { ["X-User-Id"] = user }) end,
   function(user) return wrk.format("POST", "/counter", { ["X-User-Id"] = user }) end,
}

dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "report.lua")

local user_count = 0
local cumulative = {}
local total_weight = 0

function init(args)
   user_count = tonumber(args[1])
   math.randomseed(tonumber(args[2]))
   for i = 1, #ACTIONS do
      total_weight = total_weight + tonumber(args[2 + i])
      cumulative[i] = total_weight
   end
end

function request()
   local user = "user-" .. math.random(user_count)
   local roll = math.random() * total_weight
   for i = 1, #ACTIONS do
      if roll < cumulative[i] then
         return ACTIONS[i](user, ITEMS[math.random(#ITEMS)])
      end
   end
   return ACTIONS[#ACTIONS](user)
end
