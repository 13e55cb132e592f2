"""Referrer and UTM tags → a source name and a channel (search, social, referral, direct, email,
paid). The maintained referer-parser data on PyPI is from 2016, so the known hosts live here."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import parse_qs, urlsplit

import pycountry

from ingest.event import without_control_characters

# Host suffix (without "www.") → (source, channel). Matched on the registrable tail, so
# "news.google.se" and "google.com" both find Google. This module owns the mapping: hosts,
# country-domain names, app packages, utm_source short names and click ids are the tables below.
_KNOWN: dict[str, tuple[str, str]] = {}


def _add(source: str, channel: str, *hosts: str) -> None:
    for host in hosts:
        _KNOWN[host] = (source, channel)


_add("Google", "search", "googleusercontent.com")
_add("Bing", "search", "bing.com")
_add("DuckDuckGo", "search", "duckduckgo.com")
_add("Yahoo", "search", "yahoo.com", "search.yahoo.com")
_add("Ecosia", "search", "ecosia.org")
_add("Yandex", "search", "yandex.ru", "yandex.com", "ya.ru")
_add("Baidu", "search", "baidu.com")
_add("Brave", "search", "search.brave.com")
_add("Qwant", "search", "qwant.com")
_add("Startpage", "search", "startpage.com")
_add("Kagi", "search", "kagi.com")
_add("Naver", "search", "search.naver.com")
_add("Seznam", "search", "search.seznam.cz")
_add("Perplexity", "search", "perplexity.ai")
_add("ChatGPT", "referral", "chatgpt.com", "chat.openai.com")
_add("Facebook", "social", "facebook.com", "fb.com", "m.facebook.com", "l.facebook.com", "lm.facebook.com")
_add("Instagram", "social", "instagram.com", "l.instagram.com")
_add("LinkedIn", "social", "linkedin.com", "lnkd.in")
_add("Reddit", "social", "reddit.com", "old.reddit.com", "out.reddit.com")
_add("X/Twitter", "social", "twitter.com", "t.co", "x.com")
_add("YouTube", "social", "youtube.com", "youtu.be", "m.youtube.com")
_add("TikTok", "social", "tiktok.com")
_add("Pinterest", "social", "pinterest.com", "pinterest.se", "pin.it")
_add("Snapchat", "social", "snapchat.com")
_add("Threads", "social", "threads.net")
_add("Mastodon", "social", "mastodon.social")
_add("Flashback", "social", "flashback.org")
# Webmail before its portal: mail.yahoo.com is not Yahoo search.
_add("Gmail", "email", "mail.google.com")
_add("Outlook", "email", "outlook.live.com", "outlook.office.com", "outlook.office365.com")
_add("Yahoo Mail", "email", "mail.yahoo.com")
_add("Yandex Mail", "email", "mail.yandex.ru", "mail.yandex.com")
_add("Proton Mail", "email", "mail.proton.me")

# Names registered under many country domains: google.se, google.co.uk, google.com.au,
# pinterest.de, yandex.com.tr, yahoo.co.jp — the name, then a top-level domain, or a second level
# such as co or com and one (_COUNTRY_SECOND_LEVEL). Not google.com.evil.example.
_COUNTRY_NAMES: dict[str, tuple[str, str]] = {
    "google": ("Google", "search"),
    "pinterest": ("Pinterest", "social"),
    "yandex": ("Yandex", "search"),
    "yahoo": ("Yahoo", "search"),
}
# Of Google's hosts only search's own: docs., sites., translate. and the like are referrals.
_SEARCH_SUBDOMAINS = {"google": frozenset({"", "m", "images", "news", "scholar", "books", "video", "encrypted"})}
# Where such names are registered: com and countries' top-level domains (ISO 3166-1 codes, and
# the UK's): google.se, not google.xyz or google.zz.
_NAME_TLDS = frozenset(c.alpha_2.lower() for c in pycountry.countries) | {"uk", "com"}
# Their webmail on country domains too (mail.yahoo.co.jp, mail.yandex.com.tr): email, not search.
_COUNTRY_MAIL: dict[str, tuple[str, str]] = {"yahoo": _KNOWN["mail.yahoo.com"], "yandex": _KNOWN["mail.yandex.ru"]}

# android-app://<package>/ is what Chrome on Android sends when an app opened the link.
_APPS: dict[str, tuple[str, str]] = {
    "com.google.android.googlequicksearchbox": ("Google", "search"),  # the Google app, Discover
    "com.google.android.gm": ("Gmail", "email"),
    "com.microsoft.office.outlook": ("Outlook", "email"),
    "com.facebook.katana": ("Facebook", "social"),
    "com.facebook.lite": ("Facebook", "social"),
    "com.instagram.android": ("Instagram", "social"),
    "com.linkedin.android": ("LinkedIn", "social"),
    "com.reddit.frontpage": ("Reddit", "social"),
    "com.twitter.android": ("X/Twitter", "social"),
    "com.google.android.youtube": ("YouTube", "social"),
    "com.zhiliaoapp.musically": ("TikTok", "social"),
    "com.pinterest": ("Pinterest", "social"),
    "com.snapchat.android": ("Snapchat", "social"),
}

# utm_source=facebook names Facebook as surely as a facebook.com referrer does; so do the short
# names networks tag their own links with (Instagram: utm_source=ig on links in a bio).
_LABELS = {host.split(".")[0]: known for host, known in _KNOWN.items()
           if host.count(".") == 1 and len(host.split(".")[0]) > 2}
_LABELS |= _COUNTRY_NAMES | {"fb": _KNOWN["facebook.com"], "ig": _KNOWN["instagram.com"]}

# Ad click ids that auto-tagging adds instead of utm_* tags: the visit is a paid one. Not fbclid:
# Facebook adds it to every outgoing link, organic posts included.
_CLICK_IDS: dict[str, str] = {"gclid": "Google", "gbraid": "Google", "wbraid": "Google", "dclid": "Google",
                              "msclkid": "Bing"}
# Substrings of the parameters worth parsing a page URL's query for (most URLs carry none).
_TAGGED = ("utm_", "clid", "clkid", "braid")

# utm_medium (lower case, trimmed) → channel, first match wins. GA4's default channel rules, as
# Plausible's: paid is "cp" anywhere (cpc, cpm, cpv, cpa), ppc, retargeting or paid-anything
# (paid_social, paid-social, paidsearch); display and banner are paid here too (no display channel).
_MEDIUM_CHANNELS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r".*cp.*|ppc|retargeting|paid.*|display|banner"), "paid"),
    (re.compile(r"e[-_ ]?mail|newsletter|nyhetsbrev"), "email"),
    (re.compile(r"social|social[-_ ](network|media)|sm"), "social"),
)


@dataclass(frozen=True, slots=True)
class Source:
    source: str = ""
    channel: str = "direct"
    utm_source: str = ""
    utm_medium: str = ""
    utm_campaign: str = ""


def _known(host: str) -> tuple[str, str] | None:
    host = host.removeprefix("www.")
    if host in _KNOWN:
        return _KNOWN[host]
    labels = host.split(".")
    for i in range(1, len(labels)):
        if (hit := _KNOWN.get(".".join(labels[i:]))) is not None:
            return hit
    for i, label in enumerate(labels[:-1]):
        rest = labels[i + 1:]
        if label in _COUNTRY_NAMES and rest[-1] in _NAME_TLDS and (
                len(rest) == 1 or (len(rest) == 2 and rest[0] in _COUNTRY_SECOND_LEVEL)):
            if i and labels[i - 1] == "mail" and label in _COUNTRY_MAIL:
                return _COUNTRY_MAIL[label]
            if label in _SEARCH_SUBDOMAINS and ".".join(labels[:i]) not in _SEARCH_SUBDOMAINS[label]:
                return None
            return _COUNTRY_NAMES[label]
    return None


# Second levels under which country domains register names: google.co.uk, google.com.au, …
_COUNTRY_SECOND_LEVEL = frozenset({"co", "com", "net", "org", "ac", "or", "ne", "gov", "edu"})


@lru_cache(maxsize=10_000)  # referrers repeat: search engines, social sites, partners
def _host(url: str) -> str:
    """Lower case, no trailing dot, IDNA (as site domains are stored). Control characters never
    name a source: dropped, they cannot reach the "source\\x1fchannel" value the rollups store
    (streams/activity.py) and split a source into a false channel."""
    host = without_control_characters(urlsplit(url).hostname or "").lower().rstrip(".")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return host


# A DNS label as hosts carry them: `_` too, which site domains (streams/sites.py) may not hold.
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


@lru_cache(maxsize=10_000)
def usable(referrer: str | None) -> str | None:
    """The referrer, if its host is one a browser could have sent (a name, an IPv4 or an IPv6
    address, a port of 0–65535); else None: counted as direct, stored as none, as one that cannot
    be parsed at all (ingest/event.py). `https://exa mple.com/` or a port of 99999 named sources."""
    if not referrer:
        return None
    try:
        parts = urlsplit(referrer)
        parts.port  # noqa: B018 - raises ValueError when out of range or no number
    except ValueError:
        return None
    host = (parts.hostname or "").rstrip(".")
    if without_control_characters(host) != host or ("[" in parts.netloc and ":" not in host):
        return None  # `ho\x01st.com` is not host.com; `[v1.x]` (an IPvFuture) no browser sends
    if ":" in host:  # IPv6; a zone (fe80::1%25eth0) never leaves the machine
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
        return None if "%" in host else referrer
    host = _host(referrer)
    usable_name = host and len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in host.split("."))
    return referrer if usable_name else None


def _same_site(ref_host: str, page_url: str, site_host: str) -> bool:
    """A self-referral: from the page's own host, or the site's domain or a subdomain of it."""
    ref = ref_host.removeprefix("www.")
    site = site_host.lower().removeprefix("www.")
    return ref == _host(page_url).removeprefix("www.") or ref == site or ref.endswith("." + site)


# Pages, referrers and their tags repeat; a verdict is ~25 % of enriching an event otherwise
# (`tests/bench/bench_import.py` under py-spy), and `Source` is immutable.
@lru_cache(maxsize=20_000)
def classify(page_url: str, referrer: str | None, site_host: str) -> Source:
    """Source of a page view: the referrer's (an app's for android-app://), else the page URL's
    utm_source, else an ad click id's; channel from the same, then paid for a click id, then
    utm_medium when it names a channel."""
    query = parse_qs(urlsplit(page_url).query) if any(tag in page_url for tag in _TAGGED) else {}
    # Trimmed: `utm_source=%20facebook%20` is Facebook, and one of only spaces names no source.
    utm = {k: without_control_characters(query[k][0]).strip()[:200] for k in ("utm_source", "utm_medium", "utm_campaign")
           if k in query}
    medium = utm.get("utm_medium", "").lower()

    ref_host = _host(referrer) if referrer else ""
    app = ref_host and referrer[:12].lower() == "android-app:"  # a package name, not a host
    if ref_host and not app and _same_site(ref_host, page_url, site_host):
        ref_host = ""  # a self-referral is direct traffic

    source, channel = "", "direct"
    if app:
        source, channel = _APPS.get(ref_host) or (ref_host, "referral")
    elif ref_host:
        source, channel = _known(ref_host) or (ref_host.removeprefix("www."), "referral")
    if utm.get("utm_source") and not source:
        tag = utm["utm_source"].lower()
        source, channel = _LABELS.get(tag) or _known(tag) or (utm["utm_source"], "referral")
    if click := next((_CLICK_IDS[name] for name in _CLICK_IDS if name in query), None):
        source, channel = source or click, "paid"
    channel = next((named for pattern, named in _MEDIUM_CHANNELS if pattern.fullmatch(medium)), channel)
    return Source(source, channel, utm.get("utm_source", ""), utm.get("utm_medium", ""), utm.get("utm_campaign", ""))
