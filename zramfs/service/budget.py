"""The daemon's memory budget: how much its devices may hold before the kernel would kill it.

The pool lives in the daemon's own memory, so the limit that matters is the tighter of the
memory cgroup the process runs in (a container, a systemd unit) and the machine's RAM, less
a margin for the daemon's own working set.

    budget = memory_budget()
    log.info("%s", budget)          # memory budget 23.5 GiB: MemTotal ... less 64 MiB margin
    used = memory_used(budget)      # headroom = budget.limit - used

Where the cgroup comes from: /proc/self/cgroup names it. With cgroup v1 the line for the
`memory` controller (`4:memory:/a/b`) gives a directory under /sys/fs/cgroup/memory, whose
memory.limit_in_bytes holds the limit; with cgroup v2 the unified line (`0::/a/b`) gives one
under /sys/fs/cgroup, with memory.max. A v1 `memory` line wins over `0::` (on a hybrid system
the memory controller is on v1). Every ancestor's limit applies too, so the walk goes up to
the root and keeps the smallest; directories or files that are not there are passed over,
which also covers a container that sees only its own cgroup mounted at the top.

Every function takes `root`, the directory /proc and /sys are under, so tests can build a
fake tree.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from zramfs.sysfs.kstrto import kstrtoull

# The daemon's own working set: the interpreter with trio and the extension modules is about
# 30 MiB resident; compression streams and FUSE request buffers per worker thread come on top.
# 64 MiB keeps that out of the devices' budget without taking a noticeable share of any
# machine that runs zram.
DEFAULT_MARGIN = 64 << 20

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# cgroup v1 shows "no limit" as its page counter's maximum, LONG_MAX pages rounded down to a
# page, in bytes: 9223372036854771712 with 4K pages. Anything that large is no limit.
V1_NO_LIMIT = (2**63 - 1) // _PAGE_SIZE * _PAGE_SIZE

_V1 = ("sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes")
_V2 = ("sys/fs/cgroup", "memory.max", "memory.current")


@dataclass(frozen=True)
class Budget:
    """What the devices may hold (`size`), the limit it came from and where, for a log line."""

    size: int          # limit - margin, never below 0
    limit: int         # the tighter of the cgroup's limit and MemTotal
    margin: int
    source: str        # "cgroup v1", "cgroup v2" or "MemTotal"
    path: Path         # the file the winning limit was read from

    def __str__(self) -> str:
        return (f"memory budget {_human(self.size)}: {self.source} {_human(self.limit)} "
                f"({self.path}) less {_human(self.margin)} margin")


def _human(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _memory_cgroup(root: Path) -> tuple[str, list[Path], str, str] | None:
    """The process's memory cgroup: its version, its directories from itself up to the
    hierarchy's root, and the names of the limit and usage files. None without one."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    found: tuple[str, tuple[str, str, str], str] | None = None
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if "memory" in controllers.split(","):
            found = ("cgroup v1", _V1, path)
            break
        if controllers == "" and found is None:
            found = ("cgroup v2", _V2, path)
    if found is None:
        return None
    version, (mount, limit_file, usage_file), path = found
    top = root / mount
    parts = [p for p in path.split("/") if p]
    dirs = [top.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return version, dirs, limit_file, usage_file


def _read_number(path: Path) -> int | None:
    """A cgroup file's number; None for "max", for the v1 no-limit value, or where the file
    is missing or unreadable."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if text.strip() == "max":
        return None
    try:
        value = kstrtoull(text, 10)
    except OSError:
        return None
    return None if value >= V1_NO_LIMIT else value


def cgroup_limit(*, root: Path = Path("/")) -> tuple[int, Path, str] | None:
    """The smallest memory limit on the way from the process's cgroup to the root: (bytes,
    the file, "cgroup v1" or "cgroup v2"). None where no cgroup on the path has one."""
    cgroup = _memory_cgroup(root)
    if cgroup is None:
        return None
    version, dirs, limit_file, _ = cgroup
    best: tuple[int, Path, str] | None = None
    for d in dirs:
        value = _read_number(d / limit_file)
        if value is not None and (best is None or value < best[0]):
            best = (value, d / limit_file, version)
    return best


def cgroup_usage(*, root: Path = Path("/")) -> int | None:
    """What the process's memory cgroup uses now, in bytes (v1 memory.usage_in_bytes, v2
    memory.current), from the nearest directory on its path that has the file."""
    cgroup = _memory_cgroup(root)
    if cgroup is None:
        return None
    _, dirs, _, usage_file = cgroup
    for d in dirs:
        value = _read_number(d / usage_file)
        if value is not None:
            return value
    return None


def _meminfo(root: Path, field: str) -> int:
    """A /proc/meminfo field in bytes (the file says kB, meaning KiB)."""
    for line in (root / "proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == field:
            return int(rest.split()[0]) * 1024
    raise LookupError(f"no {field} in {root / 'proc/meminfo'}")


def mem_total(*, root: Path = Path("/")) -> int:
    """The machine's RAM: MemTotal, in bytes."""
    return _meminfo(root, "MemTotal")


def memory_budget(margin: int = DEFAULT_MARGIN, *, root: Path = Path("/")) -> Budget:
    """The tighter of the process's memory cgroup limit and MemTotal, less `margin`. A cgroup
    limit equal to MemTotal or above it loses: the RAM is the real bound then."""
    if margin < 0:
        raise ValueError(f"margin must not be negative, not {margin}")
    limit, path, source = mem_total(root=root), root / "proc/meminfo", "MemTotal"
    found = cgroup_limit(root=root)
    if found is not None and found[0] < limit:
        limit, path, source = found
    return Budget(size=max(0, limit - margin), limit=limit, margin=margin, source=source,
                  path=path)


def memory_used(budget: Budget, *, root: Path = Path("/")) -> int:
    """What counts against `budget.limit` now: the usage of the cgroup whose limit won (which
    may be an ancestor: its other members count too), or for MemTotal the machine's memory
    in use, MemTotal - MemAvailable."""
    if budget.source == "MemTotal":
        return mem_total(root=root) - _meminfo(root, "MemAvailable")
    usage_file = _V1[2] if budget.source == "cgroup v1" else _V2[2]
    value = _read_number(budget.path.parent / usage_file)
    if value is None:
        raise FileNotFoundError(f"no {usage_file} beside {budget.path}")
    return value
