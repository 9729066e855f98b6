"""The tree under the mountpoint, mirroring /dev and /sys, and every FUSE operation on it but
the device files' data (that runs in C, see zramfs/fuse/_fuse.pyx).

    dev/zramN                            the device files
    sys/class/zram-control/hot_add       read: a new device's id
    sys/class/zram-control/hot_remove    write an id
    sys/block/zramN/<attribute>          as /sys/block/zramN/
    sys/kernel/debug/zsmalloc/<pool>/classes   the allocator's classes, as zsmalloc's debugfs
    sys/kernel/debug/zram/zramN/block_state    every stored page's flags, as zram's debugfs

The handlers run on the trio thread (the FUSE layer hands them over), so the tree and the
devices change only between awaits.

Inode numbers are derived from the tree's structure, never from a counter, so that any daemon
serving the same connection later (a restarted one) gives every path the number the kernel
already knows: the fixed directories and files have fixed numbers; device N's nodes are
(N + 1) << 16 plus the node's place (its file, its directory, then its attributes in the order
ATTRIBUTES lists them, which only ever grows at its end). A device's nodes carry its
generation, so a kernel that still holds a removed device's inode treats it as stale when a
new device gets the same id, instead of reaching the new device through it.
"""
from __future__ import annotations

import errno
import grp
import itertools
import logging
import os
import stat
from dataclasses import dataclass, field

from zramfs.sysfs import kstrto
from zramfs.fuse._fuse import Attr, OpenReply
from zramfs.sysfs.device import ATTRIBUTES, Device, fail
from zramfs.sysfs.hotplug import Devices

log = logging.getLogger(__name__)

ROOT_INO = 1
DEVICE_SHIFT = 16                  # device N's inodes: (N + 1) << 16 | place
POOL_PLACE = 0x8000                # device N's k-th debugfs pool: POOL_PLACE + 2k (+1 classes)
DEBUG_PLACE = 0x7ffe               # device N's debugfs directory (+1: its block_state)
ATTR_FILE_SIZE = 4096          # what sysfs reports for every attribute


def _disk_gid() -> int:
    """Block devices belong to group `disk`, as udev makes them; root's group where none."""
    try:
        return grp.getgrnam("disk").gr_gid
    except KeyError:
        return 0


DISK_GID = _disk_gid()


@dataclass(eq=False)
class Node:
    ino: int
    name: str
    mode: int
    generation: int = 0         # the device's, for a device's nodes
    parent: Node | None = None
    children: dict[str, Node] = field(default_factory=dict)
    device: Device | None = None
    attr: str | None = None     # attribute name, or "hot_add"/"hot_remove" on zram-control

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass(eq=False)
class Handle:
    """An open attribute file: its content is made at the first read, as sysfs does."""
    node: Node
    content: bytes | None = None


class Tree:
    """The FUSE operations the trio thread answers (zramfs/fuse/ops.pxi calls them)."""

    def __init__(self, devices: Devices) -> None:
        self.devices = devices
        self._fhs = itertools.count(1)
        self.nodes: dict[int, Node] = {}
        self.handles: dict[int, Handle] = {}
        fixed = itertools.count(ROOT_INO)           # the fixed part of the tree, in order
        d = stat.S_IFDIR | 0o755
        self.root = self._add(next(fixed), None, "", d)
        self.dev_dir = self._add(next(fixed), self.root, "dev", d)
        sys_dir = self._add(next(fixed), self.root, "sys", d)
        class_dir = self._add(next(fixed), sys_dir, "class", d)
        control = self._add(next(fixed), class_dir, "zram-control", d)
        self._add(next(fixed), control, "hot_add", stat.S_IFREG | 0o400, attr="hot_add")
        self._add(next(fixed), control, "hot_remove", stat.S_IFREG | 0o200, attr="hot_remove")
        self.block_dir = self._add(next(fixed), sys_dir, "block", d)
        kernel = self._add(next(fixed), sys_dir, "kernel", d)
        debug = self._add(next(fixed), kernel, "debug", d)
        self.pools_dir = self._add(next(fixed), debug, "zsmalloc", d)
        self.debug_dir = self._add(next(fixed), debug, "zram", d)
        for dev in devices.by_id.values():
            self.add_device(dev)

    # --- the tree ------------------------------------------------------------------------------

    def _add(self, ino: int, parent: Node | None, name: str, mode: int, *,
             device: Device | None = None, attr: str | None = None) -> Node:
        node = Node(ino, name, mode, device.generation if device is not None else 0, parent,
                    device=device, attr=attr)
        self.nodes[node.ino] = node
        if parent is not None:
            parent.children[name] = node
        return node

    def _drop(self, node: Node) -> None:
        for child in list(node.children.values()):
            self._drop(child)
        del self.nodes[node.ino]
        if node.parent is not None:
            del node.parent.children[node.name]

    def add_device(self, dev: Device) -> None:
        base = (dev.id + 1) << DEVICE_SHIFT
        self._add(base, self.dev_dir, dev.name, stat.S_IFREG | 0o660, device=dev)
        d = self._add(base + 1, self.block_dir, dev.name, stat.S_IFDIR | 0o755, device=dev)
        for place, (name, a) in enumerate(ATTRIBUTES.items(), 2):
            self._add(base + place, d, name, stat.S_IFREG | a.mode, device=dev, attr=name)
        debug = self._add(base + DEBUG_PLACE, self.debug_dir, dev.name, stat.S_IFDIR | 0o755,
                          device=dev)
        self._add(base + DEBUG_PLACE + 1, debug, "block_state", stat.S_IFREG | 0o400,
                  device=dev, attr="block_state")

    def sync_devices(self) -> None:
        """Drops the nodes of devices no longer in devices.by_id (a hot_remove, done or failed
        midway): the tree follows the devices, and never parses an id of its own."""
        for parent in (self.dev_dir, self.block_dir, self.debug_dir):
            for node in list(parent.children.values()):
                if self.devices.by_id.get(node.device.id) is not node.device:
                    self._drop(node)

    def _sync_pools(self) -> None:
        """One directory a live pool, named as the pool (unique: docs/design.md, hazard 3)."""
        live = {d.meta.stats().pool: d for d in self.devices.by_id.values() if d.meta is not None}
        for name, node in list(self.pools_dir.children.items()):
            if live.get(name) is not node.device:
                self._drop(node)
        for name, dev in live.items():
            if name not in self.pools_dir.children:
                # zramN, or zramN-k while an older pool of zramN is still being torn down
                k = int(name.rpartition("-")[2]) if name != dev.name else 1
                ino = ((dev.id + 1) << DEVICE_SHIFT) + POOL_PLACE + 2 * (k - 1)
                d = self._add(ino, self.pools_dir, name, stat.S_IFDIR | 0o755, device=dev)
                self._add(ino + 1, d, "classes", stat.S_IFREG | 0o444, device=dev,
                          attr="classes")

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise fail(errno.ENOENT, f"no inode {ino}")
        return node

    def _attr(self, node: Node) -> Attr:
        if node.is_dir:
            return Attr(node.ino, node.mode, 0, st_nlink=2, generation=node.generation)
        if node.attr is None:                      # a device file: its size is disksize
            return Attr(node.ino, node.mode, node.device.disksize, st_gid=DISK_GID,
                        generation=node.generation)
        return Attr(node.ino, node.mode, ATTR_FILE_SIZE, generation=node.generation)

    # --- FUSE operations -----------------------------------------------------------------------

    def lookup(self, parent: int, name: str) -> Attr:
        if parent == self.pools_dir.ino:
            self._sync_pools()
        node = self._node(parent).children.get(name)
        if node is None:
            raise fail(errno.ENOENT, name)
        return self._attr(node)

    def getattr(self, ino: int) -> Attr:
        return self._attr(self._node(ino))

    def setattr(self, ino: int, changes: dict, fh: int | None) -> Attr:
        """Nothing in the tree changes by setattr. A device's size is its disksize: truncate
        is EINVAL, as on a block device (O_TRUNC at open never comes here: the FUSE layer asks
        for atomic O_TRUNC, and ignores it, as a block device and sysfs do). Modes, owners and
        times are fixed: EPERM, as sysfs answers anything it does not keep."""
        node = self._node(ino)
        if changes.keys() - {"size"}:
            raise fail(errno.EPERM, f"{node.name}: modes, owners and times are fixed")
        if "size" in changes and node.attr is None and not node.is_dir:
            raise fail(errno.EINVAL, f"{node.name}: a device's size is its disksize")
        return self._attr(node)

    def readdir(self, ino: int) -> list[tuple[str, Attr]]:
        node = self._node(ino)
        if not node.is_dir:
            raise fail(errno.ENOTDIR, node.name)
        if node is self.pools_dir:
            self._sync_pools()
        entries = [(".", self._attr(node)), ("..", self._attr(node.parent or node))]
        return entries + [(name, self._attr(c)) for name, c in sorted(node.children.items())]

    def open(self, ino: int, flags: int) -> OpenReply:
        node = self._node(ino)
        if node.is_dir:
            raise fail(errno.EISDIR, node.name)
        if node.attr is None:
            dev = node.device
            if dev.removed:
                raise fail(errno.ENODEV, dev.name)
            dev.openers += 1
            if dev.state is not None:
                dev.state.opened(dev.id, +1)
            return OpenReply(dev.disk.handle, data=True)
        mode = flags & os.O_ACCMODE
        if mode in (os.O_RDONLY, os.O_RDWR) and not node.mode & 0o444:
            raise fail(errno.EACCES, f"{node.name} is write-only")
        if mode in (os.O_WRONLY, os.O_RDWR) and not node.mode & 0o200:
            raise fail(errno.EACCES, f"{node.name} is read-only")
        fh = next(self._fhs)
        self.handles[fh] = Handle(node)
        return OpenReply(fh, direct_io=True)

    def release(self, ino: int, fh: int) -> None:
        if self.handles.pop(fh, None) is not None:
            return
        node = self.nodes.get(ino)
        # Never below 0: a file opened under a previous daemon and not in its record (a
        # crash between the two) was not counted by this one.
        if node is not None and node.device is not None and node.attr is None and \
                node.device.openers > 0:
            node.device.openers -= 1
            if node.device.state is not None:
                node.device.state.opened(node.device.id, -1)

    def read(self, ino: int, fh: int, size: int, off: int) -> bytes:
        h = self.handles.get(fh)
        if h is None:
            raise fail(errno.EBADF, f"no handle {fh}")
        if h.content is None:
            h.content = self._show(h.node).encode()
        return h.content[off : off + size]

    async def write(self, ino: int, fh: int, data: bytes, off: int) -> int:
        h = self.handles.get(fh)
        if h is None:
            raise fail(errno.EBADF, f"no handle {fh}")
        text = kstrto.c_string(data.decode("latin-1"))
        node = h.node
        if node.attr == "hot_remove":
            try:
                await self.devices.remove(text)
            finally:
                self.sync_devices()
        elif node.attr == "hot_add":
            raise fail(errno.EACCES, "hot_add is read-only")
        else:
            try:
                await node.device.store(node.attr, text)
            except (ValueError, OverflowError) as e:
                # A parser that missed a case: still the kernel's answer to bad input, and a
                # line in the log rather than a traceback.
                log.warning("%s/%s: %r refused: %s", node.device.name, node.attr,
                            text[:60], e)
                raise fail(errno.EINVAL, str(e)) from None
        return len(data)

    def _show(self, node: Node) -> str:
        if node.attr == "hot_add":
            dev = self.devices.add()
            self.add_device(dev)
            return f"{dev.id}\n"
        if node.attr == "hot_remove":
            raise fail(errno.EACCES, "hot_remove is write-only")
        if node.attr == "block_state":
            meta = node.device.meta
            return meta.block_state().decode() if meta is not None else ""
        if node.attr == "classes":
            meta = node.device.meta
            if meta is None:
                raise fail(errno.ENOENT, "the pool is gone")
            return classes_text(meta.classes())
        return node.device.show(node.attr)


def classes_text(rows: list) -> str:
    """zsmalloc's debugfs `classes` table: classes with objects, then the total."""
    head = " class  size obj_allocated   obj_used pages_used pages_per_zspage freeable\n"
    lines = [f"{r.index:6} {r.size:5} {r.obj_allocated:13} {r.obj_used:10} {r.pages_used:10} "
             f"{r.pages_per_zspage:16} {r.freeable:8}\n" for r in rows if r.obj_allocated]
    total = [sum(getattr(r, f) for r in rows)
             for f in ("obj_allocated", "obj_used", "pages_used", "freeable")]
    return head + "".join(lines) + (f" Total {'':5} {total[0]:13} {total[1]:10} {total[2]:10} "
                                    f"{'':16} {total[3]:8}\n")
