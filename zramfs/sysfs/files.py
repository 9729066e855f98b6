"""Opening the files an operator names (`dict=`, `backing_dev`) without waiting on them, and
never inside the daemon's own tree.

An open can wait for good: a FIFO's waits for a partner, and at a restart nobody is there to
be one. So the path is looked at first (stat never waits on what it names, and a device that
acts when opened, a watchdog or a tape, is refused unopened), then opened with O_NONBLOCK and
looked at again through the descriptor, which is what is used (the path may have changed in
between). Anything else than a regular file (or, where taken, a block device) is EINVAL.

    fd = open_checked("/etc/zramfs/pages.dict", os.O_RDONLY)

A path inside the tree (or a loop device over a file in it) is EINVAL: the daemon would be
waiting on itself. The tree is recognised by its device number in /proc/self/mountinfo, never
by a stat of it (tree_dev).

Worker threads only: a path may lie in a file system that answers slowly, or in the tree.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from pathlib import Path


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


def mount_path(field: str) -> str:
    """A path as the mount tables (/proc/mounts, mountinfo) write it, with the blanks and
    backslashes they escape in octal put back."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def tree_dev(tree: Path) -> int | None:
    """The device number of the file system mounted at `tree`, from /proc/self/mountinfo:
    never a stat of the tree, which waits for the daemon to answer (and while it adopts
    devices at a restart, it does not)."""
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in reversed(lines):             # the last mount at a path is the one seen there
        fields = line.split()
        if mount_path(fields[4]) == str(tree):
            major, minor = fields[2].split(":")
            return os.makedev(int(major), int(minor))
    return None


def inside_tree(path: str, tree: Path | None) -> bool:
    """The path lies inside the daemon's own tree, or is a loop device over a file in it.
    Worker threads only: a path in the tree needs the trio thread to answer."""
    if tree is None:
        return False
    try:
        st = os.stat(path)
        if st.st_dev == tree_dev(tree):
            return True
    except OSError:
        return False                       # the caller's open says what is wrong
    if not stat.S_ISBLK(st.st_mode):
        return False
    back = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
                "/loop/backing_file")
    try:
        return back.read_text().strip().startswith(f"{tree}/")
    except OSError:
        return False                       # not a loop device


def file_id(st: os.stat_result) -> tuple[int, ...]:
    """What tells one backing device from another: a block device's number (its node may be
    made anew), a file's device and inode."""
    return (st.st_rdev,) if stat.S_ISBLK(st.st_mode) else (st.st_dev, st.st_ino)


MAX_DICTIONARY = 16 << 20             # zstd's dictionaries are kilobytes; refuse anything huge


def read_outside_tree(path: str, tree: Path | None) -> bytes:
    """A dictionary file's content, read in a worker thread; EINVAL inside the tree, and
    for anything but a regular file (files.open_checked: a FIFO would wait for a writer)."""
    if inside_tree(path, tree):
        raise OSError(errno.EINVAL, f"lies inside the zramfs tree at {tree}")
    with open(open_checked(path, os.O_RDONLY), "rb") as f:
        data = f.read(MAX_DICTIONARY + 1)
    if not data or len(data) > MAX_DICTIONARY:
        raise OSError(errno.EINVAL, f"not a dictionary of 1 byte to {MAX_DICTIONARY >> 20} MiB")
    return data
