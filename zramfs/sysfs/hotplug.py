"""The set of devices, as zram-control's hot_add and hot_remove see it: the kernel's id
allocation (lowest free id first), a generation per id (a device file opened before a
hot_remove and a hot_add of the same id must not reach the new device), removal that waits
for a device's requests to drain, and the devices the daemon before this one kept.

    devices = Devices()
    dev = devices.add()
    await dev.store("disksize", "1G")

Where the daemon keeps state for a restart (zramfs.sysfs.record), `Devices(state=...)` tells it of
each device added and removed. Trio thread only.
"""
from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path

from zramfs.sysfs import kstrto
from zramfs.sysfs.device import Device, fail
from zramfs.sysfs.record import DeviceRecord, State

log = logging.getLogger("zramfs.sysfs.device")       # the devices' log lines, as before


class Devices:
    """The set of devices, with the kernel's id allocation (lowest free id first)."""

    def __init__(self, tree: Path | None = None,
                 before_init: Callable[[], object] | None = None,
                 state: State | None = None) -> None:
        self.state = state
        self.by_id: dict[int, Device] = {}
        self.generations: dict[int, int] = {}   # per id: how many devices have had it
        self.retiring: set[int] = set()          # ids of removed devices still draining
        self.tree = tree               # where the daemon mounts them
        self.before_init = before_init  # called before a device is initialised

    def add(self, dev_id: int | None = None) -> Device:
        """A new device: `dev_id`, or the lowest free id as the kernel's hot_add gives."""
        taken = self.by_id.keys() | self.retiring
        if dev_id is None:
            dev_id = next(i for i in range(len(taken) + 1) if i not in taken)
        elif dev_id in taken:
            raise fail(errno.EEXIST, f"zram{dev_id} exists")
        self.generations[dev_id] = self.generations.get(dev_id, 0) + 1
        return self._add(dev_id, self.generations[dev_id])

    def _add(self, dev_id: int, generation: int) -> Device:
        dev = Device(dev_id, self.tree, self.before_init, generation, self.state)
        self.by_id[dev_id] = dev
        if self.state is not None:
            self.state.added(dev_id, generation)
        log.info("%s: added", dev.name)
        return dev

    def restore(self, record: DeviceRecord) -> Device:
        """A device the daemon before this one had, with its id and generation (the kernel's
        open files name it by both); its settings and pages come with Device.restore."""
        if self.state is not None:
            self.generations.update(self.state.generations)
        self.generations[record.id] = max(self.generations.get(record.id, 0),
                                          record.generation)
        dev = self._add(record.id, record.generation)
        dev.openers = record.openers
        if self.state is not None:
            self.state.opened(record.id, record.openers)
        log.info("%s: generation %d, open %d times", dev.name, record.generation,
                 record.openers)
        return dev

    async def remove(self, text: str) -> None:
        """hot_remove: the id as the kernel reads it (kstrto.parse_device_id), ENODEV for an
        unknown id, EBUSY while open or draining. The device leaves by_id before it drains;
        the tree follows by_id (control.Tree.sync_devices), never parsing the id again."""
        dev_id = kstrto.parse_device_id(text)
        dev = self.by_id.get(dev_id)
        if dev is None:
            raise fail(errno.ENODEV, f"no device zram{dev_id}")
        if dev.openers or dev.busy:
            raise fail(errno.EBUSY, f"{dev.name} is open")
        dev.removed = True
        dev.disk.retire()
        del self.by_id[dev_id]          # no new opens from here on
        self.retiring.add(dev_id)       # nor a new device with its id, until it has drained
        try:
            await dev.reset()
        finally:
            self.retiring.discard(dev_id)
            if self.state is not None:
                self.state.removed(dev_id)
        log.info("%s: removed", dev.name)

    def cancel_tiering(self) -> None:
        """A graceful restart's first step: every running writeback or recompression stops at
        its next batch, so the handover waits for none (their writers get ECANCELED)."""
        for dev in self.by_id.values():
            dev.cancel_tiering()

    async def remove_all(self) -> None:
        """Shutdown: every device drained and freed, open or not."""
        for dev in list(self.by_id.values()):
            del self.by_id[dev.id]
            dev.removed = True
            dev.disk.retire()
            await dev.reset()
            if self.state is not None:
                self.state.removed(dev.id)
