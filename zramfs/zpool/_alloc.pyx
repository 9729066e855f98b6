# cython: language_level=3
"""The allocator's Python face: `Pool`, the backend registry, unique pool names.

The pools themselves are C: zsmalloc (_zsmalloc) and zbud (_zbud), both over the page source
(_pages), each reached through its `zpool_driver` table (zpool.pxd) of functions that run
without the GIL. This module owns what sits above them: the registry (zramfs.registry) that
picks a backend by name and pins it while a pool uses it, the names of live pools, and `Pool`,
the owner the device holds (objects themselves are reached through the driver table, by the
device or, in the tests, through `Pool.driver_capsule`). Everything here runs under the GIL;
`Pool` drops it around the driver calls that may take a while.

A pool lives in a region of its own, a memfd (zramfs.zpool._pages) with a header at offset 0, mapped
in an address range of its own: keep `Pool.fd` across a restart and a later daemon maps it at
the same address and adopts it as it is (`pool_adopt`), or, where that address is taken in
it, opens it as a `PoolImage` to copy the objects out. Both read the kept pool through its
backend's one reader (zpool_driver.check and locate).
"""
from __future__ import annotations

import os
import threading
from collections import namedtuple

from zramfs.registry import Registry

from libc.stdint cimport uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcmp, strncpy
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.pycapsule cimport PyCapsule_New, PyCapsule_SetContext

from zramfs.common cimport PAGE_SIZE
from zramfs.zpool.zpool cimport ZPOOL_ARENAS, ZPOOL_ROOT, zpool_class_stat, zpool_driver
from zramfs.zpool._pages cimport PAGES_MAX_RUN      # every backend's zspage (or page) is one run
from zramfs.zpool._pages cimport (pages_tags_free, region_adopt, region_close, region_create,
                                  region_map, region_populate, zregion)
from zramfs.zpool._zsmalloc cimport zsmalloc_driver
from zramfs.zpool._zbud cimport zbud_driver

PAGE = PAGE_SIZE
DEFAULT_MAX_PAGES_PER_ZSPAGE = 8
DEFAULT_BACKEND = "zsmalloc"      # what zram allocates from; zbud is zswap's other choice
# The header's magic and version: a later daemon adopts only a pool of the same layout.
POOL_MAGIC = b"zramfs-pool"
POOL_VERSION = 2
_ARENA = 64 << 20
cdef const char* ZPOOL_DRIVER_CAPSULE = "zramfs.zpool.zpool_driver"   # Pool.driver_capsule


def default_region_size() -> int:
    """Address space for one pool: twice the machine's RAM (the budget keeps the pages held
    below RAM; the rest is room for freed runs). Costs nothing until touched."""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return ZPOOL_ARENAS + (2 * ram + _ARENA - 1) // _ARENA * _ARENA


class PoolError(Exception):
    """The pool cannot do that (it is destroyed)."""


# ---------------------------------------------------------------------------------------------
# Backends are pinned while a pool uses them (docs/design.md, hazard 5); pool names stay unique
# while an old pool is still being torn down (hazard 3).

cdef class _Backend:
    cdef const zpool_driver* driver


cdef _Backend _backend(const zpool_driver* driver):
    cdef _Backend b = _Backend()
    b.driver = driver
    return b


BACKENDS: Registry[_Backend] = Registry("allocator backend")
BACKENDS.register("zsmalloc", _backend(zsmalloc_driver()))
BACKENDS.register("zbud", _backend(zbud_driver()))

_names_lock = threading.Lock()
_pool_names: set[str] = set()


def _claim_name(wanted: str) -> str:
    """A pool name unique among live pools: `wanted`, or `wanted-N` while that is held."""
    with _names_lock:
        name, n = wanted, 1
        while name in _pool_names:
            n += 1
            name = f"{wanted}-{n}"
        _pool_names.add(name)
        return name


ClassStat = namedtuple(
    "ClassStat",
    "index size obj_allocated obj_used pages_used pages_per_zspage freeable",
)


cdef class Pool:
    """A pool of compressed objects: `Pool("zsmalloc", "zram0")`.

    Its life, statistics and compaction from Python, with the GIL released around the C
    calls. Objects are the C callers': the device uses `driver`/`impl` directly, the tests
    the same table through `driver_capsule()` (tests/pool_io.py).
    """

    def __cinit__(self):
        self.region.fd = -1
        self.region.base = NULL

    def __init__(self, backend: str = DEFAULT_BACKEND, name: str = "zram",
                 max_pages_per_zspage: int = DEFAULT_MAX_PAGES_PER_ZSPAGE,
                 region_size: int | None = None):
        cdef _Backend b
        cdef zpool_header* h
        cdef int rc
        if not 1 <= max_pages_per_zspage <= PAGES_MAX_RUN:
            raise ValueError(f"max_pages_per_zspage must be 1..{PAGES_MAX_RUN}")
        cdef size_t size = default_region_size() if region_size is None else region_size
        if size < ZPOOL_ARENAS + _ARENA:
            raise ValueError(f"region_size must be at least {ZPOOL_ARENAS + _ARENA}")
        b = BACKENDS.pin(backend)
        self._pin = backend
        self.driver = b.driver
        self.backend = backend
        region_name = f"zramfs-pool:{name}".encode()
        rc = region_create(&self.region, region_name, size, True)
        if rc != 0:
            self._unpin()
            raise OSError(-rc, f"cannot make a region of {size} bytes for the pool")
        h = <zpool_header*>self.region.base
        strncpy(h.magic, POOL_MAGIC, sizeof(h.magic))
        h.version = POOL_VERSION
        h.pointer_size = sizeof(void*)
        strncpy(h.backend, backend.encode(), sizeof(h.backend) - 1)
        h.base = <uint64_t>self.region.base
        h.size = self.region.size
        cdef int chain = max_pages_per_zspage
        with nogil:
            self.impl = self.driver.create(chain, &self.region)
        if self.impl == NULL:
            region_close(&self.region)
            self._unpin()
            raise MemoryError("cannot create pool")
        self.name = _claim_name(name)

    @classmethod
    def adopt(cls, int fd, handles, str name="zram") -> Pool:
        """`pool_adopt` for tests and tools: the kept pool in `fd` with the objects of
        `handles` (a sequence of ints), as a `cls` (a subclass may add its own face)."""
        cdef size_t i, n = len(handles)
        cdef uint64_t* hs = <uint64_t*>malloc((n + 1) * sizeof(uint64_t))
        cdef Pool p
        if hs == NULL:
            raise MemoryError("no memory for the handles")
        try:
            for i in range(n):
                hs[i] = handles[i]
            p = _adopt_into(cls.__new__(cls), fd, hs, n, name)
        finally:
            free(hs)
        return p

    @property
    def fd(self) -> int:
        """The memfd the pool lives in (the pool's to close): keep a dup of it to keep the
        pool's memory past this process."""
        return self.region.fd

    def _unpin(self):
        if self._pin is not None:
            BACKENDS.unpin(self._pin)
            self._pin = None

    def destroy(self) -> None:
        """Frees every object and gives all memory back. The pool is unusable after."""
        if self.impl == NULL:
            return
        self._compacted_at_destroy = self.driver.pages_compacted(self.impl)
        with nogil:
            self.driver.destroy(self.impl)
        self.impl = NULL
        region_close(&self.region)
        self._unpin()
        with _names_lock:
            _pool_names.discard(self.name)   # only now may the name be handed out again

    def __dealloc__(self):
        if self.impl != NULL:
            self.driver.destroy(self.impl)
            self.impl = NULL
        region_close(&self.region)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    cdef int _check_open(self) except -1:
        if self.impl == NULL:
            raise PoolError(f"pool {self.name} is destroyed")
        return 0

    def driver_capsule(self) -> object:
        """The pool as C callers outside the device reach it (the tests' pool_io, through
        ctypes): a PyCapsule named "zramfs.zpool.zpool_driver" whose pointer is the driver
        table (static) and whose context is the pool (`impl`), good until destroy."""
        self._check_open()
        capsule = PyCapsule_New(<void*>self.driver, ZPOOL_DRIVER_CAPSULE, NULL)
        PyCapsule_SetContext(capsule, self.impl)
        return capsule

    def compact(self) -> int:
        """Moves objects out of sparse zspages and gives emptied ones back; pages freed."""
        cdef size_t freed
        self._check_open()
        with nogil:
            freed = self.driver.compact(self.impl)
        return freed

    @property
    def pages_compacted(self) -> int:
        """Pages freed by compaction over the pool's life, by any caller, Python or C: the
        backend counts them (mm_stat's pages_compacted). Still readable after destroy."""
        if self.impl == NULL:
            return self._compacted_at_destroy
        return self.driver.pages_compacted(self.impl)

    @property
    def total_pages(self) -> int:
        """Pages held from the OS (page-granular): mem_used_total / 4096."""
        self._check_open()
        return self.driver.total_pages(self.impl)

    def class_size(self, size_t size) -> int:
        """The room an object of `size` bytes takes."""
        self._check_open()
        return self.driver.class_size(self.impl, size)

    @property
    def huge_class_size(self) -> int:
        """Objects of this size or more take a page of their own; store such pages raw."""
        self._check_open()
        return self.driver.huge_class_size(self.impl)

    def class_stats(self) -> list[ClassStat]:
        """Rows like zsmalloc's debugfs `classes` file, smallest class first (none for zbud)."""
        cdef zpool_class_stat* rows
        cdef int n, i
        self._check_open()
        n = self.driver.class_stats(self.impl, NULL, 0)     # the number of classes is fixed
        if n <= 0:
            return []
        rows = <zpool_class_stat*>malloc(n * sizeof(zpool_class_stat))
        if rows == NULL:
            raise MemoryError("no memory for class statistics")
        try:
            with nogil:
                n = min(n, self.driver.class_stats(self.impl, rows, n))
            return [ClassStat(
                index=rows[i].index, size=rows[i].size, obj_allocated=rows[i].obj_allocated,
                obj_used=rows[i].obj_used, pages_used=rows[i].pages_used,
                pages_per_zspage=rows[i].pages_per_zspage, freeable=rows[i].freeable,
            ) for i in range(n)]
        finally:
            free(rows)

    def __repr__(self) -> str:
        return f"<Pool {self.name} backend={self.backend}>"


class PoolImageError(Exception):
    """The fd holds no pool this version can adopt."""


class PoolInPlaceError(Exception):
    """The kept pool cannot be adopted in place here: its address is taken in this process.
    It can still be copied out (PoolImage)."""


cdef tuple _open_kept(zregion* r, int fd):
    """The kept pool in memfd `fd` mapped read-only in `r`, its header checked: (backend
    name, _Backend), or PoolImageError with r closed."""
    cdef zpool_header* h
    cdef int rc = region_map(r, fd, False)
    if rc != 0:
        raise PoolImageError(f"fd {fd} is not a pool's memfd: {os.strerror(-rc)}")
    h = <zpool_header*>r.base
    try:
        if r.size < ZPOOL_ARENAS or memcmp(h.magic, <const char*>POOL_MAGIC,
                                           len(POOL_MAGIC) + 1) != 0:
            raise PoolImageError("not a zramfs pool (bad magic)")
        if h.version != POOL_VERSION or h.pointer_size != sizeof(void*):
            raise PoolImageError(f"pool format {h.version}, this zramfs reads {POOL_VERSION}")
        if h.size != r.size:
            raise PoolImageError("pool region truncated")
        backend = h.backend[:sizeof(h.backend)].split(b"\0")[0].decode(errors="replace")
        try:
            b = BACKENDS.pin(backend)
        except LookupError:
            raise PoolImageError(f"unknown allocator backend {backend!r}") from None
        BACKENDS.unpin(backend)      # its driver table is static: nothing to keep alive
    except BaseException:
        region_close(r)
        raise
    return backend, b


cdef Pool pool_adopt(int fd, const uint64_t* handles, size_t n, str name):
    return _adopt_into(Pool.__new__(Pool), fd, handles, n, name)


cdef Pool _adopt_into(Pool p, int fd, const uint64_t* handles, size_t n, str name):
    """pool_adopt into `p`, a Pool (or subclass) fresh from __new__."""
    cdef zregion header
    cdef const zpool_driver* driver
    cdef char* base
    cdef const char* why
    cdef int rc
    header.fd = -1
    header.base = NULL
    backend, b = _open_kept(&header, fd)
    driver = (<_Backend>b).driver
    base = <char*>(<zpool_header*>header.base).base
    region_close(&header)
    p.driver = driver
    p.backend = backend
    BACKENDS.pin(backend)
    p._pin = backend
    rc = region_adopt(&p.region, fd, base)
    if rc != 0:
        p._unpin()
        raise PoolInPlaceError(f"its address {<uint64_t>base:#x} is taken in this process: "
                               f"{os.strerror(-rc)}")
    with nogil:
        why = driver.adopt(&p.region, handles, n, &p.impl)
    if why != NULL:
        region_close(&p.region)
        p._unpin()
        raise PoolImageError(f"pool damaged: {why.decode()}")
    with nogil:
        region_populate(&p.region, ZPOOL_ARENAS)
    p.name = _claim_name(name)
    return p


cdef class PoolImage:
    """`PoolImage(fd)`: the pool a process before this one left in the memfd `fd` (a dup is
    kept; `close()` drops it), checked as adoption checks it. Raises PoolImageError for
    anything but a sound pool of this layout."""

    def __cinit__(self):
        self.region.fd = -1
        self.region.base = NULL
        self.kept.tags.tag = NULL

    def __init__(self, int fd):
        cdef const char* why
        cdef ssize_t delta
        backend, b = _open_kept(&self.region, fd)
        self.backend = backend
        self.driver = (<_Backend>b).driver
        delta = <ssize_t>(self.region.base - <char*>(<zpool_header*>self.region.base).base)
        with nogil:
            why = self.driver.check(&self.kept, &self.region, delta)
        if why != NULL:
            self.close()
            raise PoolImageError(f"pool damaged: {why.decode()}")

    cdef const char* locate(self, uint64_t handle, size_t size) noexcept nogil:
        if self.region.base == NULL:
            return NULL
        return self.driver.locate(&self.kept, handle, size)

    def read(self, uint64_t handle, size_t size) -> bytes | None:
        """The object's `size` bytes, or None where the handle leads nowhere sound."""
        cdef const char* p = self.locate(handle, size)
        if p == NULL:
            return None
        return PyBytes_FromStringAndSize(p, size)

    def close(self) -> None:
        pages_tags_free(&self.kept.tags)
        region_close(&self.region)

    def __dealloc__(self):
        self.close()
