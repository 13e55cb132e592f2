-- wrk script for GoatCounter's /count: the same varied paths and referrers as post_event.lua.
local referrers = {"https://www.google.com/", "https://www.bing.com/", "https://l.facebook.com/", "", "https://prisjakt.nu/x"}
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

function init(args)
  math.randomseed(os.time() * 1000 + (wrk.thread:get("id") or 0) * 7919)
end

request = function()
  local headers = {
    ["Host"] = "stats.localhost",
    ["User-Agent"] = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    ["X-Forwarded-For"] = "81." .. math.random(0, 255) .. "." .. math.random(0, 255) .. "." .. math.random(1, 254),
  }
  local path = "/count?p=/p/" .. math.random(1, 500) .. "&r=" .. referrers[math.random(1, #referrers)]
  return wrk.format("GET", path, headers)
end
