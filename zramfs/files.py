"""Opening the files an operator names (`dict=`, `backing_dev`) without waiting on them.

An open can wait for good: a FIFO's waits for a partner, and at a restart nobody is there to
be one. So the path is looked at first (stat never waits on what it names, and a device that
acts when opened, a watchdog or a tape, is refused unopened), then opened with O_NONBLOCK and
looked at again through the descriptor, which is what is used (the path may have changed in
between). Anything else than a regular file (or, where taken, a block device) is EINVAL.

    fd = open_checked("/etc/zramfs/pages.dict", os.O_RDONLY)

Worker threads only: a path may lie in a file system that answers slowly.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat

KINDS = {stat.S_IFREG: "a regular file", stat.S_IFBLK: "a block device"}


def _kind(mode: int) -> str:
    return {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR:
            "a character device", stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(mode), "not a file")


def open_checked(path: str, flags: int, block_ok: bool = False) -> int:
    """A descriptor of `path` (opened with `flags`, close-on-exec, O_NONBLOCK cleared once
    open), a regular file or, with `block_ok`, a block device. OSError(EINVAL) for anything
    else, with the kind in its message; the open's own OSError where it fails."""
    kinds = (stat.S_IFREG, stat.S_IFBLK) if block_ok else (stat.S_IFREG,)
    want = " or ".join(KINDS[k] for k in kinds)
    st = os.stat(path)
    if stat.S_IFMT(st.st_mode) not in kinds:
        raise OSError(errno.EINVAL, f"{_kind(st.st_mode)}, not {want}")
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        now = os.fstat(fd)
        if stat.S_IFMT(now.st_mode) not in kinds:
            raise OSError(errno.EINVAL, f"{_kind(now.st_mode)}, not {want}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd
