"""The kernel's number parsers and zram's attribute parsers: values and errnos, as
lib/kstrtox.c, lib/cmdline.c and drivers/block/zram/zram_drv.c give them (pure logic, no mount)."""
from __future__ import annotations

import errno
import time
from collections.abc import Callable

import pytest

from zramfs.sysfs import kstrto
from zramfs.sysfs.kstrto import (DISKSIZE_MAX, MEM_LIMIT_MAX, U64_MAX, kstrtoint, kstrtoll,
                           kstrtou16, kstrtoul, kstrtoull, memparse, parse_device_id,
                           parse_disksize, parse_mem_limit, parse_mem_used_max, parse_reset,
                           parse_size, parse_writeback_limit, parse_writeback_limit_enable)

BIG = "9" * 5000


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(OSError) as e:
        fn()
    return e.value.errno


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("1", 1), ("1\n", 1), ("+5", 5), ("0x10", 16), ("0X1f", 31), ("010", 8),
    ("+0x10", 16), ("0", 0), ("00", 0), ("18446744073709551615", U64_MAX),
    ("0xffffffffffffffff", U64_MAX), ("0" * 5000 + "7", 7),
])
def test_kstrtoull_values(text: str, value: int) -> None:
    assert kstrtoull(text) == value


@pytest.mark.parametrize("text", [
    "", "\n", " 1", "1 ", "-1", "+", "++1", "+-1", "1\n\n", "0x", "0x\n", "0xg", "09", "1K",
    "4G", "16E", "1e23", "1.5", "1_000", "\u0661", "0b1",
])
def test_kstrtoull_einval(text: str) -> None:
    assert errno_of(lambda: kstrtoull(text)) == errno.EINVAL


@pytest.mark.parametrize("text", [
    "18446744073709551616", "99999999999999999999999", "0x10000000000000000",
    "99999999999999999999999x",   # the overflow is found before the trailing text
    BIG,
])
def test_kstrtoull_erange(text: str) -> None:
    assert errno_of(lambda: kstrtoull(text)) == errno.ERANGE


def test_kstrtoull_bases() -> None:
    assert kstrtoull("010", 10) == 10
    assert kstrtoull("0x10", 16) == kstrtoull("10", 16) == 16
    assert errno_of(lambda: kstrtoull("0x10", 10)) == errno.EINVAL
    assert errno_of(lambda: kstrtoull("0x", 16)) == errno.EINVAL
    assert errno_of(lambda: kstrtoull("8", 8)) == errno.EINVAL
    with pytest.raises(ValueError):
        kstrtoull("1", 1)


def test_nul_ends_the_text_as_in_c() -> None:
    assert kstrtoull("1\0junk") == 1
    assert memparse("2K\0junk") == 2048


def test_signed_types() -> None:
    """kstrtoll: one '-' or '+', then kstrtoull's rules; the range of a long long, and
    kstrtoint's of an int."""
    assert kstrtoll("-5") == -5 and kstrtoll("+5") == 5 and kstrtoll("-0") == 0
    assert kstrtoll("-9223372036854775808") == -2**63
    assert kstrtoll("9223372036854775807\n") == 2**63 - 1
    assert kstrtoll("-0x10") == -16 and kstrtoint("-010") == -8
    for text in ("9223372036854775808", "-9223372036854775809", "-" + BIG):
        assert errno_of(lambda: kstrtoll(text)) == errno.ERANGE, text
    for text in ("", "-", "--1", "-+1", "+-1", " -1", "-1 ", "\u0661", "1_0"):
        assert errno_of(lambda: kstrtoll(text)) == errno.EINVAL, text
    assert kstrtoint("2147483647") == 2**31 - 1 and kstrtoint("-2147483648") == -2**31
    assert errno_of(lambda: kstrtoint("2147483648")) == errno.ERANGE
    assert errno_of(lambda: kstrtoint("-2147483649")) == errno.ERANGE


def test_device_id_is_hot_removes_kstrtoint() -> None:
    """hot_remove_store: kstrtoint in base 10, a NUL ends the text (sysfs's buffer is a C
    string), a negative id is EINVAL."""
    assert parse_device_id("1") == parse_device_id("1\n") == parse_device_id("1\0") == 1
    assert parse_device_id("+1\0junk") == 1 and parse_device_id("010") == 10
    for text in ("", "\0", "\x001", "-1", " 1", "1 ", "zram1", "0x1", "\u0661"):
        assert errno_of(lambda: parse_device_id(text)) == errno.EINVAL, text
    assert errno_of(lambda: parse_device_id("2147483648")) == errno.ERANGE


def test_narrower_types() -> None:
    assert kstrtou16("65535") == 65535
    assert errno_of(lambda: kstrtou16("65536")) == errno.ERANGE
    assert kstrtoul(str(kstrto.ULONG_MAX)) == kstrto.ULONG_MAX


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("1", 1), ("1\n", 1), ("1 ", 1), ("0x10", 16), ("010", 8), ("1K", 1024),
    ("1k", 1024), ("4G", 4 << 30), ("4G\n", 4 << 30), ("0x10G", 16 << 30), ("010K", 8 << 10),
    ("15E", 15 << 60), ("1e23", 1 << 60), ("1K5", 1024), ("0x1e", 30), ("0x", 0), ("09", 0),
    ("18446744073709551615", U64_MAX),
])
def test_memparse_values(text: str, value: int) -> None:
    assert memparse(text) == value


@pytest.mark.parametrize("text", ["", "\n", " 1", "-1", "+5", "G", "x"])
def test_memparse_einval_where_nothing_parses(text: str) -> None:
    assert errno_of(lambda: memparse(text)) == errno.EINVAL


@pytest.mark.parametrize("text", [
    "16E", "16384P", "18446744073709551616", "99999999999999999999999", "18014398509481984K",
    BIG, BIG + "K",
])
def test_memparse_erange_where_c_wraps(text: str) -> None:
    assert errno_of(lambda: memparse(text)) == errno.ERANGE


def test_huge_inputs_are_refused_quickly() -> None:
    start = time.perf_counter()
    for text in (BIG, "9" * 200_000, "0x" + "f" * 200_000):
        assert errno_of(lambda: kstrtoull(text)) == errno.ERANGE
        assert errno_of(lambda: memparse(text)) == errno.ERANGE
    assert errno_of(lambda: parse_disksize(BIG)) == errno.ERANGE
    assert time.perf_counter() - start < 5       # a quadratic int() would take far longer


def test_parse_size_bound() -> None:
    assert parse_size("1G", maximum=1 << 30) == 1 << 30
    assert errno_of(lambda: parse_size("1G", maximum=(1 << 30) - 1)) == errno.ERANGE


@pytest.mark.parametrize("text, value", [
    ("1", 4096), ("1\n", 4096), ("4096", 4096), ("4097", 8192), ("1K", 4096), ("4G", 4 << 30),
    ("1e23", 1 << 60), ("1G trailing", 1 << 30), (str(DISKSIZE_MAX), DISKSIZE_MAX),
])
def test_disksize(text: str, value: int) -> None:
    assert parse_disksize(text) == value


@pytest.mark.parametrize("text, code", [
    ("0", errno.EINVAL), ("", errno.EINVAL), ("abc", errno.EINVAL), ("-1", errno.EINVAL),
    ("16E", errno.ERANGE), ("8E", errno.ERANGE), (str(DISKSIZE_MAX + 1), errno.ERANGE),
    ("99999999999999999999999", errno.ERANGE), ("18446744073709555712", errno.ERANGE),
    (BIG, errno.ERANGE),
])
def test_disksize_errors(text: str, code: int) -> None:
    assert errno_of(lambda: parse_disksize(text)) == code


def test_mem_limit() -> None:
    assert parse_mem_limit("0") == 0
    assert parse_mem_limit("1") == 4096
    assert parse_mem_limit("1G\n") == 1 << 30
    assert parse_mem_limit("15E") == 15 << 60
    assert parse_mem_limit(str(MEM_LIMIT_MAX)) == MEM_LIMIT_MAX
    # the kernel's PAGE_ALIGN wraps these to 0, no limit at all
    assert errno_of(lambda: parse_mem_limit(str(MEM_LIMIT_MAX + 1))) == errno.ERANGE
    assert errno_of(lambda: parse_mem_limit(str(U64_MAX))) == errno.ERANGE
    assert errno_of(lambda: parse_mem_limit("16E")) == errno.ERANGE
    assert errno_of(lambda: parse_mem_limit("none")) == errno.EINVAL


def test_writeback_limit_is_einval_for_every_failure() -> None:
    assert parse_writeback_limit("0") == 0
    assert parse_writeback_limit("+5\n") == 5
    assert parse_writeback_limit("010") == 10                  # base 10, not octal
    assert parse_writeback_limit(str(U64_MAX)) == U64_MAX
    for text in ("0x10", "1K", "", "-1", "18446744073709551616", BIG):
        assert errno_of(lambda: parse_writeback_limit(text)) == errno.EINVAL
    assert parse_writeback_limit_enable("1") is True
    assert parse_writeback_limit_enable("2\n") is True
    assert parse_writeback_limit_enable("0") is False
    assert errno_of(lambda: parse_writeback_limit_enable("yes")) == errno.EINVAL


def test_reset_passes_kstrtou16_errno_on() -> None:
    parse_reset("1")
    parse_reset("1\n")
    parse_reset("65535")
    assert errno_of(lambda: parse_reset("0")) == errno.EINVAL
    assert errno_of(lambda: parse_reset("x")) == errno.EINVAL
    assert errno_of(lambda: parse_reset("65536")) == errno.ERANGE
    assert errno_of(lambda: parse_reset(BIG)) == errno.ERANGE


def test_mem_used_max_takes_only_zero() -> None:
    parse_mem_used_max("0")
    parse_mem_used_max("0\n")
    for text in ("1", "", "x", "18446744073709551616", BIG):
        assert errno_of(lambda: parse_mem_used_max(text)) == errno.EINVAL


@pytest.mark.parametrize("bad", ["1_0", "\u0663", "\uff13"])
def test_the_numbers_of_key_value_attributes_are_kstrtos(bad: str) -> None:
    """writeback, idle, recompress, recomp_algorithm and the config's levels read their
    numbers with kstrto, as the kernel's stores do: int() would take '1_0' as 10 and
    non-ASCII digits as ASCII ones."""
    from zramfs.service import config
    from zramfs.sysfs import tiering_args as tiering
    for parse, text in ((tiering.parse_writeback, f"page_index={bad}"),
                        (tiering.parse_writeback, f"page_indexes=0-{bad}"),
                        (tiering.parse_idle, bad),
                        (tiering.parse_recompress, f"type=idle max_pages={bad}"),
                        (tiering.parse_recomp_algorithm, f"algo=zstd level={bad}"),
                        (tiering.parse_recomp_algorithm, f"algo=zstd priority={bad}")):
        with pytest.raises(ValueError):
            parse(text)
    with pytest.raises(ValueError, match="level must be an integer"):
        config.parse_algorithm(f"zstd(level={bad})")
    assert tiering.parse_recomp_algorithm("algo=zstd level=-3")[2] == -3
    assert tiering.parse_writeback("page_indexes=+1-2").ranges == [(1, 2)]
