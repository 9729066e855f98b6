"""`/etc/zramfs.conf` and `/etc/zramfs.conf.d/*.conf`: zram-generator's keys and meanings.

    [zram0]
    zram-size = min(ram / 2, 4096)       # MiB, an expression over `ram` (MiB of RAM)
    compression-algorithm = lz4 zstd(level=9)   # then recompression algorithms, by priority
    dedup = yes                          # identical pages share one object (zramfs)
    writeback-device = /dev/sdb2         # a block device, or a file (zramfs)
    writeback-interval = 1h              # write back pages idle that long, every hour
    swap-priority = 100

    [zram1]
    zram-size = 1024
    fs-type = ext4
    mount-point = /var/tmp/zram
    options = discard,noatime

Every device is checked before anything is set up: an unknown key or a bad value is a
`ConfigError` naming the file, the line and the key. Expressions are parsed here, never
evaluated by Python.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from zramfs.sysfs import kstrto, tiering_args as tiering
from zramfs.zcomp import _zcomp
from zramfs.zpool import _alloc

log = logging.getLogger(__name__)

DEFAULT_PATH = Path("/etc/zramfs.conf")
DEFAULT_SIZE = "min(ram / 2, 4096)"
FS_TYPES = ("swap", "ext4", "ext2", "xfs")
DAEMON_SECTION = "zramfs"               # the daemon's own settings, beside the devices
MIB = 1 << 20
BOOLEANS = {"yes": True, "no": False, "true": True, "false": False, "on": True, "off": False,
            "1": True, "0": False}    # systemd's spellings of a boolean


class ConfigError(ValueError):
    """A config file says something we cannot do; the message names file, line and key."""


@dataclass
class DeviceConfig:
    """One `[zramN]` section, checked and with its defaults."""
    name: str
    disksize: int                          # bytes; 0 means the section makes no device
    algorithm: str = _zcomp.DEFAULT_ALGORITHM
    algorithm_params: dict[str, str] = field(default_factory=dict)
    zpool: str = _alloc.DEFAULT_BACKEND    # the allocator backend
    dedup: bool = False                    # identical pages share one object (zramfs's own)
    dictionary: Path | None = None         # zstd's dictionary for the primary algorithm
    # Recompression algorithms, priority 1 first, each with its level and dict, if given.
    recompression: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    writeback_device: Path | None = None
    writeback_interval: float = 0.0        # seconds; 0: no periodic idle writeback
    writeback_idle_age: float = 0.0        # seconds; 0: pages idle for a whole interval
    recompress: str | None = None          # the recompression policy: recompress's syntax
    recompress_interval: float = 0.0       # seconds between recompressions; 0: none
    mem_limit: int = 0                     # bytes, from zram-resident-limit
    swap_priority: int = 100
    fs_type: str | None = "swap"           # None: the device only (the embedded default)
    mount_point: Path | None = None
    options: str = "discard"
    source: str = ""                       # file:line of the section, for messages

    @property
    def id(self) -> int:
        return int(self.name[4:])


# --- expressions: + - * / min max ( ) numbers and `ram` --------------------------------------

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(ram|min|max)|(.))")


def evaluate(expr: str, ram_mib: float) -> float:
    """The value of a zram-size expression, `ram` being the machine's RAM in MiB.

    >>> evaluate("min(ram / 2, 4096)", 24000)
    4096.0
    """
    tokens: list[tuple[str, str]] = []
    for number, name, other in _TOKEN.findall(expr.strip()):
        if number:
            tokens.append(("num", number))
        elif name:
            tokens.append(("name", name))
        elif other.strip():
            if other not in "+-*/(),":
                raise ValueError(f"unexpected {other!r}")
            tokens.append(("op", other))
    pos = 0

    def peek() -> tuple[str, str] | None:
        return tokens[pos] if pos < len(tokens) else None

    def take(value: str | None = None) -> tuple[str, str]:
        nonlocal pos
        tok = peek()
        if tok is None or (value is not None and tok[1] != value):
            raise ValueError(f"expected {value or 'more'}" + (f", found {tok[1]!r}" if tok else ""))
        pos += 1
        return tok

    def sum_() -> float:
        value = product()
        while peek() and peek()[1] in "+-":
            value = value + product() if take()[1] == "+" else value - product()
        return value

    def product() -> float:
        value = unary()
        while peek() and peek()[1] in "*/":
            if take()[1] == "*":
                value *= unary()
            else:
                divisor = unary()
                if divisor == 0:
                    raise ValueError("division by zero")
                value /= divisor
        return value

    def unary() -> float:
        if peek() and peek()[1] == "-":
            take()
            return -unary()
        return atom()

    def atom() -> float:
        kind, text = take()
        if kind == "num":
            return float(text)
        if text == "ram":
            return float(ram_mib)
        if text in ("min", "max"):
            take("(")
            args = [sum_()]
            while peek() and peek()[1] == ",":
                take()
                args.append(sum_())
            take(")")
            return min(args) if text == "min" else max(args)
        if text == "(":
            value = sum_()
            take(")")
            return value
        raise ValueError(f"unexpected {text!r}")

    if not tokens:
        raise ValueError("empty expression")
    value = sum_()
    if peek() is not None:
        raise ValueError(f"unexpected {peek()[1]!r}")
    return value


# An algorithm with its parameters, or a group of parameters without a name.
_WORDS = re.compile(r"[^\s(]+(?:\([^)]*\))?|\([^)]*\)")


def _one_algorithm(word: str) -> tuple[str, dict[str, str]]:
    """`zstd(level=19,dict=/etc/pages.dict)` -> ("zstd", {"level": "19", "dict":
    "/etc/pages.dict"}), the name and level checked by the compressors themselves
    (zramfs.zcomp._zcomp), so a config that loads also sets up; a dictionary (zstd's, an absolute
    path) is read only when the device is set up, as `algorithm_params dict=` reads it."""
    known = _zcomp.ALGORITHMS.names()
    m = re.fullmatch(r"([a-z0-9-]+)(?:\(([^)]*)\))?", word)
    if m is not None and m.group(1) in _zcomp.NOT_OFFERED:
        raise ValueError(_zcomp.NOT_OFFERED[m.group(1)])
    if m is None or m.group(1) not in known:
        raise ValueError(f"unknown algorithm {word!r} (known: {', '.join(known)})")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in (m.group(2) or "").split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in ("level", "dict"):
            raise ValueError(f"bad parameter {item!r} (known: level=N, dict=PATH)")
        if key == "dict" and not value.startswith("/"):
            raise ValueError(f"dict={value}: not an absolute path")
        if key == "dict" and m.group(1) != "zstd":
            raise ValueError(f"{m.group(1)} takes no dictionary")
        params[key] = value
    try:
        if "level" in params:
            _zcomp.check_level(m.group(1), kstrto.kstrtoint(params["level"], 10))
    except OSError:
        raise ValueError(f"level must be an integer, not {params['level']!r}") from None
    except _zcomp.CompressorError as e:
        raise ValueError(str(e)) from None
    return m.group(1), params


def parse_algorithm(text: str) -> list[tuple[str, dict[str, str]]]:
    """`lz4 zstd(level=9)` -> [("lz4", {}), ("zstd", {"level": "9"})]: the primary algorithm,
    then up to three recompression algorithms in priority order."""
    words = _WORDS.findall(text.strip())
    if not words:
        raise ValueError("no algorithm named")
    if words[-1].startswith("("):
        raise ValueError(f"recompression parameters {words[-1]} are not supported: "
                         "write them to the device's recompress attribute")
    if len(words) > 4:
        raise ValueError("at most three recompression algorithms")
    return [_one_algorithm(w) for w in words]


def split_policy(text: str) -> tuple[str, str | None]:
    """`lzo-rle zstd(level=3) (type=idle)` -> the algorithms, and the trailing group without a
    name: zram-generator's recompression policy, in the recompress attribute's syntax
    ("type=idle"); None where there is no such group."""
    words = _WORDS.findall(text.strip())
    if not words or not words[-1].startswith("("):
        return text, None
    group = words[-1][1:-1]
    return " ".join(words[:-1]), " ".join(p for p in re.split(r"[\s,]+", group) if p)


def duration(text: str) -> float:
    """Seconds from `90`, `90s`, `30m`, `2h`, `1d`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if m is None:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 30m, 2h, 1d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


# --- files -------------------------------------------------------------------------------------

@dataclass
class _Section:
    name: str
    source: str
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)    # key -> (value, where)


def _read(path: Path, sections: dict[str, _Section]) -> None:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    current: _Section | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        where = f"{path}:{lineno}"
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"\[([^\]]*)\]", line)
        if m:
            name = m.group(1).strip()
            if name != DAEMON_SECTION and not re.fullmatch(r"zram(0|[1-9]\d{0,3})", name):
                raise ConfigError(f"{where}: section [{name}]: sections are [zramN] and "
                                  f"[{DAEMON_SECTION}]")
            current = sections.setdefault(name, _Section(name, where))
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(f"{where}: expected key = value, found {line!r}")
        if current is None:
            raise ConfigError(f"{where}: key {key.strip()!r} outside a [zramN] section")
        current.keys[key.strip()] = (value.strip(), where)


def _device(section: _Section, ram_mib: float) -> DeviceConfig:
    keys = dict(section.keys)

    def take(key: str, default: str | None = None) -> tuple[str | None, str]:
        value, where = keys.pop(key, (default, section.source))
        return value, where

    def fail(where: str, key: str, why: str) -> ConfigError:
        return ConfigError(f"{where}: [{section.name}] {key}: {why}")

    def size_of(key: str, default: str) -> int:
        expr, where = take(key, default)
        try:
            mib = evaluate(expr, ram_mib)
        except ValueError as e:
            raise fail(where, key, f"{e} in {expr!r}") from None
        if mib < 0:
            raise fail(where, key, f"{expr!r} is negative")
        return kstrto.page_align(int(mib * MIB))   # up, as disksize and mem_limit round

    def obsolete(old: str, new: str) -> None:
        if old in keys:
            log.warning("%s: [%s] %s is obsolete: use %s", keys[old][1], section.name, old, new)

    def megabytes_or_none(key: str) -> float | None:
        text, where = take(key, "none")
        if text == "none":
            return None
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if value < 0:
            raise fail(where, key, f"{text!r} is not a number of MB or none")
        return value

    # zram-generator's older keys, still taken: memory-limit is host-memory-limit, and without
    # zram-size the size is min(ram * zram-fraction, max-zram-size).
    obsolete("memory-limit", "host-memory-limit")
    if "host-memory-limit" not in keys and "memory-limit" in keys:
        keys["host-memory-limit"] = keys.pop("memory-limit")
    keys.pop("memory-limit", None)
    obsolete("zram-fraction", "zram-size")
    obsolete("max-zram-size", "zram-size")
    if "zram-size" not in keys and ("zram-fraction" in keys or "max-zram-size" in keys):
        fraction, where = take("zram-fraction", "0.5")
        try:
            factor = float(fraction)
        except ValueError:
            factor = -1.0
        if factor < 0:
            raise fail(where, "zram-fraction", f"{fraction!r} is not a nonnegative number")
        most = megabytes_or_none("max-zram-size") if "max-zram-size" in keys else 4096.0
        size = f"ram * {factor!r}" if most is None else f"min(ram * {factor!r}, {most!r})"
        keys["zram-size"] = (size, where)
    keys.pop("zram-fraction", None)
    keys.pop("max-zram-size", None)
    host_limit = megabytes_or_none("host-memory-limit")
    dev = DeviceConfig(section.name, size_of("zram-size", DEFAULT_SIZE), source=section.source)
    if host_limit is not None and ram_mib > host_limit:
        log.info("[%s]: %.0f MB of RAM is over host-memory-limit (%.0f MB): no device",
                 section.name, ram_mib, host_limit)
        dev.disksize = 0
    dev.mem_limit = size_of("zram-resident-limit", "0")
    text, where = take("compression-algorithm", _zcomp.DEFAULT_ALGORITHM)
    try:
        names, dev.recompress = split_policy(text)
        (dev.algorithm, dev.algorithm_params), *dev.recompression = parse_algorithm(names)
        if dev.recompress is not None:
            tiering.parse_recompress(dev.recompress)
            if not dev.recompression:
                raise ValueError(f"({dev.recompress}) needs a recompression algorithm")
    except ValueError as e:
        raise fail(where, "compression-algorithm", str(e)) from None
    if "dict" in dev.algorithm_params:
        dev.dictionary = Path(dev.algorithm_params.pop("dict"))
    text, where = take("compression-dictionary")
    if text is not None:
        if not text.startswith("/"):
            raise fail(where, "compression-dictionary", f"{text!r} is not an absolute path")
        if dev.algorithm != "zstd":
            raise fail(where, "compression-dictionary", f"{dev.algorithm} takes no dictionary")
        if dev.dictionary is not None:
            raise fail(where, "compression-dictionary",
                       f"compression-algorithm already gives dict={dev.dictionary}")
        dev.dictionary = Path(text)
    text, where = take("zpool", _alloc.DEFAULT_BACKEND)
    if text not in _alloc.BACKENDS.names():
        raise fail(where, "zpool", f"{text!r} is not one of {', '.join(_alloc.BACKENDS.names())}")
    dev.zpool = text
    text, where = take("dedup", "no")
    if text.lower() not in BOOLEANS:
        raise fail(where, "dedup", f"{text!r} is not yes or no")
    dev.dedup = BOOLEANS[text.lower()]
    text, where = take("swap-priority", "100")
    if not re.fullmatch(r"-?\d+", text) or not -1 <= int(text) <= 32767:
        raise fail(where, "swap-priority", f"{text!r} is not a priority in -1..32767")
    dev.swap_priority = int(text)
    mount_point, mp_where = take("mount-point")
    fs_type, where = take("fs-type", "ext2" if mount_point else "swap")
    if fs_type not in FS_TYPES:
        raise fail(where, "fs-type", f"{fs_type!r} is not one of {', '.join(FS_TYPES)}")
    if fs_type != "swap" and not mount_point:
        raise fail(where, "fs-type", f"{fs_type} needs a mount-point")
    if fs_type == "swap" and mount_point:
        raise fail(mp_where, "mount-point", "a swap device has no mount point")
    if mount_point is not None and not mount_point.startswith("/"):
        raise fail(mp_where, "mount-point", f"{mount_point!r} is not an absolute path")
    dev.fs_type = fs_type
    dev.mount_point = Path(mount_point) if mount_point else None
    dev.options = take("options", "discard")[0]
    wb, where = take("writeback-device")
    if wb is not None:
        if not wb.startswith("/"):
            raise fail(where, "writeback-device", f"{wb!r} is not an absolute path")
        dev.writeback_device = Path(wb)
    wheres = {}
    for key in ("writeback-interval", "writeback-idle-age"):
        text, wheres[key] = take(key, "0")
        try:
            setattr(dev, key.replace("-", "_"), duration(text))
        except ValueError as e:
            raise fail(wheres[key], key, str(e)) from None
    if dev.writeback_interval and dev.writeback_device is None:
        raise fail(wheres["writeback-interval"], "writeback-interval", "needs a writeback-device")
    # zram-generator parses the policy group and never applies it; zramfs runs it every
    # recompress-interval (an hour unless said otherwise).
    text, where = take("recompress-interval", "1h" if dev.recompress else "0")
    try:
        dev.recompress_interval = duration(text)
    except ValueError as e:
        raise fail(where, "recompress-interval", str(e)) from None
    if dev.recompress_interval and not dev.recompress:
        raise fail(where, "recompress-interval",
                   "needs a recompression policy: compression-algorithm = lz4 zstd (type=idle)")
    for key, (_, where) in keys.items():
        raise fail(where, key, "unknown key")
    return dev


def _sections(path: Path) -> dict[str, _Section]:
    """The sections of `path` and of `path`.d/*.conf, later files overriding keys of earlier
    ones, as systemd's drop-ins do."""
    sections: dict[str, _Section] = {}
    _read(path, sections)
    dropins = Path(str(path) + ".d")
    if dropins.is_dir():
        for extra in sorted(dropins.glob("*.conf")):
            _read(extra, sections)
    return sections


@dataclass
class DaemonConfig:
    """The [zramfs] section: the daemon's settings that are no device's."""
    metrics: str | None = None            # ADDR:PORT of the Prometheus endpoint
    fuse_transport: str | None = None     # classic, io_uring or auto (None: not set here)


FUSE_TRANSPORTS = ("classic", "io_uring", "auto")


def load_daemon(path: Path = DEFAULT_PATH) -> DaemonConfig:
    """The [zramfs] section of `path` and its drop-ins (later files override keys)."""
    from zramfs.service.metrics import parse_address
    section = _sections(path).get(DAEMON_SECTION)
    settings = DaemonConfig()
    for key, (value, where) in (section.keys.items() if section else ()):
        if key == "fuse-transport":
            if value not in FUSE_TRANSPORTS:
                raise ConfigError(f"{where}: [{DAEMON_SECTION}] fuse-transport: {value!r} is not "
                                  f"one of {', '.join(FUSE_TRANSPORTS)}")
            settings.fuse_transport = value
            continue
        if key != "metrics":
            raise ConfigError(f"{where}: [{DAEMON_SECTION}] {key}: unknown key")
        try:
            parse_address(value)
        except ValueError as e:
            raise ConfigError(f"{where}: [{DAEMON_SECTION}] metrics: {e}") from None
        settings.metrics = value
    return settings


def load(path: Path = DEFAULT_PATH, *, ram_mib: float) -> list[DeviceConfig]:
    """The devices of `path` and of `path`.d/*.conf (later files override keys of earlier
    ones, as systemd's drop-ins do), in id order; devices sized 0 are left out."""
    devices = [_device(s, ram_mib) for s in _sections(path).values()
               if s.name != DAEMON_SECTION]
    mounts = [d.mount_point for d in devices if d.mount_point]
    if len(mounts) != len(set(mounts)):
        raise ConfigError(f"{path}: two devices have the same mount-point")
    return sorted((d for d in devices if d.disksize), key=lambda d: d.id)
