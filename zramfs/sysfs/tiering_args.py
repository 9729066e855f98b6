"""Tiering's attribute syntax, as the kernel's zram.rst gives it: what to write back, what
is idle, which secondary algorithms recompress and what.

    parse_writeback("huge_idle")                  -> Writeback(mode="huge_idle")
    parse_writeback("page_indexes=1-100 page_index=7")
    parse_idle("all") / parse_idle("86400")
    parse_recomp_algorithm("algo=zstd priority=1 level=9")
    parse_recompress("type=idle threshold=3000 max_pages=100")

Every parser raises ValueError with the reason; the device turns that into EINVAL.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Every count and index here is a u64 in the data path, read as the kernel reads it.
from zramfs.sysfs.kstrto import U64_MAX, kstrtoint, kstrtoull

WRITEBACK_MODES = ("idle", "huge", "huge_idle", "incompressible")
RECOMPRESS_TYPES = ("idle", "huge", "huge_idle")
MAX_SECONDARY = 3            # priorities 1..3, after the primary's 0


@dataclass
class Writeback:
    """A writeback request: a page type, or page index ranges (inclusive)."""
    mode: str | None = None
    ranges: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Recompress:
    mode: str | None = None              # None: every page (threshold still applies)
    threshold: int = 0                   # only objects of at least this size
    max_pages: int = 0                   # 0: no limit
    algo: str | None = None              # only this secondary algorithm
    priority: int | None = None          # only the algorithm of this priority


def _params(text: str, allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for token in text.split():
        key, sep, value = token.partition("=")
        if not sep or key not in allowed or not value:
            raise ValueError(f"unknown parameter {token!r} (known: {', '.join(allowed)})")
        out.append((key, value))
    return out




def _number(key: str, value: str, low: int = 0) -> int:
    """A decimal number from `low` to U64_MAX, read by kstrtoull as the kernel's stores read
    theirs (ASCII digits only; a 5,000-digit value is refused before it is converted)."""
    try:
        number = kstrtoull(value, 10)
    except OSError:
        number = -1
    if not low <= number <= U64_MAX:
        raise ValueError(f"{key}={value[:30]}: not a number from {low} to {U64_MAX}")
    return number


def parse_writeback(text: str) -> Writeback:
    words = text.split()
    if len(words) == 1 and words[0] in WRITEBACK_MODES:
        return Writeback(mode=words[0])
    wb = Writeback()
    for key, value in _params(text, ("type", "page_index", "page_indexes")):
        if key == "type":
            if value not in WRITEBACK_MODES or wb.mode is not None:
                raise ValueError(f"type={value}: one of {', '.join(WRITEBACK_MODES)}, once")
            wb.mode = value
        elif key == "page_index":
            index = _number(key, value)
            wb.ranges.append((index, index))
        else:
            lo, sep, hi = value.partition("-")
            first, last = (_number(key, lo), _number(key, hi)) if sep else (None, None)
            if first is None or first > last:
                raise ValueError(f"page_indexes={value[:60]}: LO-HI with LO <= HI")
            wb.ranges.append((first, last))
    if wb.mode is None and not wb.ranges:
        raise ValueError(f"nothing to write back in {text!r}")
    if wb.mode is not None and wb.ranges:
        raise ValueError("type= and page indexes exclude each other")
    return wb


def parse_idle(text: str) -> int | None:
    """None for `all`, else an age in seconds: pages not touched for that long."""
    word = text.strip()
    if word == "all":
        return None
    return _number("idle", word, low=1)


def parse_recomp_algorithm(text: str) -> tuple[int, str, int | None]:
    """(priority, algorithm, level) from `algo=NAME [priority=N] [level=N]`."""
    params = dict(_params(text, ("algo", "priority", "level")))
    if "algo" not in params:
        raise ValueError("algo=NAME is needed")
    priority = _number("priority", params.get("priority", "1"), low=1)
    if priority > MAX_SECONDARY:
        raise ValueError(f"priority must be 1..{MAX_SECONDARY}")
    level = None
    if "level" in params:
        try:
            level = kstrtoint(params["level"], 10)
        except OSError:
            raise ValueError(f"level={params['level'][:30]}: not a level") from None
    return priority, params["algo"], level


def parse_recompress(text: str) -> Recompress:
    r = Recompress()
    for key, value in _params(text, ("type", "threshold", "max_pages", "algo", "priority")):
        if key == "type":
            if value not in RECOMPRESS_TYPES:
                raise ValueError(f"type={value}: one of {', '.join(RECOMPRESS_TYPES)}")
            r.mode = value
        elif key == "threshold":
            r.threshold = _number(key, value, low=1)
        elif key == "max_pages":
            r.max_pages = _number(key, value, low=1)
        elif key == "algo":
            r.algo = value
        else:
            r.priority = _number(key, value, low=1)
    if r.mode is None and not r.threshold:
        raise ValueError("recompress needs a type= or a threshold=")
    return r
