"""Every attribute of the tree against a real mount: happy paths, formats, the kernel's errnos."""
from __future__ import annotations

import errno
import mmap
import os
import stat
from pathlib import Path

import pytest

from conftest import PAGE, PUNCH_HOLE, Daemon, fallocate

ATTRS = sorted(["algorithm_params", "comp_algorithm", "compact", "debug_stat", "disksize",
                "initstate", "io_stat", "max_comp_streams", "mem_limit", "mem_used_max",
                "mm_stat", "reset", "stat", "backing_dev", "idle", "writeback",
                "writeback_limit", "writeback_limit_enable", "bd_stat", "recomp_algorithm",
                "recompress", "writeback_evict", "evict_stat", "zpool",
                "compressed_writeback", "writeback_batch_size", "dedup", "dedup_stat"])
WRITE_ONLY = {"algorithm_params", "compact", "mem_limit", "mem_used_max", "reset", "idle",
              "writeback", "recompress"}


def errno_of(fn) -> int:
    with pytest.raises(OSError) as e:
        fn()
    return e.value.errno


def test_tree_mirrors_dev_and_sys(daemon: Daemon) -> None:
    assert sorted(os.listdir(daemon.mnt)) == ["dev", "sys"]
    assert os.listdir(daemon.mnt / "dev") == []
    assert sorted(os.listdir(daemon.mnt / "sys/class/zram-control")) == ["hot_add", "hot_remove"]
    name = daemon.hot_add()
    assert name == "zram0"
    assert os.listdir(daemon.mnt / "dev") == ["zram0"]
    assert sorted(os.listdir(daemon.mnt / "sys/block/zram0")) == ATTRS
    for attr in ATTRS:
        mode = os.stat(daemon.sys(name, attr)).st_mode
        assert stat.S_ISREG(mode)
        assert bool(mode & 0o444) == (attr not in WRITE_ONLY), attr
    st = os.stat(daemon.dev(name))
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0          # 0 before init


def test_hot_add_lowest_free_id_and_hot_remove(daemon: Daemon) -> None:
    assert [daemon.hot_add() for _ in range(3)] == ["zram0", "zram1", "zram2"]
    daemon.hot_remove("zram1")
    assert not daemon.dev("zram1").exists() and not daemon.sys("zram1", "disksize").exists()
    assert daemon.hot_add() == "zram1"                           # the kernel's idr: lowest free
    assert errno_of(lambda: daemon.hot_remove("zram7")) == errno.ENODEV
    assert errno_of(lambda: daemon.hot_remove("x")) == errno.EINVAL
    fd = os.open(daemon.dev("zram2"), os.O_RDONLY)
    try:
        assert errno_of(lambda: daemon.hot_remove("zram2")) == errno.EBUSY
    finally:
        os.close(fd)
    daemon.hot_remove("zram2")
    assert sorted(os.listdir(daemon.mnt / "dev")) == ["zram0", "zram1"]


def test_hot_remove_reads_the_id_as_a_c_string_and_leaves_no_ghost(daemon: Daemon) -> None:
    """sysfs hands a store a NUL-terminated buffer, so the kernel's hot_remove reads "1\\0" as
    "1" and removes zram1. Here too, wholly: the device and every node of it go, and the id
    is free again for a hot_add that works (it once left the directories of a device
    already gone, and a disksize there made every later hot_add fail)."""
    def write(text: bytes) -> None:
        fd = os.open(daemon.mnt / "sys/class/zram-control/hot_remove", os.O_WRONLY)
        try:
            assert os.write(fd, text) == len(text)
        finally:
            os.close(fd)

    def nodes(name: str) -> list[Path]:
        return [p for p in (daemon.dev(name), daemon.mnt / "sys/block" / name,
                            daemon.mnt / "sys/kernel/debug/zram" / name) if p.exists()]

    assert [daemon.hot_add() for _ in range(3)] == ["zram0", "zram1", "zram2"]
    daemon.write("zram1", "disksize", "16M")
    for text, name in ((b"1\0", "zram1"), (b"2\0junk", "zram2")):
        write(text)
        assert nodes(name) == [], name
        assert errno_of(lambda: daemon.write(name, "disksize", "16M")) == errno.ENOENT
    assert errno_of(lambda: write(b"\0")) == errno.EINVAL
    assert errno_of(lambda: write(b"\x001")) == errno.EINVAL
    assert nodes("zram0") and sorted(os.listdir(daemon.mnt / "dev")) == ["zram0"]
    assert daemon.hot_add() == "zram1"
    daemon.write("zram1", "disksize", "16M")
    data = os.urandom(PAGE // 2) * 2
    fd = os.open(daemon.dev("zram1"), os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        assert os.pread(fd, PAGE, 0) == data
    finally:
        os.close(fd)
    assert daemon.hot_add() == "zram2"


def test_disksize(daemon: Daemon) -> None:
    name = daemon.hot_add()
    assert daemon.read(name, "disksize") == "0\n"
    assert daemon.read(name, "initstate") == "0\n"
    for bad in ("0", "abc", "-5"):
        assert errno_of(lambda: daemon.write(name, "disksize", bad)) == errno.EINVAL, bad
    daemon.write(name, "disksize", "10000\n")                     # rounded up to pages
    assert daemon.read(name, "disksize") == f"{3 * PAGE}\n"
    assert daemon.read(name, "initstate") == "1\n"
    assert os.stat(daemon.dev(name)).st_size == 3 * PAGE
    assert errno_of(lambda: daemon.write(name, "disksize", "1G")) == errno.EBUSY
    other = daemon.hot_add()
    for text, size in (("64K", 64 << 10), ("2m", 2 << 20), ("1G", 1 << 30), ("0x10000", 65536)):
        daemon.write(other, "disksize", text)
        assert int(daemon.read(other, "disksize")) == size, text
        daemon.write(other, "reset", "1")


def test_comp_algorithm_and_params(daemon: Daemon) -> None:
    name = daemon.hot_add()
    assert daemon.read(name, "comp_algorithm") == "lzo-rle lzo [lz4] lz4hc zstd deflate \n"
    daemon.write(name, "comp_algorithm", "zstd\n")
    assert daemon.read(name, "comp_algorithm") == "lzo-rle lzo lz4 lz4hc [zstd] deflate \n"
    assert errno_of(lambda: daemon.write(name, "comp_algorithm", "842")) == errno.EINVAL
    for bad in ("level=99", "level=x", "algo=lz4 level=3", "priority=1 level=3",
                "level=1_0", "level=\u0663", "priority=0_0 level=3"):   # kstrtoint's, not int()
        assert errno_of(lambda: daemon.write(name, "algorithm_params", bad)) == errno.EINVAL, bad
    daemon.write(name, "algorithm_params", "algo=zstd level=9")
    assert errno_of(lambda: daemon.read(name, "algorithm_params")) == errno.EACCES
    daemon.write(name, "disksize", "16M")
    assert errno_of(lambda: daemon.write(name, "comp_algorithm", "lz4")) == errno.EBUSY
    assert errno_of(lambda: daemon.write(name, "algorithm_params", "level=3")) == errno.EBUSY
    # zstd level 9 really is in use: it packs text tighter than lz4 would.
    with open(daemon.dev(name), "r+b") as f:
        f.write(b"".join(b"zram line %d of some text\n" % i for i in range(40000))[: 1 << 20])
    _, compr, *_ = daemon.mm_stat(name)
    assert 0 < compr < (1 << 20) // 4
    daemon.write(name, "reset", "1")                              # reset: back to the default
    assert daemon.read(name, "comp_algorithm") == "lzo-rle lzo [lz4] lz4hc zstd deflate \n"


def test_reset(daemon: Daemon) -> None:
    name = daemon.device("16M")
    with open(daemon.dev(name), "r+b") as f:
        f.write(os.urandom(PAGE) * 64)
    assert daemon.mm_stat(name)[0] == 64 * PAGE
    for bad in ("0", "x"):
        assert errno_of(lambda: daemon.write(name, "reset", bad)) == errno.EINVAL, bad
    fd = os.open(daemon.dev(name), os.O_RDONLY)
    try:
        assert errno_of(lambda: daemon.write(name, "reset", "1")) == errno.EBUSY
    finally:
        os.close(fd)
    assert daemon.read(name, "initstate") == "1\n"                # EBUSY lost nothing
    daemon.write(name, "reset", "1")
    assert daemon.read(name, "initstate") == "0\n"
    assert daemon.read(name, "disksize") == "0\n"
    assert daemon.mm_stat(name) == [0] * 9
    assert os.stat(daemon.dev(name)).st_size == 0
    with open(daemon.dev(name), "r+b", buffering=0) as f:    # uninitialised: size 0, as
        assert os.pread(f.fileno(), 10, 0) == b""                  # the kernel's: EOF, and
        assert errno_of(lambda: os.pwrite(f.fileno(), b"x", 0)) == errno.ENOSPC   # no room


def test_mm_stat_io_stat_debug_stat_stat(daemon: Daemon) -> None:
    name = daemon.device("16M")
    assert daemon.read(name, "mm_stat") == " ".join(["       0"] * 9) + "\n"
    assert daemon.read(name, "io_stat") == " ".join(["       0"] * 4) + "\n"
    assert daemon.read(name, "debug_stat") == "version: 1\n0        0\n"
    fields = daemon.read(name, "stat").split()
    assert len(fields) == 17 and set(fields) == {"0"}
    fd = os.open(daemon.dev(name), os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4 * PAGE)
        buf[:] = b"\x07" * PAGE + os.urandom(PAGE) + b"text " * 819 + b"x" + bytes(PAGE)
        assert os.pwritev(fd, [buf], 0) == 4 * PAGE
        assert os.preadv(fd, [buf], 0) == 4 * PAGE
    finally:
        os.close(fd)
    orig, compr, used, limit, used_max, same, compacted, huge, huge_since = daemon.mm_stat(name)
    assert orig == 4 * PAGE and same == 2 and huge == 1 and huge_since == 1
    assert PAGE < compr < 2 * PAGE and used >= PAGE and used_max >= used and limit == 0
    fields = daemon.mm_stat(name)
    assert daemon.read(name, "mm_stat") == " ".join(f"{v:8}" for v in fields) + "\n"
    st = [int(x) for x in daemon.read(name, "stat").split()]
    assert st[0] >= 1 and st[2] == 4 * PAGE // 512          # read I/Os, sectors
    assert st[4] >= 1 and st[6] == 4 * PAGE // 512          # write I/Os, sectors


def test_mem_limit_and_mem_used_max(daemon: Daemon) -> None:
    name = daemon.device("64M")
    assert errno_of(lambda: daemon.read(name, "mem_limit")) == errno.EACCES
    assert errno_of(lambda: daemon.write(name, "mem_limit", "lots")) == errno.EINVAL
    daemon.write(name, "mem_limit", "1M")
    assert daemon.mm_stat(name)[3] == 1 << 20
    fd = os.open(daemon.dev(name), os.O_WRONLY)
    try:
        err = errno_of(lambda: [os.pwrite(fd, os.urandom(PAGE), i * PAGE) for i in range(1024)])
        assert err == errno.EIO
    finally:
        os.close(fd)
    orig, compr, used, limit, used_max, *_ = daemon.mm_stat(name)
    assert used <= limit == 1 << 20 and orig >= (1 << 20) - 16 * PAGE
    assert int(daemon.read(name, "io_stat").split()[1]) >= 1       # failed_writes
    daemon.write(name, "mem_limit", "0")                           # lifted
    with open(daemon.dev(name), "r+b") as f:
        f.seek(2 << 20)
        f.write(os.urandom(PAGE) * 16)
    assert errno_of(lambda: daemon.write(name, "mem_used_max", "5")) == errno.EINVAL
    fallocate(daemon.dev(name), PUNCH_HOLE, 0, 64 << 20)
    before = daemon.mm_stat(name)
    assert before[4] > before[2]
    daemon.write(name, "mem_used_max", "0")
    after = daemon.mm_stat(name)
    assert after[4] == after[2]


def test_compact(daemon: Daemon) -> None:
    name = daemon.hot_add()
    assert errno_of(lambda: daemon.write(name, "compact", "1")) == errno.EINVAL   # not init
    daemon.write(name, "disksize", "64M")
    with open(daemon.dev(name), "r+b") as f:
        for i in range(8192):
            f.write((b"%06d" % i) * 200 + os.urandom(600) + bytes(PAGE - 1800))
    for i in range(0, 8192, 4):                         # free 3 of every 4 pages
        fallocate(daemon.dev(name), PUNCH_HOLE, i * PAGE, 3 * PAGE)
    used = daemon.mm_stat(name)[2]
    daemon.write(name, "compact", "1")
    orig, compr, used_after, _, _, _, compacted, *_ = daemon.mm_stat(name)
    assert compacted > 0 and used_after < used
    assert used_after <= used - compacted * PAGE + PAGE


def test_write_only_and_read_only_attributes(daemon: Daemon) -> None:
    name = daemon.hot_add()
    for attr in WRITE_ONLY:
        assert errno_of(lambda: daemon.read(name, attr)) == errno.EACCES, attr
    for attr in ("initstate", "mm_stat", "io_stat", "debug_stat", "stat", "bd_stat", "evict_stat"):
        assert errno_of(lambda: daemon.write(name, attr, "1")) == errno.EACCES, attr
    assert errno_of(lambda: (daemon.mnt / "sys/class/zram-control/hot_remove").read_text()) \
        == errno.EACCES
    assert errno_of(lambda: os.open(daemon.mnt / "nope", os.O_RDONLY)) == errno.ENOENT


def test_zpool_selects_the_allocator_before_disksize(daemon: Daemon) -> None:
    """zsmalloc by default; zbud when written before disksize, and then the device really runs
    on it (no size classes in its debugfs table); EBUSY after init, EINVAL for a name no
    backend has, and reset brings the default back."""
    name = daemon.hot_add()
    assert daemon.read(name, "zpool") == "[zsmalloc] zbud \n"
    assert errno_of(lambda: daemon.write(name, "zpool", "z3fold")) == errno.EINVAL
    daemon.write(name, "zpool", "zbud")
    assert daemon.read(name, "zpool") == "zsmalloc [zbud] \n"
    daemon.write(name, "disksize", "16M")
    assert errno_of(lambda: daemon.write(name, "zpool", "zsmalloc")) == errno.EBUSY
    data = os.urandom(PAGE // 2) * 2 * 64
    with open(daemon.dev(name), "r+b", buffering=0) as f:
        f.write(data)
        f.seek(0)
        assert f.read(len(data)) == data
    classes = (daemon.mnt / "sys/kernel/debug/zsmalloc" / name / "classes").read_text()
    assert classes.splitlines()[1].startswith(" Total")       # zbud has no size classes
    assert daemon.mm_stat(name)[2] > 0
    daemon.write(name, "reset", "1")
    assert daemon.read(name, "zpool") == "[zsmalloc] zbud \n"


def test_algorithm_params_dict_and_negative_levels(daemon: Daemon, tmp_path) -> None:
    """`algorithm_params dict=PATH` (before disksize, as the kernel's): zstd compresses with a
    dictionary trained on similar pages, which holds the same data in less memory, and reads
    it back; lz4 takes none (EINVAL); a missing file is ENOENT, one inside the tree EINVAL, and
    after disksize it is EBUSY. Negative zstd levels are taken."""
    import zstandard

    import corpus
    data = corpus.build(4 << 20)
    pages = [data[i:i + PAGE] for i in range(0, len(data), PAGE)]
    dictionary = tmp_path / "pages.dict"
    dictionary.write_bytes(zstandard.train_dictionary(64 << 10, pages[::4]).as_bytes())
    used = {}
    for with_dict in (False, True):
        name = daemon.hot_add()
        daemon.write(name, "comp_algorithm", "zstd")
        if with_dict:
            daemon.write(name, "algorithm_params", f"level=3 dict={dictionary}")
        daemon.write(name, "disksize", "8M")
        with open(daemon.dev(name), "r+b", buffering=0) as f:
            f.write(data)
            f.seek(0)
            assert f.read(len(data)) == data
        used[with_dict] = daemon.mm_stat(name)[1]
        assert errno_of(lambda: daemon.write(name, "algorithm_params", f"dict={dictionary}")) \
            == errno.EBUSY
    assert used[True] < used[False], used               # the dictionary is really used
    name = daemon.hot_add()
    assert errno_of(lambda: daemon.write(name, "algorithm_params", f"dict={dictionary}")) \
        == errno.EINVAL                                               # lz4: no dictionary
    daemon.write(name, "comp_algorithm", "zstd")
    assert errno_of(lambda: daemon.write(name, "algorithm_params",
                                         f"dict={tmp_path / 'none'}")) == errno.ENOENT
    assert errno_of(lambda: daemon.write(name, "algorithm_params",
                                         f"dict={daemon.sys(name, 'mm_stat')}")) == errno.EINVAL
    daemon.write(name, "algorithm_params", "level=-5")
    daemon.write(name, "disksize", "4M")
    with open(daemon.dev(name), "r+b", buffering=0) as f:
        f.write(data[:4 << 20])
        f.seek(0)
        assert f.read(4 << 20) == data[:4 << 20]
