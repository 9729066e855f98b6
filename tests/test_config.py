"""Config parsing: expressions, defaults, drop-ins, and every error path."""
from __future__ import annotations

from pathlib import Path

import pytest

from zramfs.service.config import ConfigError, evaluate, load, parse_algorithm

MIB = 1 << 20


@pytest.mark.parametrize("expr,ram,value", [
    ("min(ram / 2, 4096)", 24000, 4096),
    ("min(ram / 2, 4096)", 2000, 1000),
    ("ram / 4", 1000, 250),
    ("1024", 8000, 1024),
    ("2 * (ram - 1000) / 4", 9000, 4000),
    ("max(512, ram / 8, 100)", 8192, 1024),
    ("-1 + 3", 0, 2),
    ("1.5 * 2", 0, 3),
])
def test_expressions(expr: str, ram: float, value: float) -> None:
    assert evaluate(expr, ram) == value


@pytest.mark.parametrize("expr", [
    "", "ram +", "2 ** 3", "__import__('os')", "ram / 0", "min(1,", "foo", "1 2", "(ram",
    "open('x')", "ram; 1",
])
def test_bad_expressions(expr: str) -> None:
    with pytest.raises(ValueError):
        evaluate(expr, 1000)


def test_algorithms() -> None:
    assert parse_algorithm("lz4") == [("lz4", {})]
    assert parse_algorithm(" zstd(level=7) ") == [("zstd", {"level": "7"})]
    assert parse_algorithm("lz4 zstd(level=19) lz4hc") == \
        [("lz4", {}), ("zstd", {"level": "19"}), ("lz4hc", {})]
    assert parse_algorithm("lz4 zstd(level=19, dict=/etc/pages.dict)") == \
        [("lz4", {}), ("zstd", {"level": "19", "dict": "/etc/pages.dict"})]
    assert parse_algorithm("lzo-rle deflate(level=9)") == \
        [("lzo-rle", {}), ("deflate", {"level": "9"})]
    for bad in ("842", "lzo-rl", "zstd(dict=x.dict)", "lz4(dict=/x)", "zstd(level=x)",
                "zstd(window=9)", "lz4 zstd (type=idle)", "", "lz4 zstd zstd lz4hc lz4"):
        with pytest.raises(ValueError):
            parse_algorithm(bad)


def write(tmp_path: Path, text: str, name: str = "zramfs.conf") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    [dev] = load(write(tmp_path, "[zram0]\n"), ram_mib=24000)
    assert (dev.name, dev.id, dev.disksize) == ("zram0", 0, 4096 * MIB)
    assert (dev.algorithm, dev.algorithm_params, dev.mem_limit) == ("lz4", {}, 0)
    assert (dev.fs_type, dev.mount_point, dev.options, dev.swap_priority) == \
        ("swap", None, "discard", 100)


def test_sizes_round_up_to_a_page_as_the_attributes_do(tmp_path: Path) -> None:
    """A size that is not whole pages goes up to the next page, as disksize_store and
    mem_limit_store's PAGE_ALIGN do, never down (0.001 MiB is a page, not nothing)."""
    [dev] = load(write(tmp_path, "[zram0]\nzram-size = 0.001\nzram-resident-limit = 1.0001\n"),
                 ram_mib=24000)
    assert (dev.disksize, dev.mem_limit) == (4096, MIB + 4096)


def test_all_keys_and_dropins(tmp_path: Path) -> None:
    path = write(tmp_path, """
# swap first
[zram0]
zram-size = ram / 4
zram-resident-limit = 256
compression-algorithm = zstd(level=5)
swap-priority = 50

[zram2]
zram-size = 512
fs-type = ext4
mount-point = /var/tmp/z
options = discard,noatime
""")
    (tmp_path / "zramfs.conf.d").mkdir()
    write(tmp_path, "[zram0]\nswap-priority = 60\n[zram1]\nzram-size = 0\n",
          "zramfs.conf.d/10-local.conf")
    devs = load(path, ram_mib=8000)
    assert [d.name for d in devs] == ["zram0", "zram2"]          # size 0: no device
    z0, z2 = devs
    assert (z0.disksize, z0.mem_limit, z0.algorithm, z0.algorithm_params, z0.swap_priority) == \
        (2000 * MIB, 256 * MIB, "zstd", {"level": "5"}, 60)
    assert (z2.fs_type, z2.mount_point, z2.options) == ("ext4", Path("/var/tmp/z"),
                                                        "discard,noatime")
    [z] = load(write(tmp_path, "[zram3]\nmount-point = /mnt/x\n", "b.conf"), ram_mib=8000)
    assert z.fs_type == "ext2"                          # zram-generator's default for mounts


@pytest.mark.parametrize("text,where,words", [
    ("[zram0]\nzram-size = ram ** 2\n", ":2", "zram-size"),
    ("[zram0]\nbogus = 1\n", ":2", "unknown key"),
    ("[swap]\n", ":1", "sections are [zramN]"),
    ("zram-size = 1\n", ":1", "outside a [zramN] section"),
    ("[zram0]\njust words\n", ":2", "expected key = value"),
    ("[zram0]\ncompression-algorithm = lzo1x\n", ":2", "unknown algorithm"),
    ("[zram0]\ncompression-algorithm = 842\n", ":2", "no maintained library"),
    ("[zram0]\nswap-priority = high\n", ":2", "swap-priority"),
    ("[zram0]\nfs-type = btrfs\nmount-point = /x\n", ":2", "fs-type"),
    ("[zram0]\nfs-type = ext4\n", ":2", "needs a mount-point"),
    ("[zram0]\nfs-type = swap\nmount-point = /x\n", ":3", "no mount point"),
    ("[zram0]\nmount-point = relative\n", ":2", "absolute"),
    ("[zram0]\nwriteback-device = sdb\n", ":2", "absolute"),
    ("[zram0]\nwriteback-interval = soon\n", ":2", "not a duration"),
    ("[zram0]\nwriteback-interval = 1h\n", ":2", "needs a writeback-device"),
    ("[zram0]\nzram-size = -5\n", ":2", "negative"),
    ("[zram0]\nmount-point = /x\n[zram1]\nmount-point = /x\n", "", "same mount-point"),
])
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, where: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(path, ram_mib=8000)
    message = str(e.value)
    assert message.startswith(f"{path}{where}"), message
    assert words in message, message


def test_tiering_keys(tmp_path: Path) -> None:
    [dev] = load(write(tmp_path, "[zram0]\ncompression-algorithm = lz4 zstd(level=9) lz4hc\n"
                       "writeback-device = /var/zram-backing\nwriteback-interval = 2h\n"
                       "writeback-idle-age = 30m\n"), ram_mib=1000)
    assert dev.algorithm == "lz4"
    assert dev.recompression == [("zstd", {"level": "9"}), ("lz4hc", {})]
    assert dev.writeback_device == Path("/var/zram-backing")
    assert (dev.writeback_interval, dev.writeback_idle_age) == (7200, 1800)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load(tmp_path / "nope.conf", ram_mib=1000)


@pytest.mark.parametrize("value, words", [
    ("zstd(level=99)", "zstd level must be -22..22, not 99"),
    ("lz4 lz4hc(level=13)", "lz4hc level must be 1..12, not 13"),
    ("zstd(level=x)", "level must be an integer"),
])
def test_levels_are_checked_by_the_compressors(tmp_path: Path, value: str, words: str) -> None:
    """A level the algorithm does not take stops loading, naming file, line and key, before
    anything is set up (not half-way through set-up)."""
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, f"[zram0]\ncompression-algorithm = {value}\n"), ram_mib=1024)
    assert ":2: [zram0] compression-algorithm:" in str(e.value) and words in str(e.value)


def test_zpool_key(tmp_path: Path) -> None:
    assert load(write(tmp_path, "[zram0]\n"), ram_mib=1024)[0].zpool == "zsmalloc"
    assert load(write(tmp_path, "[zram0]\nzpool = zbud\n"), ram_mib=1024)[0].zpool == "zbud"
    with pytest.raises(ConfigError, match=r":2: \[zram0\] zpool: 'z3fold' is not one of"):
        load(write(tmp_path, "[zram0]\nzpool = z3fold\n"), ram_mib=1024)


ZRAM_GENERATOR_CONF = """\
# A zram-generator.conf with every key zram-generator 1.2 documents.
[zram0]
host-memory-limit = none
zram-size = min(ram / 2, 4096)
zram-resident-limit = ram / 8
compression-algorithm = lz4 zstd(level=3) (type=idle)
writeback-device = /dev/disk/by-partlabel/zram-writeback
swap-priority = 100

[zram1]
host-memory-limit = 9048
zram-size = 512

[zram2]
zram-size = 1024
fs-type = ext4
mount-point = /var/tmp/zram
options = discard,noatime

[zram3]
memory-limit = none
zram-fraction = 0.25
max-zram-size = 2048
"""


def test_a_real_zram_generator_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every key, as zram-generator reads them: host-memory-limit leaves out a device on a
    bigger machine; the obsolete keys still work, each with a warning naming its successor;
    the trailing group is the recompression policy, run every hour unless said otherwise."""
    with caplog.at_level("WARNING", logger="zramfs.service.config"):
        devices = load(write(tmp_path, ZRAM_GENERATOR_CONF), ram_mib=16000)
    by_name = {d.name: d for d in devices}
    assert sorted(by_name) == ["zram0", "zram2", "zram3"]        # zram1: 16000 MB > 9048
    z0 = by_name["zram0"]
    assert (z0.disksize, z0.mem_limit) == (4096 * MIB, 2000 * MIB)
    assert (z0.algorithm, z0.recompression) == ("lz4", [("zstd", {"level": "3"})])
    assert (z0.recompress, z0.recompress_interval) == ("type=idle", 3600)
    assert z0.writeback_device == Path("/dev/disk/by-partlabel/zram-writeback")
    assert (by_name["zram2"].fs_type, by_name["zram2"].options) == ("ext4", "discard,noatime")
    assert by_name["zram3"].disksize == 2048 * MIB                # min(16000 * 0.25, 2048)
    said = caplog.text
    assert "memory-limit is obsolete: use host-memory-limit" in said
    assert "zram-fraction is obsolete: use zram-size" in said
    assert "max-zram-size is obsolete: use zram-size" in said


@pytest.mark.parametrize("text, words", [
    ("compression-algorithm = lz4 (type=idle)", "needs a recompression algorithm"),
    ("compression-algorithm = lz4 zstd (type=cold)", "type=cold"),
    ("recompress-interval = 1h", "needs a recompression policy"),
    ("host-memory-limit = lots", "is not a number of MB or none"),
    ("zram-fraction = -1", "is not a nonnegative number"),
])
def test_zram_generator_key_errors(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, f"[zram0]\n{text}\n"), ram_mib=1024)
    assert ":2: [zram0]" in str(e.value) and words in str(e.value)


def test_recompress_interval(tmp_path: Path) -> None:
    [dev] = load(write(tmp_path, "[zram0]\ncompression-algorithm = lz4 zstd (type=huge_idle)\n"
                                 "recompress-interval = 30m\n"), ram_mib=1024)
    assert (dev.recompress, dev.recompress_interval) == ("type=huge_idle", 1800)


def test_compression_dictionary_key(tmp_path: Path) -> None:
    [dev] = load(write(tmp_path, "[zram0]\ncompression-algorithm = zstd\n"
                                 "compression-dictionary = /etc/zramfs/pages.dict\n"), ram_mib=1024)
    assert dev.dictionary == Path("/etc/zramfs/pages.dict")
    with pytest.raises(ConfigError, match=r":3: \[zram0\] compression-dictionary: lz4 takes no"):
        load(write(tmp_path, "[zram0]\ncompression-algorithm = lz4\n"
                             "compression-dictionary = /x.dict\n"), ram_mib=1024)
    [dev] = load(write(tmp_path, "[zram0]\ncompression-algorithm = zstd(dict=/a.dict) "
                                 "zstd(level=19,dict=/b.dict)\n"), ram_mib=1024)
    assert dev.dictionary == Path("/a.dict") and dev.algorithm_params == {}
    assert dev.recompression == [("zstd", {"level": "19", "dict": "/b.dict"})]
    with pytest.raises(ConfigError, match="compression-algorithm already gives dict=/a.dict"):
        load(write(tmp_path, "[zram0]\ncompression-algorithm = zstd(dict=/a.dict)\n"
                             "compression-dictionary = /x.dict\n"), ram_mib=1024)


def test_dedup_key(tmp_path: Path) -> None:
    assert load(write(tmp_path, "[zram0]\n"), ram_mib=1024)[0].dedup is False
    for text, value in (("yes", True), ("no", False), ("True", True), ("off", False),
                        ("1", True)):
        [dev] = load(write(tmp_path, f"[zram0]\ndedup = {text}\n"), ram_mib=1024)
        assert dev.dedup is value, text
    with pytest.raises(ConfigError, match=r":3: \[zram0\] dedup: 'sometimes' is not yes or no"):
        load(write(tmp_path, "[zram0]\nzram-size = 64\ndedup = sometimes\n"), ram_mib=1024)
