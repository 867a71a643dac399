-- Each request carries X-Sticky-Key and a bearer token of a user drawn at random from the
-- users listed in a file (one "user token" pair per line), as the proxy would forward them.
-- Arguments (after wrk's "--"): the file, random seed (default 1).

dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "report.lua")

local requests = {}

function init(args)
   math.randomseed(tonumber(args[2]) or 1)
   for line in io.lines(args[1]) do
      local user, token = line:match("^(%S+) (%S+)$")
      requests[#requests + 1] = wrk.format("GET", "/", {
         ["X-Sticky-Key"] = user, ["Authorization"] = "Bearer " .. token })
   end
end

function request()
   return requests[math.random(#requests)]
end
