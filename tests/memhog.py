"""Fills anonymous memory with compressible pages, each a function of its index, touches it
all, then reads it all back and checks every page. Run inside a small memory cgroup, so most
of it has to go out to swap and come back.

    python memhog.py MIB

Exit status 0 only if every page read back as written; 1 with the first bad page on stderr.
"""
from __future__ import annotations

import hashlib
import mmap
import sys

PAGE = 4096
NOISE = 1024          # incompressible head of each page; the rest repeats a 64-byte word


def page(index: int) -> bytes:
    """Page `index`'s content: compresses to roughly a quarter with lz4."""
    seed = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=64).digest()
    noise = hashlib.shake_128(seed).digest(NOISE)
    return noise + (seed * (PAGE // 64))[: PAGE - NOISE]


def main() -> int:
    pages = int(sys.argv[1]) * (1 << 20) // PAGE
    mem = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(pages):
        mem[i * PAGE : (i + 1) * PAGE] = page(i)
    print(f"wrote {pages} pages", flush=True)
    for i in range(pages):
        if mem[i * PAGE : (i + 1) * PAGE] != page(i):
            print(f"page {i} does not read back as written", file=sys.stderr, flush=True)
            return 1
    print(f"verified {pages} pages", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
