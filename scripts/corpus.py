"""A corpus of real files from this machine, for density tests and benchmarks.

Files under /usr/lib and /usr/share/doc, walked in sorted order and concatenated up to the
asked size, as a file system image would hold them: the same machine gives the same bytes.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

PAGE = 4096
ROOTS = ("/usr/share/doc", "/usr/lib")


def _files(roots: tuple[str, ...]) -> Iterator[Path]:
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if path.is_file() and not path.is_symlink():
                    yield path


def build(size: int, roots: tuple[str, ...] = ROOTS) -> bytes:
    """`size` bytes (rounded down to whole pages) of real files, concatenated."""
    size -= size % PAGE
    out = bytearray()
    for path in _files(roots):
        try:
            out += path.read_bytes()[: size - len(out)]
        except OSError:
            continue
        if len(out) >= size:
            return bytes(out)
    raise RuntimeError(f"only {len(out)} bytes of files under {roots}, wanted {size}")


def pages(data: bytes) -> Iterator[memoryview]:
    view = memoryview(data)
    for off in range(0, len(data) - len(data) % PAGE, PAGE):
        yield view[off : off + PAGE]
