"""The config's devices and their uses (swap, a file system, over a loop device): set up at
start, taken over from the daemon before after a restart, kept up by the periodic work the
config asks for (writeback, recompression), and undone at stop while the devices still
serve. The undo steps are (what, fn) pairs, pushed as each step succeeds and run in reverse.

Trio thread: devices and the tree are touched between awaits only; what may wait on the
tree (losetup, mkswap, swapoff, umount) runs in worker threads.
"""
from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from zramfs.service import loop
from zramfs.service.config import DeviceConfig
from zramfs.sysfs.control import Tree
from zramfs.sysfs.hotplug import Devices

log = logging.getLogger("zramfs.service.daemon")     # the daemon's log lines, as before

UNDO_RETRY = 2.0          # seconds between tries of a shutdown step that failed (swapoff)


class SetUpError(Exception):
    """A device of the config, or its use, could not be set up."""


async def set_up(mountpoint: Path, configs: list[DeviceConfig], devices: Devices, tree: Tree,
                 undo: list[tuple[str, Callable[[], None]]]) -> None:
    """Each device of the config and its use; every step that worked pushes its undo first.
    SetUpError where one fails. A device adopted from the daemon before is kept as it is, with its swap or file
    system (their undo taken over), unless the config now says otherwise and nothing uses
    it: then it is set up anew. What a device in use keeps against the config is logged."""
    for cfg in configs:
        path = mountpoint / "dev" / cfg.name
        dev = devices.by_id.get(cfg.id)
        if dev is not None:
            kept = devices.state.devices[cfg.id].settings if devices.state else []
            left = config_left(cfg, kept)
            if not left:
                log.info("%s: adopted as it was", cfg.name)
            elif dev.openers or dev.busy or loop.loops_of(path):
                log.warning("%s: adopted as it was, in use: the config's %s apply after a "
                            "reset", cfg.name, ", ".join(left))
            else:
                log.warning("%s: not in use, and the config now says %s: set up anew, its "
                            "pages dropped", cfg.name, ", ".join(left))
                try:
                    await dev.store("reset", "1")
                except OSError as e:
                    raise SetUpError(f"{cfg.name}: reset: {e.strerror}") from None
                dev = None
            if dev is not None:
                if cfg.fs_type is not None:
                    inherit_use(path, cfg, undo)
                continue
        try:
            if cfg.id not in devices.by_id:
                tree.add_device(devices.add(cfg.id))
            dev = devices.by_id[cfg.id]
            for attr, value in config_settings(cfg):
                await dev.store(attr, value)
        except OSError as e:
            raise SetUpError(f"{cfg.name}: {e.strerror}") from None
        if cfg.fs_type is None:
            continue
        try:
            lo = await trio.to_thread.run_sync(loop.bind, path)
            undo.append((f"losetup -d {lo}", lambda lo=lo: loop.unbind(lo)))
            if cfg.fs_type == "swap":
                await trio.to_thread.run_sync(loop.swapon, lo, cfg.swap_priority, cfg.options)
                undo.append((f"swapoff {lo}", lambda lo=lo: loop.swapoff(lo)))
                log.info("%s: swap on %s, priority %d", cfg.name, lo, cfg.swap_priority)
            else:
                await trio.to_thread.run_sync(loop.mkfs_and_mount, lo, cfg.fs_type,
                                              cfg.mount_point, cfg.options)
                undo.append((f"umount {cfg.mount_point}",
                             lambda mp=cfg.mount_point: loop.umount(mp)))
                log.info("%s: %s on %s at %s", cfg.name, cfg.fs_type, lo, cfg.mount_point)
        except loop.UseError as e:
            raise SetUpError(f"{cfg.name}: {e}") from None


def config_settings(cfg: DeviceConfig) -> list[tuple[str, str]]:
    """The attribute stores that set up the config's device, in order (disksize last)."""
    out = [("zpool", cfg.zpool), ("dedup", "1" if cfg.dedup else "0"),
           ("comp_algorithm", cfg.algorithm)]
    if "level" in cfg.algorithm_params:
        out.append(("algorithm_params", f"level={cfg.algorithm_params['level']}"))
    if cfg.dictionary is not None:
        out.append(("algorithm_params", f"dict={cfg.dictionary}"))
    for prio, (name, params) in enumerate(cfg.recompression, 1):
        level = f" level={params['level']}" if "level" in params else ""
        out.append(("recomp_algorithm", f"algo={name} priority={prio}{level}"))
        if "dict" in params:
            out.append(("algorithm_params", f"priority={prio} dict={params['dict']}"))
    if cfg.writeback_device is not None:
        out.append(("backing_dev", str(cfg.writeback_device)))
    if cfg.mem_limit:
        out.append(("mem_limit", str(cfg.mem_limit)))
    out.append(("disksize", str(cfg.disksize)))
    return out


def config_left(cfg: DeviceConfig, kept: list[tuple[str, str]]) -> list[str]:
    """What the config sets that a kept device's settings (zramfs.sysfs.record, in order) do not
    have, as "attr=value": by the last value of each attribute, and by the set of values for
    those written several times (algorithm_params, recomp_algorithm). Changes made at run time
    to attributes the config leaves alone are not the config's to undo."""
    def values(settings: list[tuple[str, str]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for attr, value in settings:
            if attr in ("algorithm_params", "recomp_algorithm"):
                out.setdefault(attr, set()).add(value)
            else:
                out[attr] = value
        return out
    have = values(kept)
    have.setdefault("dedup", "0")
    have.setdefault("zpool", DeviceConfig.zpool)      # the default: a record may not name it
    return [f"{attr}={' '.join(sorted(v)) if isinstance(v, set) else v}"
            for attr, v in values(config_settings(cfg)).items() if have.get(attr) != v]


def inherit_use(path: Path, cfg: DeviceConfig,
                   undo: list[tuple[str, Callable[[], None]]]) -> None:
    """The undo of the config's use of `path` that an earlier daemon set up and the kernel
    still has (its loop device, and the swap on it or the mount at cfg.mount_point): a stop
    after a restart undoes it as the daemon that set it up would have."""
    swaps, mounts = loop.swaps(), loop.mounts()
    for lo in loop.loops_of(path):
        if cfg.fs_type == "swap" and lo in swaps:
            what, fn = f"swapoff {lo}", partial(loop.swapoff, lo)
        elif cfg.fs_type != "swap" and Path(mounts.get(lo, "")) == cfg.mount_point:
            what, fn = f"umount {cfg.mount_point}", partial(loop.umount, cfg.mount_point)
        else:
            continue                # someone else's loop device: theirs to undo
        undo.append((f"losetup -d {lo}", partial(loop.unbind, lo)))
        undo.append((what, fn))
        log.info("%s: %s on %s, set up by the daemon before; undone at stop", cfg.name,
                 "swap" if cfg.fs_type == "swap" else cfg.fs_type, lo)


async def periodically(devices: Devices, cfg: DeviceConfig, interval: float, what: str,
                        steps: list[tuple[str, str]]) -> None:
    """Every `interval` seconds, the attribute stores `steps` on the device of `cfg`, while it
    is initialised; a failure is a log line, and the next round comes all the same."""
    while True:
        await trio.sleep(interval)
        dev = devices.by_id.get(cfg.id)
        if dev is None or dev.meta is None:
            continue
        try:
            for attr, value in steps:
                await dev.store(attr, value)
        except OSError as e:
            log.warning("%s: periodic %s: %s", cfg.name, what, e.strerror)


def maintenance(devices: Devices, cfg: DeviceConfig) -> list[Callable[[], Any]]:
    """The periodic work a device's config asks for. Writeback: the pages idle for
    writeback-idle-age, or, with no age, those not accessed since the previous round marked
    everything idle. Recompression: zram-generator's policy (the trailing group of
    compression-algorithm), then everything marked idle for the next round."""
    jobs = []
    if cfg.writeback_interval:
        steps = ([("idle", str(max(1, int(cfg.writeback_idle_age)))), ("writeback", "idle")]
                 if cfg.writeback_idle_age else [("writeback", "idle"), ("idle", "all")])
        jobs.append(partial(periodically, devices, cfg, cfg.writeback_interval, "writeback",
                            steps))
    if cfg.recompress_interval:
        jobs.append(partial(periodically, devices, cfg, cfg.recompress_interval,
                            "recompression", [("recompress", cfg.recompress), ("idle", "all")]))
    return jobs


async def undo_all(undo: list[tuple[str, Callable[[], None]]]
                   ) -> list[tuple[str, Callable[[], None]]]:
    """Every undo step, in reverse; those that failed (logged), for wait_for_holders to try
    again."""
    failed: list[tuple[str, Callable[[], None]]] = []
    for what, fn in reversed(undo):
        try:
            await trio.to_thread.run_sync(fn)
            log.info("%s", what)
        except loop.UseError as e:
            log.error("%s; trying again every %.0f s while the device is held", e, UNDO_RETRY)
            failed.append((what, fn))
    return failed


async def wait_for_holders(mountpoint: Path, force_after: float | None, devices: Devices,
                           failed: list[tuple[str, Callable[[], None]]]) -> None:
    """Devices others still hold open (swap, a mount, a process) are not freed under them: say
    who, and go on serving until they let go, as the kernel refuses to reset a device in use.
    `--force-after` bounds the wait; then their I/O fails from that moment on. Meanwhile the
    undo steps that `failed` (a swapoff whose pages had no room to come back: ENOMEM) are
    tried again: what stopped them may pass (an OOM kill, a limit raised), and nobody else
    would turn that swap off before the daemon ends."""
    held = [d for d in devices.by_id.values() if d.openers]
    if not held:
        return

    async def say_who() -> None:
        for dev in held:
            if dev.openers:
                path = mountpoint / "dev" / dev.name
                who = await trio.to_thread.run_sync(loop.holders, path)
                log.warning("%s is held open by %s; %s", dev.name,
                            ", ".join(who) or "an unknown process",
                            f"waiting up to {force_after:.0f} s" if force_after
                            is not None else "serving it until it is released")

    await say_who()
    # A second SIGTERM or SIGINT must not end the process (the default action) while others
    # still hold pages in it: it only says again who they are.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals, \
            trio.move_on_after(math.inf if force_after is None else force_after):
        async with trio.open_nursery() as waiting:
            async def on_signal() -> None:
                async for signum in signals:
                    log.info("%s: still serving devices in use", signal.Signals(signum).name)
                    await say_who()
            async def retry() -> None:
                while failed:
                    await trio.sleep(UNDO_RETRY)
                    for step in list(failed):
                        try:
                            await trio.to_thread.run_sync(step[1])
                        except loop.UseError as e:
                            log.debug("%s", e)
                        else:
                            log.info("%s (tried again)", step[0])
                            failed.remove(step)
            waiting.start_soon(on_signal)
            waiting.start_soon(retry)
            while any(d.openers for d in held):
                await trio.sleep(0.1)
            waiting.cancel_scope.cancel()
    for dev in held:
        if dev.openers:
            log.warning("%s: still open; its I/O fails from now on (--force-after)", dev.name)
