-- For wrk: with WRK_PATHS="/a,/b" set, requests cycle through those paths; done() prints one
-- machine-readable line with what benchmarks/_common.py needs.
local paths = {}
local spec = os.getenv("WRK_PATHS")
if spec then
  for p in string.gmatch(spec, "[^,]+") do paths[#paths + 1] = p end
end
local i = 0

if #paths > 0 then
  request = function()
    i = i % #paths + 1
    return wrk.format("GET", paths[i])
  end
end

done = function(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format(
    'LOOPWATCH_BENCH {"requests": %d, "seconds": %.6f, "rps": %.3f, "errors": %d, ' ..
    '"non_2xx": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "mean_us": %.1f}\n',
    summary.requests, seconds, summary.requests / seconds, errors,
    summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
