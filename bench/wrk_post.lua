-- wrk script: POST one JSON body per request, cycling through the lines of BODIES_FILE (one body per line), each
-- wrk thread starting at its own offset; prints a JSON summary line at the end for bench/run.py.
-- With WRK_BY_OUTCOME=1 it also keeps each answer's server-side latency (the x-router-latency header) by outcome,
-- so the summary tells accepted answers (200) from shed ones (503); off by default, as it slows wrk down.
local bodies = {}
local counter = 0
local threads = {}
accepted_ms = {}
shed_ms = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function init(args)
  for line in io.lines(os.getenv("BODIES_FILE")) do bodies[#bodies + 1] = line end
  counter = math.random(#bodies)
end

function request()
  counter = counter % #bodies + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, bodies[counter])
end

if os.getenv("WRK_BY_OUTCOME") == "1" then
  function response(status, headers, body)
    local ms = tonumber(headers["x-router-latency"] or "")
    if ms == nil then return end
    if status == 200 then accepted_ms[#accepted_ms + 1] = ms elseif status == 503 then shed_ms[#shed_ms + 1] = ms end
  end
end

local function percentile(values, q)
  if #values == 0 then return -1 end
  table.sort(values)
  return values[math.max(1, math.ceil(#values * q / 100))]
end

function done(summary, latency, requests)
  local accepted, shed = {}, {}
  for _, thread in ipairs(threads) do
    for _, v in ipairs(thread:get("accepted_ms")) do accepted[#accepted + 1] = v end
    for _, v in ipairs(thread:get("shed_ms")) do shed[#shed + 1] = v end
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "non2xx": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d, "accepted": %d, "shed": %d, ' ..
    '"accepted_server_p50_ms": %.1f, "accepted_server_p99_ms": %.1f, ' ..
    '"shed_server_p50_ms": %.1f, "shed_server_p99_ms": %.1f}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max, #accepted, #shed,
    percentile(accepted, 50), percentile(accepted, 99), percentile(shed, 50), percentile(shed, 99)))
end
