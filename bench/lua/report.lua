-- Shared by the wrk scripts: done() prints the run's figures as one JSON line
-- prefixed with "@@bench ", which bench/wrk.py parses.

local PERCENTILES = { 50, 90, 99, 99.9 }

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
