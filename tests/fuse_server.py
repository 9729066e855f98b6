"""A small server on the project's FUSE engine, for tests of the engine itself:

    python tests/fuse_server.py MOUNTPOINT

    disk    a 64 MiB device file on the real data path (zramfs.zram._zram), no trio
    fail    reading it raises ValueError in the handler
    hog     reading it holds the GIL for 2 s (a Python busy loop, switch interval raised)
    stats   the session's counters, JSON
    big     its handler answers a read with twice what was asked
    slow    reading it takes 2 s, the GIL released (a request to interrupt)

Serves until SIGTERM.
"""
from __future__ import annotations

import errno
import json
import logging
import signal
import stat
import sys
import threading
import time

from zramfs.fuse import _fuse
from zramfs.zram import _zram

ROOT, DISK, FAIL, HOG, STATS, BIG, SLOW = range(1, 8)
FILES = {"disk": DISK, "fail": FAIL, "hog": HOG, "stats": STATS, "big": BIG, "slow": SLOW}


class Ops:
    def __init__(self, disk: _zram.Disk) -> None:
        self.disk = disk
        self.session: _fuse.Session | None = None

    def _attr(self, ino: int) -> _fuse.Attr:
        if ino == ROOT:
            return _fuse.Attr(ROOT, stat.S_IFDIR | 0o755, st_nlink=2)
        if ino not in FILES.values():
            raise OSError(errno.ENOENT, "no such inode")
        return _fuse.Attr(ino, stat.S_IFREG | 0o644, 64 << 20 if ino == DISK else 4096)

    def lookup(self, parent: int, name: str) -> _fuse.Attr:
        if parent != ROOT or name not in FILES:
            raise OSError(errno.ENOENT, name)
        return self._attr(FILES[name])

    def getattr(self, ino: int) -> _fuse.Attr:
        return self._attr(ino)

    def readdir(self, ino: int) -> list:
        return [(n, self._attr(i)) for n, i in FILES.items()]

    def open(self, ino: int, flags: int) -> _fuse.OpenReply:
        if ino == DISK:
            return _fuse.OpenReply(self.disk.handle, data=True)
        return _fuse.OpenReply(ino)

    def read(self, ino: int, fh: int, size: int, off: int) -> bytes:
        if ino == FAIL:
            raise ValueError("a bug in a handler")
        if ino == HOG:
            sys.setswitchinterval(5.0)          # nothing takes the GIL from us for 2 s
            end = time.monotonic() + 2
            while time.monotonic() < end:
                pass
            sys.setswitchinterval(0.005)
            return b"done\n"[off:]
        if ino == BIG:
            return b"x" * (2 * size)
        if ino == SLOW:
            time.sleep(2)
            return b"slow\n"[off:]
        return (json.dumps(self.session.stats()) + "\n").encode()[off : off + size]


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    disk = _zram.Disk(0)
    disk.attach(_zram.Meta(64 << 20, "lz4", name="fuse-test"))
    ops = Ops(disk)
    transport = sys.argv[2] if len(sys.argv) > 2 else "classic"
    if transport == "io_uring" and not _fuse.uring_param():
        raise SystemExit(f"io_uring: {_fuse.URING_PARAM} is not Y")
    session = _fuse.Session(sys.argv[1], ops, data_ops=_zram.data_ops_capsule(),
                            attr_timeout=0, entry_timeout=0, transport=transport)
    ops.session = session
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=session.exit).start())
    loop = threading.Thread(target=session.run)
    loop.start()
    print("READY", flush=True)
    while loop.is_alive():
        loop.join(0.1)                           # the main thread stays free for signals
    session.close()


if __name__ == "__main__":
    main()
