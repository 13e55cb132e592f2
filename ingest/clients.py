"""Who sent a request: the client IP (honouring X-Forwarded-For only from trusted proxies) and
its country (a trusted edge's header, else the offline iptocc database). Raw IPs go no further
than the visitor-id hash."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from functools import lru_cache

import iptocc
import pycountry

from ingest.event import canonical_ip_text

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Trusted proxies: hashable, since verdicts are cached by (address, trusted); a frozenset
# (Settings.trusted_networks) hashes once, a tuple on every lookup.
Trusted = frozenset[Network] | tuple[Network, ...]

# Edges that geolocate for us (Cloudflare, Vercel, CloudFront).
_COUNTRY_HEADERS = ("cf-ipcountry", "x-vercel-ip-country", "cloudfront-viewer-country")
# Assigned ISO 3166-1 alpha-2 codes only: edges send XX/ZZ/T1 (Tor) for "unknown".
_COUNTRIES = frozenset(c.alpha_2 for c in pycountry.countries)
# Longer than any spelling of an address (`[…:ffff:255.255.255.255%zone]:65535`, spaces around):
# no address, and not cached. Entries left of a proxy's are the client's to write, and 50,000
# of a header's length each would hold gigabytes.
_LONGEST_HOP = 100


# A dotted-quad IPv4 address as `ipaddress` takes it (no leading zeros), ASCII digits only. Most
# clients are such an address, a new one on nearly every request of a busy site: matched here,
# it needs no `ipaddress` parse (~3 µs each, twice per new client: its spelling and its trust).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")


@lru_cache(maxsize=16)
def _ipv4_ranges(trusted: Trusted) -> tuple[tuple[int, int], ...]:
    """The trusted IPv4 networks as (network, netmask) integers."""
    return tuple((int(net.network_address), int(net.netmask)) for net in trusted if net.version == 4)


def _is_trusted(address: str, trusted: Trusted) -> bool:
    if _DOTTED_QUAD.fullmatch(address):
        ip = int.from_bytes(socket.inet_aton(address), "big")
        return any(ip & mask == network for network, mask in _ipv4_ranges(trusted))
    return _trusted(address, trusted)


@lru_cache(maxsize=4096)  # peers are mostly the same few proxies; parsing an IP is not free
def _trusted(address: str, trusted: Trusted) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def client_ip(peer: str, headers: Mapping[str, str], trusted: Trusted) -> str:
    """The right-most X-Forwarded-For entry that is not itself a trusted proxy."""
    peer = _address(peer)  # a server listening on `::` sees IPv4 peers as `::ffff:127.0.0.1`
    if not _is_trusted(peer, trusted):
        return peer
    forwarded = [_address(part) if len(part) <= _LONGEST_HOP else part.strip()
                 for part in headers.get("x-forwarded-for", "").split(",") if part.strip()]
    for hop in reversed(forwarded):
        if len(hop) > _LONGEST_HOP or not _is_trusted(hop, trusted):
            return hop
    return forwarded[0] if forwarded else peer


def _address(hop: str) -> str:
    """One spelling per address, as imports have (ingest/event.py): proxies may add a port
    (`81.2.69.160:5000`, `[2001:db8::1]:443`), write IPv6 in capitals or uncompressed, or an IPv4
    client as `::ffff:81.2.69.160`. Anything else is kept as sent."""
    text = hop.strip()
    return text if _DOTTED_QUAD.fullmatch(text) else _respelled(text)


@lru_cache(maxsize=50_000)
def _respelled(text: str) -> str:
    return canonical_ip_text(text) or text


@lru_cache(maxsize=50_000)
def _lookup(ip: str) -> str:
    try:
        return iptocc.country_code(ip) or ""
    except ValueError:
        return ""


def country(ip: str, peer: str, headers: Mapping[str, str], trusted: Trusted) -> str:
    if _is_trusted(_address(peer), trusted):
        for name in _COUNTRY_HEADERS:
            code = headers.get(name, "").strip().upper()
            if code in _COUNTRIES:
                return code
    return _lookup(ip) if len(ip) <= _LONGEST_HOP else ""
