"""User agent → device, browser, OS, and whether it is a bot. A user agent not seen before costs
~0.6 ms in crawlerdetect and ~0.05 ms in ua-parser's Rust resolver (its pure-Python one, used
when `ua-parser-rs` is missing, ~2 ms), so verdicts are cached per user-agent string."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import ua_parser
from crawlerdetect import CrawlerDetect

_crawlers = CrawlerDetect()
_TABLETS = ("ipad", "tablet", "kindle", "tab ")


@dataclass(frozen=True, slots=True)
class Agent:
    browser: str
    os: str
    device: str  # Desktop, Mobile or Tablet
    is_bot: bool


def warm_up() -> None:
    """Both libraries compile hundreds of patterns on first use (~0.5 s here). A server does that
    before it takes requests, or its first requests all wait that long (the event loop is held)."""
    sample = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
    _crawlers.isCrawler(sample)
    ua_parser.parse(sample)


# crawlerdetect's patterns take time quadratic in the string's length (20,000 characters: 80 s,
# 2,000: 0.4 s, on the event loop), and anyone may send any header: only the start is judged.
# Browsers' user agents are shorter (in-app browsers', the longest, ~400 characters).
MAX_LENGTH = 512


def parse(user_agent: str) -> Agent:
    return _parse(user_agent[:MAX_LENGTH])


@lru_cache(maxsize=20_000)
def _parse(user_agent: str) -> Agent:
    # Blank is no browser: live, the HTTP server trims a header of spaces to nothing.
    if not user_agent.strip(" \t") or _crawlers.isCrawler(user_agent):
        return Agent("", "", "", is_bot=True)
    result = ua_parser.parse(user_agent)
    browser = result.user_agent.family if result.user_agent else ""
    os_name = result.os.family if result.os else ""
    device_family = (result.device.family if result.device else "").lower()
    if any(t in device_family for t in _TABLETS) or ("android" in os_name.lower() and "mobile" not in user_agent.lower()):
        device = "Tablet"
    elif os_name in ("iOS", "Android") or "mobile" in user_agent.lower():
        device = "Mobile"
    else:
        device = "Desktop"
    return Agent(browser if browser != "Other" else "", os_name if os_name != "Other" else "", device, is_bot=False)
