"""What judging a user agent not seen before costs (the cache in ingest/useragents.py hides it for
repeats): ua-parser's pure-Python resolver against its Rust one (`ua-parser[regex]`, what ingest
uses), and crawlerdetect's bot patterns under Python's `re` (the library) and under RE2 (what
ingest uses), on real browsers' user agents and on 512 characters of junk.

    python3 tests/bench/bench_useragents.py [--each 200]

Not run by CI."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from crawlerdetect import CrawlerDetect
from ua_parser import Parser, basic, regex
from ua_parser.loaders import load_builtins

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ingest.useragents import _Crawlers  # noqa: E402

AGENTS = {
    "Chrome, Windows": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.{n}.0 Safari/537.36",
    "Safari, iPhone": "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.{n}",
    "junk, 512 characters": "x" * 500 + "{n:012d}",
}


def per_call_ms(judge: Callable[[str], object], template: str, each: int) -> float:
    agents = [template.format(n=n) for n in range(each)]  # each one new: nothing cached
    started = time.perf_counter()
    for agent in agents:
        judge(agent)
    return (time.perf_counter() - started) / each * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--each", type=int, default=200)
    args = parser.parse_args()
    matchers = load_builtins()
    crawlers = CrawlerDetect()
    judges = {"ua-parser, Python": Parser(basic.Resolver(matchers)).parse,
              "ua-parser, Rust": Parser(regex.Resolver(matchers)).parse,
              "crawlerdetect, re": lambda agent: crawlers._check_crawler(agent),  # uncached
              "crawlerdetect, RE2": _Crawlers().is_crawler}
    for judge in judges.values():
        judge("warm up")
    print(f"{'ms per new user agent':24}" + "".join(f"{name:>22}" for name in AGENTS))
    for name, judge in judges.items():
        print(f"{name:24}" + "".join(f"{per_call_ms(judge, t, args.each):>22.3f}" for t in AGENTS.values()))


if __name__ == "__main__":
    main()
