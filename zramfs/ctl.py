"""`zramfs ctl`, `swapon`, `swapoff`, `stats`: util-linux's zramctl and friends, against the
tree a daemon serves. They only read and write the tree's files, as zramctl does /sys.
"""
from __future__ import annotations

import errno
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from zramfs.service import loop
from zramfs.sysfs.kstrto import PAGE_SIZE as PAGE

COLUMNS = {
    # name: (header, what it shows)
    "NAME": "zram device name",
    "DISKSIZE": "limit on the uncompressed amount of data",
    "DATA": "uncompressed size of stored data",
    "COMPR": "compressed size of stored data",
    "ALGORITHM": "the selected compression algorithm",
    "STREAMS": "number of concurrent compress operations",
    "ZERO-PAGES": "empty pages with no allocated memory",
    "TOTAL": "all memory including allocator fragmentation and metadata overhead",
    "MEM-LIMIT": "memory limit used to store compressed data",
    "MEM-USED": "memory zram has consumed to store compressed data",
    "MIGRATED": "number of objects migrated by compaction",
    "COMP-RATIO": "compression ratio: DATA/COMPR",
    "MOUNTPOINT": "where the device is used",
}
DEFAULT_COLUMNS = ["NAME", "ALGORITHM", "DISKSIZE", "DATA", "COMPR", "TOTAL", "STREAMS",
                   "MOUNTPOINT"]
SIZE_COLUMNS = {"DISKSIZE", "DATA", "COMPR", "TOTAL", "MEM-LIMIT", "MEM-USED"}
NUMBER_COLUMNS = {"STREAMS", "ZERO-PAGES", "MIGRATED"}


class CtlError(Exception):
    """What the user asked cannot be done; the message says why, in one line."""


def columns(spec: str | None) -> list[str]:
    """zramctl's --output: `A,B` those columns; `+A,B` the default ones and those."""
    if not spec:
        return list(DEFAULT_COLUMNS)
    extra = spec.startswith("+")
    wanted = [c.strip().upper() for c in spec.removeprefix("+").split(",") if c.strip()]
    unknown = [c for c in wanted if c not in COLUMNS]
    if unknown or not wanted:
        raise CtlError(f"unknown column {(unknown or [spec])[0]!r} "
                       f"(known: {', '.join(COLUMNS)})")
    return DEFAULT_COLUMNS + [c for c in wanted if c not in DEFAULT_COLUMNS] if extra else wanted


def mounted_tree(mounts: str = "/proc/mounts") -> Path:
    """The one zramfs tree mounted here, from the mount table; CtlError where there is none
    or several (then --mountpoint chooses)."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError as e:
        raise CtlError(f"{mounts}: {e.strerror}") from None
    trees = [f[1].replace("\\040", " ") for f in (line.split() for line in lines)
             if len(f) > 2 and f[2] == "fuse.zramfs"]
    if not trees:
        raise CtlError("no zramfs tree is mounted (is the daemon running?)")
    if len(trees) > 1:
        raise CtlError(f"{len(trees)} zramfs trees are mounted ({', '.join(trees)}): "
                       "choose one with --mountpoint")
    return Path(trees[0])


def human(n: int) -> str:
    """zramctl's sizes: 0B, 512B, 4K, 1.5M, 5.9G."""
    if n < 1024:
        return f"{n}B"
    exp = 0
    value = float(n)
    while value >= 1024 and exp < 6:
        value /= 1024
        exp += 1
    text = f"{value:.1f}".removesuffix(".0")
    return text + "KMGTPE"[exp - 1]


def parse_size(text: str) -> int:
    """A size with the kernel's suffixes: 512, 64K, 1G, 2T."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTkmgt]?)(?:i?[Bb])?\s*", text)
    if m is None or int(m.group(1)) == 0:
        raise CtlError(f"invalid size {text!r}: use a positive number with K, M, G or T")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


@dataclass
class Mount:
    """A mounted zramfs tree seen from outside: its files, as zramctl sees /sys."""
    mountpoint: Path

    def check(self) -> None:
        if not (self.control / "hot_add").exists():
            raise CtlError(f"no zramfs tree at {self.mountpoint} (is the daemon running?)")

    @property
    def control(self) -> Path:
        return self.mountpoint / "sys/class/zram-control"

    def names(self) -> list[str]:
        try:
            names = os.listdir(self.mountpoint / "dev")
        except OSError as e:
            raise CtlError(f"{self.mountpoint}/dev: {e.strerror}") from None
        return sorted(names, key=lambda n: int(n[4:]))

    def name_of(self, text: str) -> str:
        """`zram0`, or a path ending in it (the tree's or /dev's)."""
        name = Path(text).name
        if not re.fullmatch(r"zram\d+", name) or not (self.mountpoint / "dev" / name).exists():
            raise CtlError(f"{text}: no such device")
        return name

    def dev(self, name: str) -> Path:
        return self.mountpoint / "dev" / name

    def read(self, name: str, attr: str) -> str:
        try:
            return (self.mountpoint / "sys/block" / name / attr).read_text()
        except OSError as e:
            raise CtlError(f"{name}: cannot read {attr}: {e.strerror}") from None

    def write(self, name: str, attr: str, value: str) -> None:
        path = self.mountpoint / "sys/block" / name / attr
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as e:
            why = {errno.EBUSY: "device is busy", errno.EINVAL: "invalid value"}.get(
                e.errno, e.strerror)
            raise CtlError(f"{name}: cannot set {attr} to {value.strip()!r}: {why}") from None

    def hot_add(self) -> str:
        try:
            return "zram" + (self.control / "hot_add").read_text().strip()
        except OSError as e:
            raise CtlError(f"cannot add a device: {e.strerror}") from None


def status(mount: Mount, names: list[str] | None = None) -> list[dict[str, object]]:
    """One row a device, every column, values raw (bytes, counts)."""
    rows = []
    for name in names or mount.names():
        if names is None and mount.read(name, "initstate").strip() != "1":
            continue                       # zramctl lists the devices in use
        mm = _mm(mount, name)
        algorithm = re.search(r"\[([^\]]+)\]", mount.read(name, "comp_algorithm"))
        rows.append({
            "NAME": str(mount.dev(name)),
            "DISKSIZE": int(mount.read(name, "disksize")),
            "DATA": mm[0], "COMPR": mm[1], "TOTAL": mm[2], "MEM-LIMIT": mm[3],
            "MEM-USED": mm[4], "ZERO-PAGES": mm[5], "MIGRATED": mm[6],
            "ALGORITHM": algorithm.group(1) if algorithm else "",
            "STREAMS": int(mount.read(name, "max_comp_streams")),
            "COMP-RATIO": round(mm[0] / mm[1], 2) if mm[1] else 0.0,
            "MOUNTPOINT": loop.use_of(mount.dev(name)),
        })
    return rows


def format_status(rows: list[dict[str, object]], columns: list[str], *, as_bytes: bool,
                  raw: bool, as_json: bool, headings: bool = True) -> str:
    def cell(col: str, value: object) -> object:
        if col in SIZE_COLUMNS and not as_bytes:
            return human(int(value))
        return value

    if as_json:
        return json.dumps({"zramdevices": [
            {c.lower(): cell(c, r[c]) for c in columns} for r in rows]}, indent=3)
    table = [columns] if headings else []
    table += [[str(cell(c, r[c])) for c in columns] for r in rows]
    if raw:
        return "\n".join(" ".join(line) for line in table)
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))] if table else []
    out = []
    for line in table:
        cells = []
        for i, (c, text) in enumerate(zip(columns, line)):
            right = c in SIZE_COLUMNS | NUMBER_COLUMNS | {"COMP-RATIO"}
            last = i == len(columns) - 1
            cells.append(text.rjust(widths[i]) if right else
                         (text if last else text.ljust(widths[i])))
        out.append(" ".join(cells).rstrip())
    return "\n".join(out)


def configure(mount: Mount, name: str, size: int | None, algorithm: str | None,
              params: str | None) -> None:
    """zramctl's set-up of one device: algorithm and params first, disksize last."""
    if mount.read(name, "initstate").strip() == "1" and (size or algorithm or params):
        raise CtlError(f"{name}: device is in use (reset it first)")
    if algorithm:
        available = mount.read(name, "comp_algorithm").replace("[", "").replace("]", "").split()
        if algorithm not in available:
            raise CtlError(f"{algorithm}: unknown algorithm (available: {' '.join(available)})")
        mount.write(name, "comp_algorithm", algorithm)
    if params:
        mount.write(name, "algorithm_params", params)
    if size:
        mount.write(name, "disksize", str(size))


def find(mount: Mount, size: int, algorithm: str | None, params: str | None) -> str:
    """The first free device, or a new one, set up; its path."""
    free = [n for n in mount.names() if mount.read(n, "initstate").strip() == "0"]
    name = free[0] if free else mount.hot_add()
    configure(mount, name, size, algorithm, params)
    return str(mount.dev(name))


def reset(mount: Mount, name: str) -> None:
    mount.write(name, "reset", "1")


def swapon(mount: Mount, name: str, priority: int) -> str:
    path = mount.dev(name)
    if mount.read(name, "initstate").strip() != "1":
        raise CtlError(f"{name}: not initialised (set a size first: zramfs ctl {name} --size 1G)")
    if loop.loops_of(path):
        raise CtlError(f"{name}: already bound to {', '.join(loop.loops_of(path))}")
    try:
        lo = loop.bind(path)
    except loop.UseError as e:
        raise CtlError(str(e)) from None
    try:
        loop.swapon(lo, priority)
    except loop.UseError as e:
        loop.unbind(lo)
        raise CtlError(str(e)) from None
    return lo


def swapoff(mount: Mount, name: str) -> None:
    active = loop.swaps()
    loops = [lo for lo in loop.loops_of(mount.dev(name)) if lo in active]
    if not loops:
        raise CtlError(f"{name}: not in use as swap")
    try:
        for lo in loops:
            loop.swapoff(lo)
            loop.unbind(lo)
    except loop.UseError as e:
        raise CtlError(str(e)) from None


def pools_of(mount: Mount, name: str) -> list[Path]:
    """The allocator pools of a device in the tree's debugfs mirror: `zram0`, or `zram0-N`
    while an older pool of the same name is still being torn down."""
    base = mount.mountpoint / "sys/kernel/debug/zsmalloc"
    return [p for p in sorted(base.iterdir()) if re.fullmatch(rf"{name}(-\d+)?", p.name)]


def stats(mount: Mount, names: list[str]) -> str:
    """Per device: the allocator's classes table and a summary."""
    out = []
    for name in names:
        if mount.read(name, "initstate").strip() != "1":
            out.append(f"{name}: not initialised\n")
            continue
        mm = _mm(mount, name)
        for pool in pools_of(mount, name):
            out.append(f"{name} (pool {pool.name}):")
            out.append((pool / "classes").read_text())
        data, compr, total = mm[0], mm[1], mm[2]
        backend = re.search(r"\[([^\]]+)\]", mount.read(name, "zpool"))
        out.append(f"  allocator {backend.group(1) if backend else '?'}, data {human(data)},"
                   f" compressed {human(compr)}, memory {human(total)}")
        ratio = f"{data / total:.2f}" if total else "-"
        out.append(f"  ratio {ratio} (data / memory), memory saved {human(max(data - total, 0))},"
                   f" same-filled pages {mm[5]}, huge pages {mm[7]}\n")
    return "\n".join(out)


# --- long operations, in batches, with progress -------------------------------------------------

class Progress:
    """Pages done of a total, memory freed and the time left: one line rewritten in place on a
    terminal, a plain line a batch otherwise (a log, a pipe)."""

    def __init__(self, what: str, total: int, stream) -> None:
        self.what = what
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()

    def show(self, done: int, freed: int) -> None:
        elapsed = time.monotonic() - self.started
        left = elapsed / done * (self.total - done) if done and done < self.total else 0.0
        line = (f"{self.what}: {done}/{self.total} pages, {human(max(freed, 0))} freed, "
                f"{left:.0f} s left")
        self.stream.write(f"\r\033[K{line}" if self.tty else line + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# The page types, by block_state's flags (s w h i r n): a page with an object in memory and
# the type's flags.
PAGE_TYPES = {"idle": "i", "huge": "h", "huge_idle": "hi", "incompressible": "n"}


def _count(mount: Mount, name: str, want: str, without: str = "") -> int:
    """Pages in memory (not same-filled, not written back) with every flag of `want` and none
    of `without`, from the tree's block_state."""
    text = (mount.mountpoint / "sys/kernel/debug/zram" / name / "block_state").read_text()
    count = 0
    for line in text.splitlines():
        flags = line.split()[2]
        if "s" in flags or "w" in flags:
            continue
        if all(f in flags for f in want) and not any(f in flags for f in without):
            count += 1
    return count


def _store(mount: Mount, name: str, attr: str, value: str) -> int:
    """Writes an attribute; 0, or the errno it refused with."""
    try:
        fd = os.open(mount.mountpoint / "sys/block" / name / attr, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        return e.errno or errno.EIO
    return 0


def writeback(mount: Mount, name: str, mode: str, batch: int, stream) -> int:
    """`writeback MODE` in batches of `batch` pages (through writeback_limit, as the kernel's
    own limit works, and put back after), with progress; the pages written back."""
    if mode not in PAGE_TYPES:
        raise CtlError(f"{mode}: not a page type ({', '.join(PAGE_TYPES)})")
    enable = mount.read(name, "writeback_limit_enable").strip()
    limit = int(mount.read(name, "writeback_limit"))
    total = _count(mount, name, PAGE_TYPES[mode])
    progress = Progress(f"{name}: writeback {mode}", total, stream)
    bd0, used0 = _bd_writes(mount, name), _mm(mount, name)[2]
    done = 0
    try:
        mount.write(name, "writeback_limit_enable", "1")
        while True:
            allowed = batch if enable != "1" else min(batch, limit - done)
            if allowed <= 0:
                break
            mount.write(name, "writeback_limit", str(allowed))
            err = _store(mount, name, "writeback", mode)
            done = _bd_writes(mount, name) - bd0
            progress.show(done, used0 - _mm(mount, name)[2])
            if err == 0:
                break                          # every page of the type is written back
            if err != errno.EIO or done == 0:
                raise CtlError(f"{name}: writeback {mode}: {os.strerror(err)}")
    finally:
        progress.end()
        mount.write(name, "writeback_limit", str(max(limit - done, 0) if enable == "1"
                                                 else limit))
        mount.write(name, "writeback_limit_enable", enable)
    return done


def recompress(mount: Mount, name: str, params: str, batch: int, stream) -> int:
    """`recompress PARAMS` in batches of `batch` pages (max_pages), with progress; the pages
    no longer waiting (recompressed, or found not to shrink)."""
    words = dict(w.partition("=")[::2] for w in params.split())
    if "max_pages" in words:
        raise CtlError("the batches set max_pages themselves")
    want = PAGE_TYPES.get(words.get("type", ""), "")
    total = _count(mount, name, want, without="rn")
    progress = Progress(f"{name}: recompress {params}", total, stream)
    used0 = _mm(mount, name)[2]
    left = total
    try:
        while left:
            err = _store(mount, name, "recompress", f"{params} max_pages={batch}")
            if err:
                raise CtlError(f"{name}: recompress {params}: {os.strerror(err)}")
            now = _count(mount, name, want, without="rn")
            progress.show(total - now, used0 - _mm(mount, name)[2])
            if now >= left:
                break                          # nothing moved: what is left stays as it is
            left = now
    finally:
        progress.end()
    return total - left


def _mm(mount: Mount, name: str) -> list[int]:
    return [int(x) for x in mount.read(name, "mm_stat").split()]


def _bd_writes(mount: Mount, name: str) -> int:
    return int(mount.read(name, "bd_stat").split()[2])


# --- a zstd dictionary from a device's own pages ------------------------------------------------

def train_dictionary(mount: Mount, name: str, size: int, samples: int = 4096) -> bytes:
    """A zstd dictionary of `size` bytes trained (zstandard's ZDICT trainer) on up to `samples`
    of the device's stored pages, spread evenly over them; same-filled and written-back pages
    are left out. CtlError when the device holds too few pages to learn from."""
    import zstandard
    text = (mount.mountpoint / "sys/kernel/debug/zram" / name / "block_state").read_text()
    stored = [int(f[0]) for f in (line.split() for line in text.splitlines())
              if not set(f[2]) & set("sw")]
    if len(stored) < 16:
        raise CtlError(f"{name}: {len(stored)} stored pages; too few to train a dictionary on")
    step = max(1, len(stored) // samples)
    pages = []
    with open(mount.dev(name), "rb", buffering=0) as f:
        for index in stored[::step][:samples]:
            pages.append(os.pread(f.fileno(), PAGE, index * PAGE))
    try:
        return zstandard.train_dictionary(size, pages).as_bytes()
    except zstandard.ZstdError as e:
        raise CtlError(f"{name}: cannot train a dictionary: {e}") from None
