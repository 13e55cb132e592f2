-- wrk script of tests/bench/bench_ingest.py: the same visitors, paths and referrers for every
-- target, a different request each time. BK_BENCH_TARGET=goatcounter sends GoatCounter's
-- `GET /count`; otherwise `POST /api/event` with pageviews, custom events and clicks for site
-- BK_BENCH_SITE. The server trusts 127.0.0.1 as a proxy, so X-Forwarded-For picks the visitor.
-- Each thread seeds its own random numbers: wrk threads share one seed otherwise. wrk.format
-- replaces wrk.headers when given headers, so all are set here.
local agent = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
local site = os.getenv("BK_BENCH_SITE") or "bench-example"
local goatcounter = os.getenv("BK_BENCH_TARGET") == "goatcounter"
local referrers = {"https://www.google.com/", "https://www.bing.com/", "https://l.facebook.com/", "", "https://prisjakt.nu/x"}
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

function init(args)
  math.randomseed(os.time() * 1000 + (wrk.thread:get("id") or 0) * 7919)
end

local function event_body(path, referrer)
  local kind = math.random(1, 10)
  if kind <= 7 then
    return '{"site_id":"' .. site .. '","name":"pageview","url":"https://bench.example' .. path ..
      '","referrer":"' .. referrer .. '"}'
  elseif kind <= 8 then
    return '{"site_id":"' .. site .. '","name":"newsletter","url":"https://bench.example' .. path ..
      '","props":{"plan":"p' .. math.random(1, 5) .. '"}}'
  end
  return '{"site_id":"' .. site .. '","name":"click","url":"https://bench.example' .. path ..
    '","product":{"id":"prod-' .. math.random(1, 200) .. '","category_slug":"c' .. math.random(1, 20) ..
    '","partner_slug":"kjell"}}'
end

request = function()
  local path = "/p/" .. math.random(1, 500)
  local referrer = referrers[math.random(1, #referrers)]
  local headers = {
    ["User-Agent"] = agent,
    ["X-Forwarded-For"] = "81." .. math.random(0, 255) .. "." .. math.random(0, 255) .. "." .. math.random(1, 254),
  }
  if goatcounter then
    headers["Host"] = "stats.localhost"
    return wrk.format("GET", "/count?p=" .. path .. "&r=" .. referrer, headers)
  end
  headers["Content-Type"] = "text/plain"
  return wrk.format("POST", "/api/event", headers, event_body(path, referrer))
end
