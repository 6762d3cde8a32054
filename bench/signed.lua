-- wrk script: pre-signed webhook requests, each wrk thread cycling through a file of its own.
-- bench/wrk.py writes the files (BENCH_WRK_PREFIX<thread>.dat: "<length>\n<raw HTTP request>"...)
-- because a signature (HMAC-SHA256 over "t.body") cannot be computed in wrk's Lua.
local prefix = os.getenv("BENCH_WRK_PREFIX")
-- Paced runs: each connection waits this many ms after an answer before its next request
-- (the rate is then about connections / pause); unset: as fast as possible.
local pause = tonumber(os.getenv("BENCH_WRK_PAUSE_MS") or "")
if pause then
  function delay()
    return pause
  end
end
local threads = {}
local next_tid = 0

function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
  table.insert(threads, thread)
end

function init(args)
  reqs = {}
  local f = assert(io.open(prefix .. tid .. ".dat", "rb"))
  while true do
    local len = f:read("*l")
    if not len then break end
    reqs[#reqs + 1] = f:read(tonumber(len))
  end
  f:close()
  index = 0
  wrapped = 0
  statuses = {}
end

function request()
  index = index + 1
  if index > #reqs then
    index = 1
    wrapped = wrapped + 1
  end
  return reqs[index]
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
end

function done(summary, latency, requests)
  local counts, wraps, pool = {}, 0, 0
  for _, thread in ipairs(threads) do
    for k, v in pairs(thread:get("statuses")) do counts[k] = (counts[k] or 0) + v end
    wraps = wraps + thread:get("wrapped")
  end
  local parts = {}
  for k, v in pairs(counts) do parts[#parts + 1] = string.format('"%s":%d', k, v) end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
    .. '"statuses":{%s},"wrapped":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(parts, ","), wraps, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max))
end
