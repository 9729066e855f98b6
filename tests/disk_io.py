"""A device's data path from the tests, without a mount and without a test-only entry point in
the product: `IoDisk` is a `Disk` (zramfs.zram._zram) with read, write and fallocate that call
the data ops the FUSE engine calls (`data_ops_capsule()`), through ctypes, by the disk's
handle. ctypes releases the GIL for each call, so threads race on the C path as FUSE workers
do.

    disk = IoDisk()
    disk.attach(Meta(64 * PAGE, "lz4", name="test"))
    disk.write(0, b"x" * PAGE)
    assert disk.read(0, PAGE) == b"x" * PAGE
"""
from __future__ import annotations

import ctypes
import itertools
import weakref

from zramfs.zram._zram import Disk, data_ops_capsule

# The ids the tests' disks take: above any a test's daemon or Device in this process uses
# (device ids count from 0), below the data path's MAX_DISKS.
FIRST_ID, LAST_ID = 1 << 15, (1 << 16) - 1


class _DataOps(ctypes.Structure):
    """zram/data_ops.h's zramfs_data_ops."""
    _fields_ = [
        ("read", ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_uint64, ctypes.c_void_p,
                                  ctypes.c_size_t, ctypes.c_uint64)),
        ("write", ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_uint64, ctypes.c_char_p,
                                   ctypes.c_size_t, ctypes.c_uint64)),
        ("fallocate", ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_int,
                                       ctypes.c_uint64, ctypes.c_uint64)),
    ]


def _data_ops() -> _DataOps:
    capsule = data_ops_capsule()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return _DataOps.from_address(get(capsule, b"zramfs.zram.data_ops"))


_OPS = _data_ops()                # static in the extension: lives as long as the process
_ids = itertools.cycle(range(FIRST_ID, LAST_ID + 1))
_live: weakref.WeakValueDictionary[int, IoDisk] = weakref.WeakValueDictionary()


class IoDisk(Disk):
    """A disk of an id of its own (the tests' range), with Python I/O over the data ops."""

    def __new__(cls) -> IoDisk:
        for _ in range(LAST_ID - FIRST_ID + 1):
            dev_id = next(_ids)
            if dev_id in _live:
                continue                          # still some test's disk
            try:
                disk = super().__new__(cls, dev_id)
            except RuntimeError:                  # in use: a disk of this id left attached
                continue
            _live[dev_id] = disk
            return disk
        raise RuntimeError("every test disk id is in use")

    def read(self, off: int, size: int) -> bytes:
        buf = ctypes.create_string_buffer(size)
        n = _OPS.read(self.handle, buf, size, off)
        if n < 0:
            raise OSError(-n, f"read of {size} bytes at {off}")
        return buf.raw[:n]

    def write(self, off: int, data: bytes | bytearray | memoryview) -> int:
        data = bytes(data)
        n = _OPS.write(self.handle, data, len(data), off)
        if n < 0:
            raise OSError(-n, f"write of {len(data)} bytes at {off}")
        return n

    def fallocate(self, mode: int, off: int, length: int) -> None:
        rc = _OPS.fallocate(self.handle, mode, off, length)
        if rc < 0:
            raise OSError(-rc, f"fallocate mode {mode:#x} of {length} bytes at {off}")
