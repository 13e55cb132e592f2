"""Synthetic live traffic for end-to-end tests, and the answers it implies, computed directly
from the events (never through the code under test)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

import aiohttp

AGENTS = [
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
]
PRODUCTS = [("iphone-15-skal", "mobilskal", "apple"), ("samsung-s24-glas", "skarmskydd", "samsung"),
            ("airpods-pro-2", "horlurar", "apple"), ("usb-c-laddare", "laddare", "anker")]


@dataclass
class Post:
    body: dict
    ip: str
    agent: str


@dataclass
class Traffic:
    posts: list[Post] = field(default_factory=list)

    @classmethod
    def generate(cls, site_id: str, visitors: int, seed: int = 7) -> Traffic:
        rng = random.Random(seed)
        traffic = cls()
        for v in range(visitors):
            ip, agent = f"81.227.{v // 250}.{v % 250 + 1}", AGENTS[v % len(AGENTS)]
            for _ in range(rng.choice([1, 1, 2, 3, 5])):
                traffic.posts.append(Post({"site_id": site_id, "name": "pageview",
                                           "url": f"https://shop.example/p/{rng.randint(1, 20)}",
                                           "referrer": rng.choice(["", "https://www.google.com/"])}, ip, agent))
            for _ in range(rng.choice([0, 0, 0, 1, 2])):
                pid, category, brand = rng.choice(PRODUCTS)
                traffic.posts.append(Post({"site_id": site_id, "name": "click", "url": "https://shop.example/p/1",
                                           "product": {"id": pid, "category_slug": category, "brand_slug": brand,
                                                       "partner_slug": "kjell"}}, ip, agent))
            if rng.random() < 0.1:
                traffic.posts.append(Post({"site_id": site_id, "name": "signup", "url": "https://shop.example/"}, ip, agent))
        return traffic

    async def send(self, base_url: str, concurrency: int = 16) -> None:
        """Post every event in order per visitor (visitors interleaved), asserting each is accepted.
        aiohttp: httpx's client took ~2 ms of CPU a request, from the cores the servers use."""
        by_visitor: dict[str, list[Post]] = {}
        for post in self.posts:
            by_visitor.setdefault(post.ip, []).append(post)
        queue = list(by_visitor.values())

        async def worker(client: aiohttp.ClientSession) -> None:
            while queue:
                for post in queue.pop():
                    async with client.post(f"{base_url}/api/event", json=post.body,
                                           headers={"user-agent": post.agent, "x-forwarded-for": post.ip}) as response:
                        text = await response.text()
                    assert response.status == 202, text
                    assert "x-dropped" not in response.headers

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                         connector=aiohttp.TCPConnector(limit=concurrency)) as client:
            await asyncio.gather(*(worker(client) for _ in range(concurrency)))

    # -- what the events imply -------------------------------------------------------------------

    def expected_overview(self) -> dict:
        by_visitor = Counter()
        other = Counter()
        for post in self.posts:
            if post.body["name"] == "pageview":
                by_visitor[post.ip] += 1
            else:
                other[post.ip] += 1
        visitors = {post.ip for post in self.posts}
        # All events of a visitor arrive within seconds: one session each.
        bounces = sum(1 for ip in visitors if by_visitor[ip] <= 1 and other[ip] == 0)
        rate = Decimal(bounces * 100) / Decimal(len(visitors))
        return {"visitors": len(visitors), "pageviews": sum(by_visitor.values()), "sessions": len(visitors),
                "bounce_rate": int(rate.quantize(Decimal(1), rounding=ROUND_HALF_UP))}

    def expected_clicks(self) -> Counter:
        return Counter(post.body["product"]["id"] for post in self.posts if post.body["name"] == "click")
