"""The writeback backing store (zramfs.zram._backing): blocks, bitmap, I/O, bd_stat, and
writeback's batched writes through it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import Daemon, requires_fuse, run
from zramfs.sysfs.device_tiering import open_backing
from zramfs.zram._backing import BackingError

PAGE = 4096


def test_blocks_round_trip_and_bitmap(tmp_path: Path) -> None:
    path = tmp_path / "backing"
    path.write_bytes(bytes(130 * PAGE))            # over two bitmap words
    b = open_backing(str(path), None)
    try:
        assert b.nr_blocks == 130
        blocks = [b.alloc() for _ in range(130)]
        assert sorted(blocks) == list(range(130))
        assert b.alloc() is None                    # full
        pages = {blk: os.urandom(PAGE) for blk in (0, 63, 64, 129)}
        for blk, page in pages.items():
            b.write(blk, page)
        for blk, page in pages.items():
            assert b.read(blk) == page
        assert path.read_bytes()[129 * PAGE :] == pages[129]
        assert b.bd_stat() == (130, 4, 4)
        b.free_block(64)
        assert b.bd_stat()[0] == 129
        assert b.alloc() == 64                      # a freed block is found again
        with pytest.raises(ValueError):
            b.read(130)
    finally:
        b.close()


def test_bad_backing_devices(tmp_path: Path) -> None:
    with pytest.raises(BackingError) as e:
        open_backing(str(tmp_path / "missing"), None)
    assert e.value.errno == 2
    with pytest.raises(BackingError):
        open_backing(str(tmp_path), None)                      # a directory
    (tmp_path / "tiny").write_bytes(b"x" * 100)
    with pytest.raises(BackingError) as e:
        open_backing(str(tmp_path / "tiny"), None)
    assert e.value.errno == 28


def _fd_flags(pid: int, path: Path) -> int:
    """The open flags of `pid`'s descriptor of `path`."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("flags:"):
                    return int(line.split()[1], 8)
    raise AssertionError(f"{pid} has no descriptor of {path}")


@requires_fuse
@pytest.mark.parametrize("fs", ["disk", "ramfs"])
def test_writeback_batches_with_and_without_o_direct(daemon: Daemon, tmp_path: Path,
                                                     fs: str) -> None:
    """Writeback's batched writes land whole on a file that takes O_DIRECT (the test's
    directory, on a disk) and on one that does not (a ramfs of the test's own: tmpfs takes
    O_DIRECT since Linux 6.6), and every page reads back from there: batches of 100, the last
    one short."""
    where = tmp_path
    if fs == "ramfs":
        where = tmp_path / "ramfs"
        where.mkdir()
        run("mount", "-t", "ramfs", "zramfs-test-backing", str(where))
        # Lazily: the daemon may still hold the file if the test fails before its reset.
        daemon.cleanup.push(f"umount {where}", lambda: run("umount", "-l", str(where)))
    backing = where / "backing"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    name = daemon.hot_add()
    daemon.write(name, "backing_dev", str(backing))
    daemon.write(name, "disksize", "8M")
    daemon.write(name, "writeback_batch_size", "100")
    assert bool(_fd_flags(daemon.proc.pid, backing) & os.O_DIRECT) == (fs == "disk")
    pages = [os.urandom(PAGE) for _ in range(600)]                  # huge
    pages += [(b"%08d " % i) * (PAGE // 9) + bytes(PAGE % 9) for i in range(650)]
    data = b"".join(pages)
    with open(daemon.dev(name), "r+b", buffering=0) as f:
        f.write(data)
    daemon.write(name, "idle", "all")
    daemon.write(name, "writeback", "idle")
    assert [int(x) for x in daemon.read(name, "bd_stat").split()] == [1250, 0, 1250]
    on_file = backing.read_bytes()
    assert sorted(p for i in range(0, len(on_file), PAGE)
                  if (p := on_file[i:i + PAGE]) != bytes(PAGE)) == sorted(pages)
    with open(daemon.dev(name), "rb", buffering=0) as f:
        assert f.read(len(data)) == data
    assert int(daemon.read(name, "bd_stat").split()[1]) >= 1250      # read from the file
    daemon.write(name, "reset", "1")
