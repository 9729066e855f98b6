#!/usr/bin/env python3
"""A program whose memory lives mostly in swap, for scripts/bench: run inside a memory cgroup
much smaller than MIB, it fills MIB of compressible pages (each a function of its index),
touches TOUCHES pages at random (each touch of a swapped-out page is a swap-in fault), then
reads everything back in order and checks it. Prints one JSON line of timings.

    python swaphog.py MIB TOUCHES
"""
from __future__ import annotations

import hashlib
import json
import mmap
import random
import sys
import time

PAGE = 4096


def page(index: int) -> bytes:
    """Roughly a third compressible noise, the rest a repeated word: lz4 takes it to ~1/3."""
    seed = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=64).digest()
    return hashlib.shake_128(seed).digest(1280) + (seed * (PAGE // 64))[: PAGE - 1280]


def main() -> int:
    pages = int(sys.argv[1]) * (1 << 20) // PAGE
    touches = int(sys.argv[2])
    mem = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    started = time.perf_counter()
    for i in range(pages):
        mem[i * PAGE : (i + 1) * PAGE] = page(i)
    filled = time.perf_counter()
    order = [random.randrange(pages) for _ in range(touches)]
    began = time.perf_counter()
    for i in order:
        mem[i * PAGE]                                  # one byte: the fault is the cost
    touched = time.perf_counter()
    bad = sum(1 for i in range(pages) if mem[i * PAGE : (i + 1) * PAGE] != page(i))
    checked = time.perf_counter()
    print(json.dumps({"pages": pages, "fill_s": filled - started,
                      "touch_us": (touched - began) / touches * 1e6,
                      "readback_s": checked - touched, "bad_pages": bad}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
