"""zram devices: their attributes, with the kernel's formats and errnos, and their lifetime.

A `Device` is what /sys/block/zramN describes. Its data path is a `Disk` (zramfs.zram._zram) that
lives as long as the device; writing disksize creates a `Meta` (slot table, pool, compressor
streams) and attaches it, reset detaches it, waits until no request or maintenance job holds
it any more and only then destroys it (docs/design.md, hazard 1). Maintenance (compaction,
idle, writeback, recompression, eviction) runs in worker threads through `Disk.call`, which
holds the same reference a request holds. Everything else here runs on the trio thread: code
between two awaits is atomic, which is the one rule that makes the bookkeeping safe.

    dev = Device(0)
    await dev.store("disksize", "1G")
    dev.show("mm_stat")

Where the daemon keeps state for a restart (zramfs.sysfs.record), a device tells it of each setting
stored and each meta made or freed; `Device.restore` builds one back from what the daemon
before this one kept. The set of devices (hot_add, hot_remove) is zramfs.sysfs.hotplug's;
the tiering attributes (backing_dev, writeback, recompress and theirs) are
zramfs.sysfs.device_tiering's `Tiering`, which `Device` takes in.
"""
from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path

import trio

from zramfs.sysfs import files, kstrto
from zramfs.sysfs.device_tiering import Tiering, choices_line
from zramfs.zcomp import _zcomp
from zramfs.zpool import _alloc
from zramfs.zram import _dedup, _tiering
from zramfs.zpool._alloc import PoolImageError, PoolInPlaceError
from zramfs.zram._zram import Disk, Meta, TableImageError
from zramfs.sysfs.record import DECODE_ONLY, DeviceRecord, State, StateError

log = logging.getLogger(__name__)

PAGE = kstrto.PAGE_SIZE
DRAIN_POLL = 0.001


fail = kstrto.fail                 # the error an attribute store or show gives back


class Device(Tiering):
    """One zram device; `store`/`show` are its sysfs attributes."""

    def __init__(self, dev_id: int, tree: Path | None = None,
                 before_init: Callable[[], object] | None = None, generation: int = 1,
                 state: State | None = None) -> None:
        self.id = dev_id
        self.state = state             # where its settings and memory are kept for a restart
        self.name = f"zram{dev_id}"
        self.generation = generation   # tells this device from earlier ones with its id
        self.tree = tree               # the mounted tree, whose paths backing_dev refuses
        self.before_init = before_init  # the daemon's: its memory budget, looked at again
        self.disk = Disk(dev_id, generation)
        self.algorithm = _zcomp.DEFAULT_ALGORITHM
        self.level: int | None = None
        self.backend = _alloc.DEFAULT_BACKEND   # the allocator: zsmalloc or zbud (zswap's zpool)
        self.mem_limit = 0
        self.dedup = False             # identical pages share one object (an extension)
        self.openers = 0               # open file handles on dev/zramN
        self.busy = False              # a reset or removal is draining
        self.removed = False
        self._tiering_defaults()

    # --- state ---------------------------------------------------------------------------------

    @property
    def meta(self) -> Meta | None:
        return self.disk.meta

    @property
    def initialised(self) -> bool:
        return self.disk.meta is not None

    @property
    def disksize(self) -> int:
        return self.disk.meta.disksize if self.disk.meta is not None else 0

    def init(self, disksize: int) -> None:
        """Creates the table, pool and streams now, never on the request path (docs/design.md, hazard 4)."""
        self._attach(self._new_meta(disksize))

    def _new_meta(self, disksize: int, kept: tuple[int, int] | None = None) -> Meta:
        """A meta of the device's settings: new, or the `kept` (table, pool) fds adopted in
        place (Meta's `kept`)."""
        if self.initialised or self.busy:
            raise fail(errno.EBUSY, f"{self.name} is already initialised")
        disksize = -(-disksize // PAGE) * PAGE
        if self.before_init is not None:
            self.before_init()
        try:
            meta = Meta(disksize, self.algorithm, self.level, backend=self.backend,
                        name=self.name, backing=self.backing, secondary=self.secondary,
                        dictionaries={p: data for p, (_, data) in self.dictionaries.items()},
                        older=tuple(d for _, d in self._older_dictionaries()),
                        compressed_wb=self.compressed_wb, kept=kept)
        except MemoryError as e:
            raise fail(errno.ENOMEM, str(e)) from None
        except _zcomp.CompressorError as e:
            raise fail(errno.EINVAL, str(e)) from None
        return meta

    def _older_dictionaries(self) -> list[tuple[int, bytes]]:
        """The kept dictionaries no algorithm writes with now, each once: (DECODE_ONLY,
        bytes)."""
        current = [data for _, data in self.dictionaries.values()]
        older: list[bytes] = []
        for _, data in self.kept_dictionaries:
            if data not in current and data not in older:
                older.append(data)
        return [(DECODE_ONLY, data) for data in older]

    def _attach(self, meta: Meta) -> None:
        meta.mem_limit = self.mem_limit
        if self.dedup:
            _dedup.enable(meta)        # before attach (after take_over: counts from the table)
        _tiering.set_wb_limit(meta, self.wb_limit, self.wb_limit_enable)
        _tiering.set_eviction(meta, self.evict)
        _tiering.set_wb_batch(meta, self.wb_batch)
        self.disk.attach(meta)
        if self.state is not None:
            self.state.keep_meta(self.id, meta.state_fds,
                                 [(p, data) for p, (_, data) in sorted(self.dictionaries.items())]
                                 + self._older_dictionaries(),
                                 self.backing.fd if self.backing is not None else None)
        log.info("%s: disksize %d, %s", self.name, meta.disksize, self.algorithm)

    async def restore(self, record: DeviceRecord) -> None:
        """The device as the daemon before this one left it: its settings replayed in order,
        and at disksize its kept table and pool adopted in place (Meta(kept=...)), or copied
        where the pool cannot be (Meta.take_over). StateError when neither can be done; the
        kept fds stay kept either way."""
        kept = self.state.kept_pair(self.id) if self.state is not None else None
        if kept is not None:
            self.kept_dictionaries = self.state.kept_dictionaries(self.id)
            self.kept_backing = self.state.kept_backing(self.id)
        for attr, text in record.settings:
            if attr != "disksize":
                try:
                    await self.store(attr, text)
                except OSError as e:
                    raise StateError(f"{self.name}: {attr} {text!r}: {e.strerror}") from None
                continue
            disksize = kstrto.parse_disksize(text)
            if kept is not None:
                meta = await trio.to_thread.run_sync(self._adopt_meta, disksize, kept)
            else:
                log.warning("%s: no kept memory: it starts empty", self.name)
                meta = self._new_meta(disksize)
            self._attach(meta)
            self.kept_dictionaries, self.kept_backing = [], None
            if self.state is not None:
                self.state.stored(self.id, attr, text)

    def _adopt_meta(self, disksize: int, kept: tuple[int, int]) -> Meta:
        """The kept device in a meta: in place, whatever its zpool, else (the pool's old
        address taken in this process) copied. StateError if neither."""
        try:
            try:
                meta = self._new_meta(disksize, kept)
            except PoolInPlaceError as e:
                log.warning("%s: the kept pool is copied, not adopted in place: %s",
                            self.name, e)
                return self._copied_meta(disksize, kept)
        except (TableImageError, PoolImageError) as e:
            raise StateError(f"{self.name}: {e}") from None
        except OSError as e:
            raise StateError(f"{self.name}: {e.strerror}") from None
        pages, lost, shared = meta.adopted
        if lost or (shared and not self.dedup):
            meta.destroy()
            raise StateError(f"{self.name}: {lost} of {pages + lost} pages are on blocks of "
                             "the backing device it cannot give again" if lost else
                             f"{self.name}: {shared} slots share objects and dedup is off")
        log.info("%s: adopted %d pages in place", self.name, pages)
        return meta

    def _copied_meta(self, disksize: int, kept: tuple[int, int]) -> Meta:
        meta = self._new_meta(disksize)
        if self.dedup:
            _dedup.enable(meta)    # first: take_over keeps shared objects shared
        try:
            pages, lost = meta.take_over(*kept)
        except BaseException:
            meta.destroy()
            raise
        if lost:
            # A page not copied would read back as zeros: hold it all instead (the kept pair
            # stays), for memory to be freed or the fault to be fixed.
            meta.destroy()
            raise StateError(f"{self.name}: {lost} of {pages + lost} pages could not be "
                             "copied (no memory, or a pointer out of bounds)")
        log.info("%s: adopted %d pages, copied", self.name, pages)
        return meta

    async def reset(self) -> None:
        """Stops new requests, waits for those in flight, then frees (hazard 1). The
        attributes go back to their defaults, as the kernel's reset does."""
        if self.busy:
            raise fail(errno.EBUSY, f"{self.name} is being reset")
        self.busy = True
        self.cancel_tiering()           # a long writeback or recompression holds the drain
        try:
            if self.initialised:
                self.disk.detach()
                while self.disk.in_flight:
                    await trio.sleep(DRAIN_POLL)
                meta = self.disk.release()
                if self.state is not None:
                    self.state.drop_meta(self.id)
                await trio.to_thread.run_sync(meta.destroy)
            if self.backing is not None:
                self.backing.close()
            self.algorithm, self.level, self.mem_limit = _zcomp.DEFAULT_ALGORITHM, None, 0
            self.backend = _alloc.DEFAULT_BACKEND
            self.dedup = False
            self._tiering_defaults()
        finally:
            self.busy = False
        log.info("%s: reset", self.name)

    # --- attributes ----------------------------------------------------------------------------

    def show(self, attr: str) -> str:
        return ATTRIBUTES[attr].show(self)

    async def store(self, attr: str, text: str) -> None:
        a = ATTRIBUTES[attr]
        if a.store is None:
            raise fail(errno.EACCES, f"{attr} is read-only")
        result = a.store(self, text)
        if result is not None:
            await result
        if self.state is not None:
            self.state.stored(self.id, attr, text)

    def _store_disksize(self, text: str) -> None:
        self.init(kstrto.parse_disksize(text))

    def _store_comp_algorithm(self, text: str) -> None:
        name = text.strip()
        if self.initialised:
            raise fail(errno.EBUSY, f"{self.name} is initialised; reset it first")
        try:
            _zcomp.check_algorithm(name)
        except _zcomp.CompressorError as e:
            raise fail(errno.EINVAL, str(e)) from None
        if name != self.algorithm:
            self.algorithm, self.level = name, None

    def _show_comp_algorithm(self) -> str:
        return choices_line(_zcomp.ALGORITHMS.names(), self.algorithm)

    def _store_zpool(self, text: str) -> None:
        """The allocator backend, before disksize, as zswap's `zpool` parameter chose one."""
        name = text.strip()
        if self.initialised:
            raise fail(errno.EBUSY, f"{self.name} is initialised; reset it first")
        if name not in _alloc.BACKENDS.names():
            raise fail(errno.EINVAL, f"unknown allocator {name!r}")
        self.backend = name

    def _show_zpool(self) -> str:
        return choices_line(_alloc.BACKENDS.names(), self.backend)

    async def _store_algorithm_params(self, text: str) -> None:
        """`[priority=N | algo=NAME] [level=N] [dict=PATH]`: the primary algorithm's (priority
        0) or a recompression algorithm's. A dictionary (zstd's) is read in a worker thread,
        never here (the path could lie in the tree), and prepared when disksize is written."""
        if self.initialised:
            raise fail(errno.EBUSY, f"{self.name} is initialised; reset it first")
        params: dict[str, str] = {}
        for token in text.split():
            key, sep, value = token.partition("=")
            if not sep or key not in ("priority", "algo", "level", "dict"):
                raise fail(errno.EINVAL, f"unknown parameter {token!r}")
            params[key] = value
        names = {0: self.algorithm} | {p: n for p, (n, _) in self.secondary.items()}
        if "priority" in params:
            prio = kstrto.kstrtoint(params["priority"], 10)     # its errno, as the kernel's
        else:
            prio = next((p for p, n in names.items() if n == params.get("algo", self.algorithm)),
                        -1)
        if prio not in names or params.get("algo", names.get(prio)) != names.get(prio):
            raise fail(errno.EINVAL, f"no algorithm matches {text.strip()!r}")
        level = kstrto.kstrtoint(params["level"], 10) if "level" in params else None
        try:
            if level is not None:
                _zcomp.check_level(names[prio], level)
        except _zcomp.CompressorError as e:
            raise fail(errno.EINVAL, str(e)) from None
        if "dict" in params:
            if names[prio] != "zstd":
                raise fail(errno.EINVAL, f"{names[prio]} takes no dictionary")
            try:
                data = await trio.to_thread.run_sync(files.read_outside_tree, params["dict"],
                                                     self.tree)
            except OSError as e:
                data = self._kept_dictionary(prio, params["dict"], e.strerror)
                if data is None:
                    log.warning("%s: dict %s refused: %s", self.name, params["dict"], e.strerror)
                    raise fail(e.errno or errno.EINVAL,
                               f"{params['dict']}: {e.strerror}") from None
            data = self._unclashing(prio, params["dict"], data)
            if self.initialised:              # disksize was written meanwhile
                raise fail(errno.EBUSY, f"{self.name} is initialised; reset it first")
            self.dictionaries[prio] = (params["dict"], data)
        if level is None:
            return
        if prio == 0:
            self.level = level
        else:
            self.secondary[prio] = (names[prio], level)

    def _kept_dictionary(self, prio: int, path: str, why: str) -> bytes | None:
        """While adopting: the kept copy of the dictionary of `prio`, where its path no longer
        reads (None: no copy)."""
        data = next((d for p, d in self.kept_dictionaries if p == prio), None)
        if data is not None:
            log.warning("%s: dict %s: %s; the copy kept from before the restart is used",
                        self.name, path, why)
        return data

    def _unclashing(self, prio: int, path: str, data: bytes) -> bytes:
        """`data`, or while adopting the kept copy of the dictionary of `prio` where `data`
        is another dictionary with the name of a kept one (a frame names its dictionary by
        that name, _zcomp.dictionary_name), or with its zstd id (frames written before names
        carry that id alone): two such would read pages wrongly."""
        new_id, new_name = _zcomp.dictionary_id(data), _zcomp.dictionary_name(data)
        for _, kept in self.kept_dictionaries:
            if kept == data:
                continue
            if new_id and _zcomp.dictionary_id(kept) == new_id:
                why = f"another dictionary with id {new_id}"
            elif _zcomp.dictionary_name(kept) == new_name:
                why = f"another dictionary with the name {new_name:#x}"
            else:
                continue
            data = self._kept_dictionary(prio, path, why)
            if data is None:
                raise fail(errno.EINVAL, f"{path}: {why} wrote this device's pages")
            return data
        return data

    # --- maintenance: what runs on the meta in a worker thread ----------------------------------

    def _meta_or_einval(self) -> Meta:
        if self.meta is None:
            raise fail(errno.EINVAL, f"{self.name} is not initialised")
        return self.meta

    async def _job(self, fn, *args):
        """`fn(meta, *args)`: maintenance (compact, idle, writeback, recompress, evict) in a
        worker thread, holding a reference on the meta as a request does, so reset waits for
        it too (hazard 1); EBUSY once a reset has begun."""
        return await trio.to_thread.run_sync(self.disk.call, fn, *args)

    def _store_dedup(self, text: str) -> None:
        """Before disksize only (EBUSY after), as the kernel's pre-init attributes: the
        index is made with the slot table, and a device cannot start sharing halfway."""
        value = kstrto.kstrtoull(text, 10) != 0
        if self.initialised:
            raise fail(errno.EBUSY, f"{self.name} is initialised; reset it first")
        self.dedup = value

    def dedup_stat(self) -> tuple[int, int, int]:
        """pages_deduplicated bytes_saved hash_table_entries; zeros before disksize or
        with dedup off."""
        return _dedup.stat(self.meta) if self.meta is not None else (0, 0, 0)

    def _show_dedup_stat(self) -> str:
        return "{:8} {:8} {:8}\n".format(*self.dedup_stat())

    async def _store_mem_limit(self, text: str) -> None:
        self.mem_limit = kstrto.parse_mem_limit(text)
        if self.meta is not None:
            self.meta.mem_limit = self.mem_limit
            await self._job(_tiering.evict_to_limit)     # with eviction on, down to it now

    def _store_mem_used_max(self, text: str) -> None:
        kstrto.parse_mem_used_max(text)
        if self.meta is not None:
            self.meta.reset_mem_used_max()

    async def _store_compact(self, text: str) -> None:
        if self.meta is None:
            raise fail(errno.EINVAL, f"{self.name} is not initialised")
        await self._job(Meta.compact)

    async def _store_reset(self, text: str) -> None:
        kstrto.parse_reset(text)
        if self.openers:
            raise fail(errno.EBUSY, f"{self.name} is open")
        await self.reset()

    def mm_stat(self) -> tuple[int, ...]:
        """mm_stat's nine fields; before disksize all 0 but mem_limit, as the kernel's."""
        if self.meta is None:
            return (0, 0, 0, self.mem_limit, 0, 0, 0, 0, 0)
        return self.meta.mm_stat()

    def io_stat(self) -> tuple[int, ...]:
        return self.meta.io_stat() if self.meta is not None else (0, 0, 0, 0)

    def evicted(self) -> int:
        return self.meta.stats().evicted if self.meta is not None else 0

    def _show_mm_stat(self) -> str:
        return "{:8} {:8} {:8} {:8} {:8} {:8} {:8} {:8} {:8}\n".format(*self.mm_stat())

    def _show_io_stat(self) -> str:
        return "{:8} {:8} {:8} {:8}\n".format(*self.io_stat())

    def _show_debug_stat(self) -> str:
        # The kernel's second line is a retired counter (0) and miss_free: slot frees that
        # lost a race with the slot lock; ours wait for the lock, so never miss.
        return "version: 1\n0 {:8}\n".format(0)

    def _show_max_comp_streams(self) -> str:
        # The kernel's old attribute, still read by zramctl's STREAMS column.
        streams = self.meta.stats().streams if self.meta is not None else _zcomp.default_streams()
        return f"{streams}\n"

    def _show_stat(self) -> str:
        return " ".join(f"{v:8}" for v in self.disk.stat()) + "\n"


class Attribute:
    """An attribute's show and store. A `setting` shapes the device: its stores go in the
    restart record and a next daemon replays them in order (zramfs.sysfs.record). Actions
    (idle, writeback, recompress, compact, mem_used_max) are not settings; reset clears them."""
    def __init__(self, show: Callable[[Device], str] | None,
                 store: Callable[[Device, str], object] | None, setting: bool = False) -> None:
        self.show = show if show is not None else _write_only
        self.store = store
        self.readable = show is not None
        self.setting = setting

    @property
    def mode(self) -> int:
        return (0o444 if self.readable else 0) | (0o200 if self.store is not None else 0)


def _write_only(dev: Device) -> str:
    raise fail(errno.EACCES, "write-only attribute")


# Their order is their place in the tree's inode numbers (control.py): a new attribute goes at
# the end, so that the numbers the kernel knows stay the same across versions of the daemon.
ATTRIBUTES: dict[str, Attribute] = {
    "disksize": Attribute(lambda d: f"{d.disksize}\n", Device._store_disksize, setting=True),
    "initstate": Attribute(lambda d: f"{int(d.initialised)}\n", None),
    "reset": Attribute(None, Device._store_reset),
    "comp_algorithm": Attribute(Device._show_comp_algorithm, Device._store_comp_algorithm,
                                setting=True),
    "algorithm_params": Attribute(None, Device._store_algorithm_params, setting=True),
    "mem_limit": Attribute(None, Device._store_mem_limit, setting=True),
    "mem_used_max": Attribute(None, Device._store_mem_used_max),
    "compact": Attribute(None, Device._store_compact),
    "max_comp_streams": Attribute(Device._show_max_comp_streams, None),
    "mm_stat": Attribute(Device._show_mm_stat, None),
    "io_stat": Attribute(Device._show_io_stat, None),
    "debug_stat": Attribute(Device._show_debug_stat, None),
    "stat": Attribute(Device._show_stat, None),
    "backing_dev": Attribute(Device._show_backing_dev, Device._store_backing_dev, setting=True),
    "idle": Attribute(None, Device._store_idle),
    "writeback": Attribute(None, Device._store_writeback),
    "writeback_limit": Attribute(Device._show_writeback_limit, Device._store_writeback_limit,
                                 setting=True),
    "writeback_limit_enable": Attribute(lambda d: f"{int(d.wb_limit_enable)}\n",
                                        Device._store_writeback_limit_enable, setting=True),
    "bd_stat": Attribute(Device._show_bd_stat, None),
    "recomp_algorithm": Attribute(Device._show_recomp_algorithm, Device._store_recomp_algorithm,
                                  setting=True),
    "recompress": Attribute(None, Device._store_recompress),
    # zramfs's own: zswap-style eviction of LRU pages to the backing device over mem_limit.
    "writeback_evict": Attribute(lambda d: f"{int(d.evict)}\n", Device._store_writeback_evict,
                                 setting=True),
    "evict_stat": Attribute(Device._show_evict_stat, None),
    # zramfs's own: the allocator backend, as zswap's zpool parameter.
    "zpool": Attribute(Device._show_zpool, Device._store_zpool, setting=True),
    "compressed_writeback": Attribute(lambda d: f"{int(d.compressed_wb)}\n",
                                      Device._store_compressed_writeback, setting=True),
    "writeback_batch_size": Attribute(lambda d: f"{d.wb_batch}\n",
                                      Device._store_writeback_batch_size, setting=True),
    # zramfs's own: identical pages share one compressed object (a zram patch never merged).
    "dedup": Attribute(lambda d: f"{int(d.dedup)}\n", Device._store_dedup, setting=True),
    "dedup_stat": Attribute(Device._show_dedup_stat, None),
}
# What the restart record keeps of a device (zramfs.sysfs.record): the stores to these.
SETTINGS = frozenset(name for name, a in ATTRIBUTES.items() if a.setting)
