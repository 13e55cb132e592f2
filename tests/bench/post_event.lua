-- wrk script: POST pageviews and clicks from many visitors (X-Forwarded-For varies; the server
-- trusts 127.0.0.1 as a proxy). wrk.format replaces wrk.headers when given headers, so every
-- header is set here.
local agent = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
local site = os.getenv("BK_BENCH_SITE") or "bench-example"
local pageview = '{"site_id":"' .. site .. '","name":"pageview","url":"https://bench.example/p/1","referrer":"https://www.google.com/"}'
local click = '{"site_id":"' .. site .. '","name":"click","url":"https://bench.example/p/1","product":{"id":"iphone-15-skal","category_slug":"mobilskal"}}'
local n = 0
request = function()
  n = n + 1
  local headers = {
    ["Content-Type"] = "application/json",
    ["User-Agent"] = agent,
    ["X-Forwarded-For"] = "81.227." .. math.random(0, 255) .. "." .. math.random(1, 254),
  }
  return wrk.format("POST", "/api/event", headers, (n % 5 == 0) and click or pageview)
end
