"""A device's backing device across live restarts, against an operator who moves it: the next
daemon reads the written-back pages from the file they were written to (its descriptor, kept
beside the device's pages: zramfs.sysfs.record's `backing`), never from whatever the `backing_dev`
path leads to by then. A fresh file of the same size there would read back as zeros.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import PAGE, Cleanup, requires_fuse, zramfs_daemon
from manager import Manager, stop
from test_restart_state import restart_gracefully, restart_killed
from test_tiering import bd_stat, text_pages

pytestmark = requires_fuse

MiB = 1 << 20


@pytest.mark.parametrize("restart", ["killed", "graceful"])
def test_a_backing_file_moved_and_replaced_keeps_its_pages(tmp_path: Path, cleanup: Cleanup,
                                                            restart: str) -> None:
    mgr = Manager(cleanup)
    path = tmp_path / "backing"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    data = text_pages(4096) + os.urandom(256 * PAGE)
    pages = len(data) // PAGE
    with zramfs_daemon(env=mgr.env(), tmp=tmp_path) as d:
        mgr.pump()
        name = d.hot_add()
        d.write(name, "backing_dev", str(path))
        d.write(name, "disksize", "32M")
        with open(d.dev(name), "r+b", buffering=0) as f:
            f.write(data)
        d.write(name, "writeback", "huge")
        d.write(name, "idle", "all")
        d.write(name, "writeback", "idle")
        assert bd_stat(d, name)[0] == pages
        mgr.pump()
        # The file moved away, a fresh one of its size made at its path.
        path.rename(tmp_path / "backing.moved")
        with open(path, "wb") as f:
            f.truncate(64 * MiB)
        (restart_killed if restart == "killed" else restart_gracefully)(d, mgr)
        fd = os.open(d.dev(name), os.O_RDONLY)
        try:
            got = [os.pread(fd, PAGE, off) for off in range(0, len(data), PAGE)]
        finally:
            os.close(fd)
        zeros = sum(p == bytes(PAGE) for p in got)
        wrong = sum(p != data[i * PAGE:(i + 1) * PAGE] for i, p in enumerate(got))
        assert wrong == 0, f"{wrong} of {pages} written-back pages read back wrong " \
                           f"({zeros} as zeros)"
        assert bd_stat(d, name)[0] == pages
        assert int(d.read(name, "io_stat").split()[0]) == 0
        assert f"backing_dev {path} now leads to another file" in d.log.read_text()
        # Written back again after the restart: to the kept file too, never the fresh one.
        d.write(name, "writeback", "idle")
        with open(d.dev(name), "r+b", buffering=0) as f:
            f.write(b"w" * PAGE)
        d.write(name, "idle", "all")
        d.write(name, "writeback", "idle")
        assert path.read_bytes().count(0) == 64 * MiB
        stop(d, mgr)
