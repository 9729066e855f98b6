"""A pool's objects from the tests and tools, without a test-only entry point in the product:
`IoPool` is a `Pool` (zramfs.zpool._alloc) with malloc, free, write and read that call the
pool's driver table (zpool.pxd's zpool_driver, the one the device calls) through ctypes, from
`Pool.driver_capsule()`. It keeps the handles it gave out, so an unknown one is a KeyError
and never reaches the C code. ctypes releases the GIL for each call, as the driver allows
(its functions run without it), so threads race on the C path as the device's do.

    with IoPool("zsmalloc", "test") as pool:
        h = pool.malloc(100)
        pool.write(h, b"x" * 100)
        assert pool.read(h)[:100] == b"x" * 100
"""
from __future__ import annotations

import ctypes

from zramfs.zpool._alloc import PAGE, Pool, PoolError

_CAPSULE = b"zramfs.zpool.zpool_driver"


class _Driver(ctypes.Structure):
    """The head of zpool.pxd's zpool_driver, up to the last field called here (obj_size)."""
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("create", ctypes.c_void_p),
        ("destroy", ctypes.c_void_p),
        ("malloc", ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t)),
        ("free", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)),
        ("map", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64)),
        ("unmap", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)),
        ("obj_size", ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_uint64)),
    ]


_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_get_context = ctypes.pythonapi.PyCapsule_GetContext
_get_context.restype = ctypes.c_void_p
_get_context.argtypes = [ctypes.py_object]


class IoPool(Pool):
    """A pool with Python object I/O over its driver table, checked as a caller must: sizes
    1..PAGE, only handles it gave out (or was adopted with), data that fits the object."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._bind(())

    @classmethod
    def adopt(cls, fd: int, handles, name: str = "zram") -> IoPool:
        """Pool.adopt; the objects of `handles` are then this pool's to read, write, free."""
        pool = super().adopt(fd, handles, name)
        pool._bind(handles)
        return pool

    def _bind(self, handles) -> None:
        capsule = self.driver_capsule()
        # The table is static in the extension; the pool (impl) lives until destroy.
        self._ops = _Driver.from_address(_get_pointer(capsule, _CAPSULE))
        self._impl: int | None = _get_context(capsule)
        self._live = set(handles)

    def destroy(self) -> None:
        self._impl = None
        self._live.clear()
        super().destroy()

    def _open(self) -> int:
        if self._impl is None:
            raise PoolError(f"pool {self.name} is destroyed")
        return self._impl

    def _check_handle(self, handle: int) -> int:
        impl = self._open()
        if handle not in self._live:
            raise KeyError(f"no live object with handle {handle:#x}")
        return impl

    def malloc(self, size: int) -> int:
        """A handle to a new object of `size` bytes (1..4096)."""
        impl = self._open()
        if size == 0 or size > PAGE:
            raise ValueError(f"object size {size} is not in 1..{PAGE}")
        h = self._ops.malloc(impl, size)
        if h == 0:
            raise MemoryError(f"pool {self.name}: no memory for {size} bytes")
        self._live.add(h)
        return h

    def free(self, handle: int) -> None:
        impl = self._check_handle(handle)
        self._live.discard(handle)
        self._ops.free(impl, handle)

    def write(self, handle: int, data: bytes | bytearray | memoryview) -> None:
        """Copies `data` (a bytes-like object no longer than the object) into the object."""
        impl = self._check_handle(handle)
        raw = memoryview(data).tobytes()
        if len(raw) > self._ops.obj_size(impl, handle):
            raise ValueError(f"{len(raw)} bytes do not fit the object")
        dst = self._ops.map(impl, handle)
        try:
            ctypes.memmove(dst, raw, len(raw))
        finally:
            self._ops.unmap(impl, handle)

    def read(self, handle: int) -> bytes:
        """The object's bytes (its whole size as allocated)."""
        impl = self._check_handle(handle)
        n = self._ops.obj_size(impl, handle)
        src = self._ops.map(impl, handle)
        try:
            return ctypes.string_at(src, n)
        finally:
            self._ops.unmap(impl, handle)
