"""Holds anonymous pages (memhog's: each a function of its index) for as long as it lives, and
checks them all whenever asked. Run in a memory cgroup much smaller than MIB, most of them
live in swap: a process that stays in swap while the test does things to the swap device.

    python swapheld.py MIB

Prints "filled PAGES" once the pages are written; then, for each line on stdin, checks every
page and prints "ok PAGES" or "bad INDEX" (the first page that does not read back as written).
Exits at the end of its input.
"""
from __future__ import annotations

import mmap
import sys

from memhog import PAGE, page


def first_bad(mem: mmap.mmap, pages: int) -> int | None:
    return next((i for i in range(pages) if mem[i * PAGE : (i + 1) * PAGE] != page(i)), None)


def main() -> int:
    pages = int(sys.argv[1]) * (1 << 20) // PAGE
    mem = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(pages):
        mem[i * PAGE : (i + 1) * PAGE] = page(i)
    print(f"filled {pages}", flush=True)
    for _ in sys.stdin:
        bad = first_bad(mem, pages)
        print(f"ok {pages}" if bad is None else f"bad {bad}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
