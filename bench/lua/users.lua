-- Each request carries X-User-Id for a user drawn at random from a fixed population.
-- Arguments (after wrk's "--"): number of users (default 10000), random seed (default 1).
-- done() prints the run's figures as one JSON line prefixed with "@@bench ".

local DEFAULT_USERS = 10000
local DEFAULT_SEED = 1
local PERCENTILES = { 50, 90, 99, 99.9 }

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

function done(summary, latency, _)
   local errors = summary.errors
   local parts = {
      string.format('"requests":%d', summary.requests),
      string.format('"duration_us":%d', summary.duration),
      string.format('"bytes":%d', summary.bytes),
      string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
                    errors.connect, errors.read, errors.write, errors.status, errors.timeout),
      string.format('"latency_us":{"min":%d,"max":%d,"mean":%.1f,"stdev":%.1f',
                    latency.min, latency.max, latency.mean, latency.stdev),
   }
   local pcts = {}
   for _, p in ipairs(PERCENTILES) do
      local name = tostring(p):gsub("%.", "_")
      pcts[#pcts + 1] = string.format('"p%s":%d', name, latency:percentile(p))
   end
   parts[#parts] = parts[#parts] .. "," .. table.concat(pcts, ",") .. "}"
   io.write("@@bench {" .. table.concat(parts, ",") .. "}\n")
end
