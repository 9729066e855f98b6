"""The restart record: what a restarted daemon restores its devices from, and where it is
kept meanwhile (live restart). It lives with the devices, which write it as they change; the
process (zramfs.service) only hands it to the next daemon.

The kernel keeps the FUSE connection while any process holds its /dev/fuse fd, and a memfd
keeps its memory while any process holds it; the service manager (systemd's fd store, or
zramfs's own supervisor: zramfs.service.fdstore) holds them across a restart. This module
owns what goes in them:

- `devices`: a record of every device, its id, generation, open count and the settings
  written to it, in order (the attribute stores that shape it: comp_algorithm, mem_limit,
  disksize...), so a new daemon replays them and gets the same devices;
- `zram<id>.<seq>.table` and `zram<id>.<seq>.pool`: an initialised device's slot table and
  pool (zramfs.zram._zram.Meta.state_fds). A new daemon adopts them in place, or copies them
  into a fresh meta where their address is taken in it, keeps the new pair under the next
  seq, then drops the old: at every moment one complete pair is kept;
- `zram<id>.<seq>.dicts`, beside a pair: the zstd dictionaries its pages may be compressed
  with, so that a new daemon reads them back whatever is at the `dict=` paths by then;
- `zram<id>.<seq>.backing`, beside a pair: the backing device's descriptor, so that a new
  daemon reads the written-back pages from the file they were written to, wherever the
  `backing_dev` path leads by then (the file moved, another made in its place).

The record is JSON in a memfd, in two halves written in turn, each with a sequence number and
a CRC, so a daemon killed in the middle of a write leaves the other half whole.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field


log = logging.getLogger(__name__)

RECORD_NAME = "devices"
RECORD_MAGIC = b"zramfs-devices\0\0"
RECORD_VERSION = 1
_HALF = 1 << 20                      # each half of the record's memfd
_HEADER = struct.Struct("<16sIIQII")  # magic, version, pad, seq, length, crc32
_KEPT = re.compile(r"zram(\d+)\.(\d+)\.(table|pool|dicts|backing)")
DICTS_MAGIC = b"zramfs-dicts\0\0\0\0"
_DICT = struct.Struct("<II")          # a kept dictionary's priority and length, then its bytes
DECODE_ONLY = 255                     # the priority of a dictionary no algorithm writes with



def memfd_with(name: str, data: bytes) -> int:
    """A sealed memfd holding `data` (for small state: a descriptor carries it across a
    restart); the caller owns the descriptor."""
    fd = os.memfd_create(f"zramfs-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW |
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class StateError(Exception):
    """Kept state this daemon cannot adopt (corrupt, or from an incompatible version). The fds
    stay kept: nothing is destroyed without an explicit command."""


@dataclass
class DeviceRecord:
    id: int
    generation: int
    openers: int = 0
    settings: list[tuple[str, str]] = field(default_factory=list)


class Record:
    """The `devices` memfd: `write(obj)` / `read()`, crash-safe (two halves)."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("zramfs-devices", os.MFD_CLOEXEC)
            os.ftruncate(fd, 2 * _HALF)
        self.fd = fd
        self.seq = 0

    def read(self) -> dict:
        best: tuple[int, dict] | None = None
        for half in range(2):
            raw = os.pread(self.fd, _HALF, half * _HALF)
            if len(raw) < _HEADER.size:
                continue
            magic, version, _, seq, length, crc = _HEADER.unpack_from(raw)
            if magic != RECORD_MAGIC:
                continue
            if version != RECORD_VERSION:
                raise StateError(f"device record version {version}, this zramfs reads "
                                 f"{RECORD_VERSION}")
            body = raw[_HEADER.size:_HEADER.size + length]
            if len(body) != length or zlib.crc32(body) != crc:
                continue                    # a torn write: the other half is whole
            if best is None or seq > best[0]:
                try:
                    best = (seq, json.loads(body))
                except ValueError:
                    continue
        if best is None:
            raise StateError("no readable device record")
        self.seq = best[0]
        return best[1]

    def write(self, obj: dict) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        if _HEADER.size + len(body) > _HALF:
            raise StateError("device record too large")
        self.seq += 1
        header = _HEADER.pack(RECORD_MAGIC, RECORD_VERSION, 0, self.seq, len(body),
                              zlib.crc32(body))
        os.pwrite(self.fd, header + body, (self.seq % 2) * _HALF)


class State:
    """The daemon's kept state. `keep(name, fd)` and `drop(name)` are the service manager's
    (zramfs.service.fdstore's store and remove); `inherited` is what it handed this daemon."""

    def __init__(self, inherited: dict[str, list[int]],
                 keep: Callable[[str, int], None], drop: Callable[[str], None],
                 settings: frozenset[str]) -> None:
        self._keep = keep
        self.settings = settings            # the attributes whose stores are kept, in order
        self._drop_now = drop
        self.inherited = inherited
        self.devices: dict[int, DeviceRecord] = {}
        self.generations: dict[int, int] = {}
        self.seq: dict[int, int] = {}          # per device id: the seq of its kept pair
        self._pairs: dict[str, int] = {}       # the kept pairs' names and fds (the metas')
        self._own: dict[str, int] = {}         # of those, the fds this module made (dicts)
        fds = inherited.get(RECORD_NAME)
        self.adopting = bool(fds)
        # While the devices are re-created from the record, it is not written, nothing kept
        # is dropped (the drops wait in _deferred) and the new pairs are not stored yet: a
        # failed adoption leaves the store as the daemon before left it, for a fixed daemon
        # to adopt, and no copy of a device taken over before the failure (a supervisor
        # restarting a refused daemon every second would add one each time).
        self._replaying = self.adopting
        self._deferred: list[str] = []
        self.record = Record(fds[0] if fds else None)
        if not fds:
            self._keep(RECORD_NAME, self.record.fd)

    @staticmethod
    def owns(name: str) -> bool:
        """Whether a kept descriptor's name is one of this module's."""
        return name == RECORD_NAME or _KEPT.fullmatch(name) is not None

    def current(self) -> dict[str, int]:
        """What this daemon keeps now, by name (for a re-exec, which has no manager)."""
        out = {RECORD_NAME: self.record.fd}
        if self._replaying:     # not adopted (yet, or refused): what was given, not copies
            out.update({name: fds[0] for name, fds in self.inherited.items()
                        if _KEPT.fullmatch(name)})
        else:
            out.update(self._pairs)
        return out

    # --- adoption ------------------------------------------------------------------------------

    def load(self) -> list[DeviceRecord]:
        """The devices of the daemon before, to re-create in this order. StateError if the
        record cannot be read."""
        obj = self.record.read()
        try:
            self.generations = {int(k): int(v) for k, v in obj["generations"].items()}
            for d in obj["devices"]:
                rec = DeviceRecord(int(d["id"]), int(d["generation"]), int(d["openers"]),
                                   [(str(a), str(t)) for a, t in d["settings"]])
                self.devices[rec.id] = rec
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"device record unreadable: {e!r}") from None
        return sorted(self.devices.values(), key=lambda r: r.id)

    def kept_pair(self, dev_id: int) -> tuple[int, int] | None:
        """The (table, pool) fds kept for device `dev_id`, the newest complete pair."""
        pairs: dict[int, dict[str, int]] = {}
        for name, fds in self.inherited.items():
            m = _KEPT.fullmatch(name)
            if m and int(m.group(1)) == dev_id and fds:
                pairs.setdefault(int(m.group(2)), {})[m.group(3)] = fds[0]
        for seq in sorted(pairs, reverse=True):
            if "table" in pairs[seq] and "pool" in pairs[seq]:
                self.seq[dev_id] = seq
                return pairs[seq]["table"], pairs[seq]["pool"]
        return None

    def kept_dictionaries(self, dev_id: int) -> list[tuple[int, bytes]]:
        """The dictionaries kept beside device `dev_id`'s pair (kept_pair picks it), as
        (priority, bytes): DECODE_ONLY for those no algorithm wrote with any more. StateError
        if they cannot be read."""
        fds = self.inherited.get(f"zram{dev_id}.{self.seq.get(dev_id)}.dicts")
        if not fds:
            return []
        try:
            data = os.pread(fds[0], os.fstat(fds[0]).st_size, 0)
        except OSError as e:
            raise StateError(f"zram{dev_id}: kept dictionaries: {e.strerror}") from None
        if not data.startswith(DICTS_MAGIC):
            raise StateError(f"zram{dev_id}: kept dictionaries: not zramfs's")
        out, at = [], len(DICTS_MAGIC)
        while at < len(data):
            if at + _DICT.size > len(data):
                raise StateError(f"zram{dev_id}: kept dictionaries: cut short")
            prio, n = _DICT.unpack_from(data, at)
            at += _DICT.size
            if at + n > len(data):
                raise StateError(f"zram{dev_id}: kept dictionaries: cut short")
            out.append((prio, data[at:at + n]))
            at += n
        return out

    def kept_backing(self, dev_id: int) -> int | None:
        """The backing device's descriptor kept beside device `dev_id`'s pair (kept_pair
        picks it; None: it had none, or a daemon before this one did not keep it). Still
        this module's: the caller duplicates it."""
        fds = self.inherited.get(f"zram{dev_id}.{self.seq.get(dev_id)}.backing")
        return fds[0] if fds else None

    # --- what the daemon tells it ----------------------------------------------------------------

    def restored(self) -> None:
        """Every device of the record is re-created: from now on the record follows them. The
        new pairs are stored now, then the drops that waited go, with every pair inherited and
        not adopted (the pairs just copied, and those of devices no longer in the record)."""
        self._replaying = False
        for name, fd in self._pairs.items():     # the copies, kept before the originals go
            self._keep(name, fd)
        waited = self._deferred + [name for name in self.inherited if _KEPT.fullmatch(name)]
        self._deferred = []
        for name in dict.fromkeys(waited):
            self._let_go(name)
        self.save()

    def stop(self) -> None:
        """The daemon stops for good: nothing is kept for another. After a failed adoption,
        everything stays kept."""
        if not self._replaying:
            self._drop_now(RECORD_NAME)

    def give_up(self) -> None:
        """After a refused adoption, told to stop: nothing kept is wanted any more, and the
        manager forgets it all."""
        names = [RECORD_NAME, *self.inherited, *self._pairs, *self._deferred]
        self._replaying = False
        self._deferred = []
        for name in dict.fromkeys(names):
            self._let_go(name)

    def _let_go(self, name: str) -> None:
        """The manager forgets `name` and an fd of it inherited here is closed; while the
        record is replayed, only once adoption succeeds (a failed one keeps everything)."""
        if self._replaying:
            self._deferred.append(name)
            return
        self._drop_now(name)
        self._pairs.pop(name, None)
        for fd in self.inherited.pop(name, []):
            os.close(fd)
        if name in self._own:
            os.close(self._own.pop(name))

    def save(self) -> None:
        if self._replaying:
            return
        self.record.write({
            "generations": {str(k): v for k, v in self.generations.items()},
            "devices": [{"id": r.id, "generation": r.generation, "openers": r.openers,
                         "settings": r.settings} for r in self.devices.values()],
        })

    def added(self, dev_id: int, generation: int) -> None:
        self.generations[dev_id] = generation
        self.devices[dev_id] = DeviceRecord(dev_id, generation)
        self.save()

    def removed(self, dev_id: int) -> None:
        self.devices.pop(dev_id, None)
        self.save()

    def stored(self, dev_id: int, attr: str, text: str) -> None:
        """A store to an attribute succeeded: a setting (one of `settings`, from the device's
        attribute table) goes in the record after those before it, reset clears them."""
        rec = self.devices.get(dev_id)
        if rec is None:
            return
        if attr == "reset":
            rec.settings.clear()
        elif attr in self.settings:
            rec.settings.append((attr, text))
        else:
            return
        self.save()

    def opened(self, dev_id: int, delta: int) -> None:
        rec = self.devices.get(dev_id)
        if rec is not None:
            rec.openers = max(0, rec.openers + delta)
            self.save()

    def keep_meta(self, dev_id: int, fds: tuple[int, int],
                  dictionaries: list[tuple[int, bytes]] | None = None,
                  backing: int | None = None) -> None:
        """An initialised device's (table, pool) fds, the dictionaries its pages may be
        compressed with ((priority, bytes), as kept_dictionaries gives them) and its backing
        device's fd (the caller's, as the pair's are), kept under the next seq; then the
        previous ones go."""
        seq = self.seq.get(dev_id, 0) + 1
        kept = list(zip(("table", "pool"), fds))
        if backing is not None:
            kept.append(("backing", backing))
        if dictionaries:
            data = DICTS_MAGIC + b"".join(_DICT.pack(prio, len(d)) + d for prio, d in dictionaries)
            fd = memfd_with(f"zram{dev_id}-dicts", data)
            self._own[f"zram{dev_id}.{seq}.dicts"] = fd
            kept.append(("dicts", fd))
        for kind, fd in kept:
            if not self._replaying:               # else adopted() stores it
                self._keep(f"zram{dev_id}.{seq}.{kind}", fd)
            self._pairs[f"zram{dev_id}.{seq}.{kind}"] = fd
        old = self.seq.get(dev_id)
        self.seq[dev_id] = seq
        if old is not None:
            self._let_go_seq(dev_id, old)

    def drop_meta(self, dev_id: int) -> None:
        """The device was reset or removed: its pages are no one's any more."""
        seq = self.seq.pop(dev_id, None)
        if seq is not None:
            self._let_go_seq(dev_id, seq)

    def _let_go_seq(self, dev_id: int, seq: int) -> None:
        for kind in ("table", "pool", "dicts", "backing"):
            name = f"zram{dev_id}.{seq}.{kind}"
            if kind in ("table", "pool") or name in self._pairs or name in self.inherited:
                self._let_go(name)
