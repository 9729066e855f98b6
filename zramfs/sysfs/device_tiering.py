"""A device's tiering attributes (zram.rst's writeback and recompression, and zramfs's eviction):
the backing device, idle marking, writeback and its limits, recompression algorithms and the
recompress attribute, as the kernel's, with their errnos. `Device` (zramfs.sysfs.device) takes
them in as `Tiering`, whose methods use the device's own state (`meta`, `name`, `initialised`,
`_meta_or_einval`, `_job`).

A writeback or recompression runs in worker threads through `Disk.call` (zramfs.zram._tiering);
one at a time a device (EAGAIN), cancelled by a reset, a removal, a graceful restart or a
signal to its writer (`cancel_tiering`).
"""
from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from zramfs.sysfs import files, interrupts, kstrto, tiering_args as tiering
from zramfs.sysfs.kstrto import fail
from zramfs.zcomp import _zcomp
from zramfs.zram import _backing, _tiering, _zram
from zramfs.zram._backing import Backing, BackingError

T = TypeVar("T")

log = logging.getLogger("zramfs.sysfs.device")

WB_BATCH_MAX = _backing.MAX_BATCH   # writes in flight at once, at most
AGE_MAX = 2**32 - 1           # idle ages are kept in 32 bits of seconds


class Tiering:
    """The tiering half of a Device: its settings (reset by `_tiering_defaults`) and the
    attributes' store and show methods."""

    def _tiering_defaults(self) -> None:
        """Writeback and recompression settings, as after the kernel's reset."""
        self.backing: Backing | None = None
        self.secondary: dict[int, tuple[str, int | None]] = {}   # priority -> (name, level)
        self.dictionaries: dict[int, tuple[str, bytes]] = {}     # priority -> (path, content)
        # What a daemon before this one kept (state.kept_dictionaries), while adopting: by
        # priority, the copy used where a dict= path no longer reads; and every one, for the
        # pages written with them.
        self.kept_dictionaries: list[tuple[int, bytes]] = []
        # ... and the descriptor of the backing device its pages were written back to.
        self.kept_backing: int | None = None
        self.wb_limit = 0              # pages, while wb_limit_enable
        self.wb_limit_enable = False
        self.evict = False             # zswap-style eviction over mem_limit (an extension)
        self.compressed_wb = False     # writeback of objects as stored (compressed_writeback)
        self.wb_batch = _zram.WB_BATCH   # writeback I/Os in flight at once
        self.tiering_busy = False      # a writeback or recompression is running

    async def _store_backing_dev(self, text: str) -> None:
        """The path is opened and checked in a worker thread, never here: a path inside the
        tree is answered by this very thread, which would wait on itself. One inside the tree
        (or a loop device over a file in it) is refused."""
        path = text.strip()
        if self.initialised:
            raise fail(errno.EBUSY, f"{self.name} is initialised; set backing_dev before disksize")
        try:
            if self.kept_backing is not None:
                backing = await trio.to_thread.run_sync(self._kept_backing_device, path)
            else:
                backing = await trio.to_thread.run_sync(open_backing, path, self.tree)
        except BackingError as e:
            log.warning("%s: backing_dev %s refused: %s", self.name, path, e.strerror)
            raise fail(e.errno or errno.EINVAL, str(e)) from None
        if self.initialised:                  # disksize was written meanwhile
            backing.close()
            raise fail(errno.EBUSY, f"{self.name} is initialised; set backing_dev before disksize")
        if self.backing is not None:
            self.backing.close()
        self.backing = backing
        log.info("%s: backing device %s, %d blocks", self.name, path, backing.nr_blocks)

    def _kept_backing_device(self, path: str) -> Backing:
        """While adopting, in a worker thread: the backing device open before the restart
        (its kept descriptor), never `path` opened again. Written-back pages are in that
        file; the path may now lead to another (the file moved, a fresh one made in its
        place), whose blocks would read as zeros. The log says when it does."""
        kept = os.fstat(self.kept_backing)
        backing = Backing(path, os.dup(self.kept_backing))
        if os.path.abspath(path).startswith(f"{self.tree}/"):
            now = None                    # a stat would wait on this daemon, which replays
        else:
            try:
                now = os.stat(path)
            except OSError:
                now = None
        if now is None or files.file_id(now) != files.file_id(kept):
            log.warning("%s: backing_dev %s now leads %s; the backing device open before "
                        "the restart is kept, with the pages written back to it", self.name,
                        path, "nowhere" if now is None else "to another file")
        return backing

    def _show_backing_dev(self) -> str:
        return f"{self.backing.path if self.backing is not None else 'none'}\n"

    async def _tiering_job(self, what: str, fn, *args) -> int:
        """One writeback or recompression a time (EAGAIN otherwise), in a worker thread so
        requests, served by their own threads, go on meanwhile; ECANCELED where
        cancel_tiering() stopped it (what it did is kept): a reset, a removal, a graceful
        restart, or a signal to its writer (the kernel's FUSE INTERRUPT)."""
        if self.tiering_busy:
            raise fail(errno.EAGAIN, f"{self.name}: a writeback or recompression is running")
        self.tiering_busy = True
        _tiering.cancel(self.meta, False)
        try:
            with interrupts.stoppable(self.cancel_tiering):     # its writer's Ctrl-C
                done = await self._job(fn, *args)
        except OSError as e:
            if e.errno == errno.ECANCELED:
                log.info("%s: %s: %s", self.name, what, e.strerror)
            raise
        finally:
            self.tiering_busy = False
        log.info("%s: %s: %d pages", self.name, what, done)
        return done

    def cancel_tiering(self) -> None:
        """Stops the running writeback or recompression at its next batch, if one runs."""
        if self.tiering_busy and self.meta is not None:
            _tiering.cancel(self.meta)
            log.info("%s: cancelling the running writeback or recompression", self.name)

    async def _store_idle(self, text: str) -> None:
        self._meta_or_einval()
        age = _parsed(tiering.parse_idle, text)
        # An age past what 32 bits of seconds hold marks what the largest age marks: nothing.
        await self._job(_tiering.mark_idle, None if age is None else min(age, AGE_MAX))

    async def _store_writeback(self, text: str) -> None:
        self._meta_or_einval()
        if self.backing is None:
            raise fail(errno.ENODEV, f"{self.name} has no backing device")
        wb = _parsed(tiering.parse_writeback, text)
        await self._tiering_job(f"writeback {text.strip()}", _tiering.writeback, wb.mode,
                                wb.ranges)

    def _store_writeback_limit(self, text: str) -> None:
        self.wb_limit = kstrto.parse_writeback_limit(text)
        if self.meta is not None:
            _tiering.set_wb_limit(self.meta, self.wb_limit, self.wb_limit_enable)

    def _show_writeback_limit(self) -> str:
        return f"{_tiering.wb_limit(self.meta) if self.meta is not None else self.wb_limit}\n"

    def _store_writeback_limit_enable(self, text: str) -> None:
        self.wb_limit_enable = kstrto.parse_writeback_limit_enable(text)
        if self.meta is not None:
            pages = _tiering.wb_limit(self.meta)
            _tiering.set_wb_limit(self.meta, pages, self.wb_limit_enable)

    async def _store_writeback_evict(self, text: str) -> None:
        self.evict = kstrto.kstrtoul(text, 10) != 0
        if self.meta is not None:
            _tiering.set_eviction(self.meta, self.evict)
            await self._job(_tiering.evict_to_limit)

    def _store_writeback_batch_size(self, text: str) -> None:
        """How many writeback I/Os are in flight at once (kernel 6.19): 1 or more, at any
        time; above WB_BATCH_MAX, WB_BATCH_MAX."""
        size = kstrto.kstrtoull(text, 10)
        if size == 0:
            raise fail(errno.EINVAL, "writeback_batch_size must be 1 or more")
        self.wb_batch = min(size, WB_BATCH_MAX)
        if self.meta is not None:
            _tiering.set_wb_batch(self.meta, self.wb_batch)

    def _store_compressed_writeback(self, text: str) -> None:
        """Before disksize only, as the kernel's (EBUSY after)."""
        value = kstrto.kstrtoull(text, 10) != 0
        if self.initialised:
            raise fail(errno.EBUSY, f"{self.name} is initialised; reset it first")
        self.compressed_wb = value

    def _show_evict_stat(self) -> str:
        return "{:8}\n".format(self.evicted())

    def bd_stat(self) -> tuple[int, int, int]:
        """bd_count bd_reads bd_writes, 4 KiB units; zeros without a backing device."""
        return self.backing.bd_stat() if self.backing is not None else (0, 0, 0)

    def _show_bd_stat(self) -> str:
        return "{:8} {:8} {:8}\n".format(*self.bd_stat())

    def _store_recomp_algorithm(self, text: str) -> None:
        if self.initialised:
            raise fail(errno.EBUSY, f"{self.name} is initialised; reset it first")
        try:
            prio, name, level = tiering.parse_recomp_algorithm(text)
            _zcomp.check_algorithm(name)
            if level is not None:
                _zcomp.check_level(name, level)
        except (ValueError, _zcomp.CompressorError) as e:
            raise fail(errno.EINVAL, str(e)) from None
        self.secondary[prio] = (name, level)

    def _show_recomp_algorithm(self) -> str:
        return "".join(f"#{prio}: {choices_line(_zcomp.ALGORITHMS.names(), current)}"
                       for prio, (current, _) in sorted(self.secondary.items()))

    async def _store_recompress(self, text: str) -> None:
        self._meta_or_einval()
        r = _parsed(tiering.parse_recompress, text)
        if not self.secondary:
            raise fail(errno.EINVAL, f"{self.name} has no recomp_algorithm")
        prio = r.priority or 0
        if r.algo is not None:
            prio = next((p for p, (n, _) in self.secondary.items() if n == r.algo), -1)
        if prio and prio not in self.secondary:
            raise fail(errno.EINVAL, f"no recompression algorithm {r.algo or r.priority}")
        await self._tiering_job(f"recompress {text.strip()}", _tiering.recompress, r.mode,
                                r.threshold, r.max_pages, prio)


def _parsed(parse: Callable[[str], T], text: str) -> T:
    """`parse(text)`, a tiering_args parser's ValueError as the kernel's EINVAL with its
    reason."""
    try:
        return parse(text)
    except ValueError as e:
        raise fail(errno.EINVAL, str(e)) from None


def open_backing(path: str, tree: Path | None) -> Backing:
    """A backing device, opened in a worker thread. BackingError(EINVAL) for a path inside
    the tree: writeback would go through this daemon's own devices."""
    if files.inside_tree(path, tree):
        raise BackingError(errno.EINVAL, f"{path}: lies inside the zramfs tree at {tree}")
    try:
        fd = files.open_checked(path, os.O_RDWR, block_ok=True)
    except OSError as e:
        raise BackingError(e.errno, f"{path}: {e.strerror}") from None
    return Backing(path, fd)


def choices_line(names: list[str], current: str) -> str:
    """The kernel's list of choices, the one in use in brackets: `lz4 [zstd] \\n`."""
    return "".join(f"[{n}] " if n == current else f"{n} " for n in names) + "\n"
