"""The writeback backing store (zramfs.zram._backing): blocks, bitmap, I/O, bd_stat."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from zramfs.sysfs.device import open_backing
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
