"""The kernel's number parsers, as zram's sysfs attributes use them, with the kernel's errnos.

Two parsers read every number zram takes:

- `kstrtoull` (lib/kstrtox.c) is strict: an optional '+', digits, at most one newline, nothing
  else. Bad text is EINVAL, a value past 2**64 - 1 is ERANGE. Its siblings narrow it
  (`kstrtoul`, `kstrtou16`) or take a '-' (`kstrtoll`, `kstrtoint`).
- `memparse` (lib/cmdline.c) is lax: simple_strtoull, then one K/M/G/T/P/E suffix; whatever
  follows is ignored. In C it never fails: no digits gives 0, and a value past 64 bits wraps.

The attribute parsers at the bottom (`parse_disksize`, `parse_mem_limit`, ...) are the
kernel's store functions up to the point where they touch the device: which parser, which
base, which bound, and which errno the store hands back (some stores replace the parser's
errno with EINVAL; reset passes it on). Where the kernel wraps silently, we refuse with ERANGE
instead; the docstrings say where.

    kstrtoull("0x10\\n")                     # 16
    parse_disksize("1G")                    # 1073741824
    parse_disksize("16E")                   # OSError(ERANGE), where the kernel wraps to 0

All of it is pure Python and runs on the trio thread. The text is never handed to int()
unchecked: int() accepts '_', spaces and non-ASCII digits, and above 4300 digits it raises
ValueError (and is quadratic below); a digit run is cut to its significant digits and
measured first, so a 5,000-digit write is refused in linear time.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import re

from zramfs.zpool._pages import PAGE_SHIFT        # common.h's, the one page size

PAGE_SIZE = 1 << PAGE_SHIFT

U16_MAX = 2**16 - 1                  # reset_store's kstrtou16
U64_MAX = 2**64 - 1                  # u64: kstrtoull, memparse, disksize, bd_wb_limit
LLONG_MAX = 2**63 - 1                # kstrtoll
INT_MAX = 2**31 - 1                  # kstrtoint; a device id (gendisk's first_minor)
ULONG_MAX = 2 ** (8 * ctypes.sizeof(ctypes.c_ulong)) - 1   # kstrtoul; limit_pages
LOFF_MAX = 2**63 - 1                 # loff_t: a block device's (and a FUSE file's) size

# disksize: the largest page-aligned size a block device can have. Its size is a loff_t (the
# FUSE file's st_size an off_t), so a u64 disksize above 2**63 - 1 could never be shown as
# one. Anything smaller but beyond memory is the allocator's ENOMEM, as in the kernel.
DISKSIZE_MAX = LOFF_MAX & ~(PAGE_SIZE - 1)

# mem_limit: the kernel keeps PAGE_ALIGN(limit) >> PAGE_SHIFT in an unsigned long. A limit
# above 2**64 - PAGE_SIZE rounds up past 64 bits, wraps to 0 and silently means "no limit";
# here it is ERANGE. (On a 32-bit long the page count is the tighter bound.)
MEM_LIMIT_MAX = min(U64_MAX & ~(PAGE_SIZE - 1), ULONG_MAX << PAGE_SHIFT)

# writeback_limit: bd_wb_limit is a u64 count of 4K units; kstrtoull's own range.
WRITEBACK_LIMIT_MAX = U64_MAX

_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_HEX = "0123456789abcdefABCDEF"


def fail(code: int, message: str) -> OSError:
    """The error a store or show gives back: the kernel's errno, and why."""
    return OSError(code, message)


@functools.cache
def _digits(base: int) -> re.Pattern[str]:
    """A run of ASCII digits valid in `base`, letters in either case, as _parse_integer reads
    them ('0'-'9', then 'a'-'f' by `c | 0x20`). Never \\d, which matches non-ASCII digits."""
    chars = "0123456789abcdef"[:base]
    return re.compile(f"[{chars}{chars[10:].upper()}]*")


@functools.cache
def _max_digits(base: int) -> int:
    """How many significant digits U64_MAX has in `base`: more than that cannot fit."""
    n, count = U64_MAX, 0
    while n:
        n //= base
        count += 1
    return count


def c_string(text: str) -> str:
    """What a sysfs store sees of a write: kernfs ends the buffer with a NUL and the stores
    read it as a C string, so a NUL in the written bytes ends the text there ("1\\0" is
    "1"). The tree applies it to every attribute write; each parser here applies it too."""
    return text.partition("\0")[0]


def _fixup_radix(s: str, base: int) -> tuple[int, int]:
    """_parse_integer_fixup_radix: base 0 means "0x" + a hex digit is hex, a leading "0" is
    octal, else decimal; in base 16 a "0x" is skipped (even with no digit after it).
    Returns (base, where the digits start)."""
    if base == 0:
        if s[:1] == "0":
            base = 16 if s[1:2] in ("x", "X") and s[2:3] != "" and s[2] in _HEX else 8
        else:
            base = 10
    start = 2 if base == 16 and s[:1] == "0" and s[1:2] in ("x", "X") else 0
    return base, start


def _parse_integer(s: str, pos: int, base: int) -> tuple[int | None, int]:
    """_parse_integer: the digit run at `pos`. Returns (value, end), value None where it does
    not fit in 64 bits (the kernel's KSTRTOX_OVERFLOW), end == pos where there are no digits.
    Leading zeros never overflow, so they are dropped before the length is measured."""
    end = _digits(base).match(s, pos).end()
    significant = s[pos:end].lstrip("0")
    if len(significant) > _max_digits(base):
        return None, end
    value = int(significant, base) if significant else 0
    return (value if value <= U64_MAX else None), end


def _check_base(base: int) -> None:
    if base != 0 and not 2 <= base <= 16:
        raise ValueError(f"base must be 0 or 2..16, not {base}")


def kstrtoull(text: str, base: int = 0) -> int:
    """The kernel's kstrtoull: one '+' may lead, never '-'; base 0 takes 0x/0 prefixes (after
    the '+'); at most one newline may follow the digits, and nothing else, not even a space.

    ERANGE past 2**64 - 1 (checked before the trailing text, as the kernel does, so
    "99999999999999999999999x" is ERANGE); EINVAL for no digits ('', '-1', ' 1') or text after
    them ('1 ', '1\\n\\n', '0x' in base 0: the '0' is octal, then 'x' is left over).
    """
    s = c_string(text)
    return _kstrtoull(s, 1 if s[:1] == "+" else 0, base, text)


def _kstrtoull(s: str, pos: int, base: int, text: str) -> int:
    """_kstrtoull: the digits of C string `s` from `pos` (no sign), the optional newline, and
    nothing after; `text` is what the error names."""
    _check_base(base)
    base, skip = _fixup_radix(s[pos:pos + 3], base)
    value, end = _parse_integer(s, pos + skip, base)
    if value is None:
        raise fail(errno.ERANGE, f"{text[:40]!r}: larger than {U64_MAX}")
    if end == pos + skip:
        raise fail(errno.EINVAL, f"{text[:40]!r} is not a number")
    if s[end:end + 1] == "\n":
        end += 1
    if end != len(s):
        raise fail(errno.EINVAL, f"{text[:40]!r}: text after the number")
    return value


def kstrtoll(text: str, base: int = 0) -> int:
    """The kernel's kstrtoll: a '-' or a '+' may lead (not both), then kstrtoull's rules;
    ERANGE outside -2**63 .. 2**63 - 1."""
    s = c_string(text)
    if s[:1] == "-":
        value = -_kstrtoull(s, 1, base, text)
    else:
        value = _kstrtoull(s, 1 if s[:1] == "+" else 0, base, text)
    if not -LLONG_MAX - 1 <= value <= LLONG_MAX:
        raise fail(errno.ERANGE, f"{text[:40]!r}: outside {-LLONG_MAX - 1}..{LLONG_MAX}")
    return value


def kstrtoint(text: str, base: int = 0) -> int:
    """The kernel's kstrtoint: kstrtoll, then ERANGE outside an int's range."""
    value = kstrtoll(text, base)
    if not -INT_MAX - 1 <= value <= INT_MAX:
        raise fail(errno.ERANGE, f"{text[:40]!r}: outside {-INT_MAX - 1}..{INT_MAX}")
    return value


def kstrtoul(text: str, base: int = 0) -> int:
    """The kernel's kstrtoul: kstrtoull, then ERANGE above ULONG_MAX."""
    return _narrow(kstrtoull(text, base), ULONG_MAX, text)


def kstrtou16(text: str, base: int = 0) -> int:
    """The kernel's kstrtou16: kstrtoull, then ERANGE above 65535."""
    return _narrow(kstrtoull(text, base), U16_MAX, text)


def _narrow(value: int, maximum: int, text: str) -> int:
    if value > maximum:
        raise fail(errno.ERANGE, f"{text[:40]!r}: larger than {maximum}")
    return value


def memparse(text: str) -> int:
    """The kernel's memparse as zram's stores use it: simple_strtoull in base 0 (no sign, no
    leading space, 0x/0 prefixes), then one K/M/G/T/P/E suffix in either case. What follows
    is ignored, as both disksize_store and mem_limit_store ignore it: "1e23" is 1 << 60 (the
    'e' is the exa suffix, "23" is dropped), "1K5" is 1024.

    Where the C version returns 0 with nothing parsed, this raises EINVAL (" 1G", "-1", "G");
    "0" and "0x" (the '0', in octal) parse, to 0.

    Where the C version wraps modulo 2**64 (the digits, then the shifts), this raises ERANGE:
    "16E" is 2**64, which the kernel's disksize reads as 0 (EINVAL), and 2**64 + 4096 it reads
    as 4096 and accepts. ERANGE is what kstrtoull says for the same digits, and it tells the
    user what is wrong: the text is a well-formed number, just too large.
    """
    s = c_string(text)
    base, skip = _fixup_radix(s[:3], 0)
    value, end = _parse_integer(s, skip, base)
    if end == skip:
        raise fail(errno.EINVAL, f"{text[:40]!r} is not a size")
    shift = _SHIFT.get(s[end:end + 1].lower(), 0)
    if value is None or value << shift > U64_MAX:
        raise fail(errno.ERANGE, f"{text[:40]!r}: larger than {U64_MAX} bytes")
    return value << shift


def page_align(size: int) -> int:
    """PAGE_ALIGN: up to a whole page."""
    return (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def parse_size(text: str, *, maximum: int) -> int:
    """memparse, then ERANGE above `maximum` (an attribute's bound, in bytes)."""
    size = memparse(text)
    if size > maximum:
        raise fail(errno.ERANGE, f"{text[:40]!r}: larger than {maximum} bytes")
    return size


# --- the attributes' parsers: the kernel's store functions, up to the device ---------------------


def parse_disksize(text: str) -> int:
    """disksize_store: memparse; 0 (or no number) is EINVAL; then PAGE_ALIGN. Returns the
    page-aligned size in bytes.

    ERANGE above DISKSIZE_MAX. The kernel has no such check: a wrapped value is 0 (EINVAL), a
    small wrong size (accepted), or too big for the slot table's vzalloc, which refuses
    anything above total RAM (ENOMEM). We never wrap; a size that fits but cannot be allocated
    is still ENOMEM, from the device's allocation.
    """
    size = parse_size(text, maximum=DISKSIZE_MAX)
    if size == 0:
        raise fail(errno.EINVAL, "disksize must be larger than 0")
    return page_align(size)


def parse_mem_limit(text: str) -> int:
    """mem_limit_store: memparse; EINVAL where no number was parsed; 0 means no limit. Returns
    the limit rounded up to whole pages, in bytes (the kernel keeps the page count).

    ERANGE above MEM_LIMIT_MAX, where the kernel's PAGE_ALIGN wraps to 0 and the limit
    silently becomes "none"; whoever wrote a number asked for a limit, so refuse instead.
    """
    return page_align(parse_size(text, maximum=MEM_LIMIT_MAX))


def parse_writeback_limit(text: str) -> int:
    """writeback_limit_store: kstrtoull in base 10, in 4K units. Any failure is EINVAL, the
    overflow included: the kernel returns EINVAL, not kstrtoull's ERANGE."""
    try:
        return kstrtoull(text, 10)
    except OSError as e:
        raise fail(errno.EINVAL, e.strerror) from None


def parse_writeback_limit_enable(text: str) -> bool:
    """writeback_limit_enable_store: as writeback_limit (base 10, any failure EINVAL); any
    non-zero value enables."""
    return parse_writeback_limit(text) != 0


def parse_reset(text: str) -> None:
    """reset_store: kstrtou16 in base 10, its errno passed on (EINVAL, or ERANGE above
    65535); 0 is EINVAL. Returns when the text asks for a reset."""
    if kstrtou16(text, 10) == 0:
        raise fail(errno.EINVAL, "reset takes a non-zero number")


def parse_device_id(text: str) -> int:
    """hot_remove_store: kstrtoint in base 10, its errno passed on (ERANGE past INT_MAX); a
    negative id is EINVAL. The one reading of an id written to the tree (the tree itself
    parses none: it follows the devices)."""
    dev_id = kstrtoint(text, 10)
    if dev_id < 0:
        raise fail(errno.EINVAL, f"{text[:40]!r}: a device id is not negative")
    return dev_id


def parse_mem_used_max(text: str) -> None:
    """mem_used_max_store: kstrtoul in base 10; anything but 0 (a failure included) is
    EINVAL. Returns when the text is the 0 that resets the peak."""
    try:
        value = kstrtoul(text, 10)
    except OSError as e:
        raise fail(errno.EINVAL, e.strerror) from None
    if value != 0:
        raise fail(errno.EINVAL, "mem_used_max takes only 0")
