#!/usr/bin/env python3
"""A program whose memory lives mostly in swap, for scripts/bench and scripts/bench-zswap: run
inside a memory cgroup much smaller than MIB, it fills MIB of compressible pages (each a
function of its index), touches TOUCHES pages at random (each touch of a swapped-out page is a
swap-in fault), then reads everything back in order and checks it. Prints one JSON line of
timings.

    python swaphog.py MIB TOUCHES [--hot FRACTION] [--pause]

--hot F: skewed touches, nine in ten on the first F of the pages (the hot set), the rest
anywhere. --pause: after the touches, print a JSON line and wait for a line on stdin before
reading back, so the caller can measure the memory the swapped pages hold.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import random
import sys
import time

PAGE = 4096
HOT_SHARE = 0.9                 # of the touches, with --hot, on the hot set


def page(index: int) -> bytes:
    """Roughly a third compressible noise, the rest a repeated word: lz4 takes it to ~1/3."""
    seed = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=64).digest()
    return hashlib.shake_128(seed).digest(1280) + (seed * (PAGE // 64))[: PAGE - 1280]


def percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mib", type=int)
    ap.add_argument("touches", type=int)
    ap.add_argument("--hot", type=float, default=None)
    ap.add_argument("--pause", action="store_true")
    args = ap.parse_args()
    pages = args.mib * (1 << 20) // PAGE
    mem = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    started = time.perf_counter()
    for i in range(pages):
        mem[i * PAGE : (i + 1) * PAGE] = page(i)
    filled = time.perf_counter()
    hot = max(1, int(pages * args.hot)) if args.hot else pages
    order = [random.randrange(hot) if args.hot and random.random() < HOT_SHARE
             else random.randrange(pages) for _ in range(args.touches)]
    lat = []
    clock = time.perf_counter_ns
    began = time.perf_counter()
    for i in order:
        t = clock()
        mem[i * PAGE]                                  # one byte: the fault is the cost
        lat.append(clock() - t)
    touched = time.perf_counter()
    lat.sort()
    result = {"pages": pages, "fill_s": filled - started,
              "touch_us": (touched - began) / args.touches * 1e6,
              "touch_p50_us": percentile(lat, 0.5), "touch_p99_us": percentile(lat, 0.99)}
    if args.pause:
        print(json.dumps(result), flush=True)
        sys.stdin.readline()
    checked_from = time.perf_counter()
    bad = sum(1 for i in range(pages) if mem[i * PAGE : (i + 1) * PAGE] != page(i))
    result.update(readback_s=time.perf_counter() - checked_from, bad_pages=bad)
    print(json.dumps(result))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
