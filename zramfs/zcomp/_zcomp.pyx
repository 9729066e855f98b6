# cython: language_level=3
"""Compression algorithms (the kernel's names: lzo-rle, lzo, lz4, lz4hc, zstd, deflate) and
per-device compression streams.

The algorithms call liblzo2, liblz4, libzstd and zlib directly, one backend_*.pxi each (the
kernel's backend_*.c), so compression runs without the GIL in the FUSE worker threads; only
zcomp_compress() and zcomp_decompress() reach a backend's ops. Each device gets `streams` contexts with their buffers, made when
disksize is written; a request borrows one (try each without waiting, then wait on one), as
the kernel's zram borrows a per-CPU stream.

Algorithms are looked up and pinned through a registry (docs/design.md, hazard 5): `Compressor("zstd", 5)`
pins zstd until `destroy()`.
"""
from __future__ import annotations

import hashlib
import os

from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memmove
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE

from zramfs.pthread cimport (pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock,
                            pthread_mutex_trylock, pthread_mutex_unlock)
from zramfs.registry import Registry
from zramfs.common cimport PAGE_SIZE, posix_memalign, za_add_uint

class CompressorError(ValueError):
    """Unknown algorithm, bad level, or data that does not decompress to a page."""


include "backend_lzo.pxi"
include "backend_lz4.pxi"
include "backend_zstd.pxi"
include "backend_deflate.pxi"


cdef class _Algorithm:
    cdef const zcomp_ops* ops


cdef _Algorithm _algorithm(const zcomp_ops* ops):
    cdef _Algorithm a = _Algorithm()
    a.ops = ops
    return a


ALGORITHMS: Registry[_Algorithm] = Registry("compression algorithm")
# In the kernel's order (zcomp.c's backends). Its 842 has no maintained library outside the
# kernel (libnxz and the kernel's lib/842 are not packaged as one): refused by name below.
ALGORITHMS.register("lzo-rle", _algorithm(&LZO_RLE))
ALGORITHMS.register("lzo", _algorithm(&LZO))
ALGORITHMS.register("lz4", _algorithm(&LZ4))
ALGORITHMS.register("lz4hc", _algorithm(&LZ4HC))
ALGORITHMS.register("zstd", _algorithm(&ZSTD))
ALGORITHMS.register("deflate", _algorithm(&DEFLATE))
# What a device compresses with until told otherwise: the kernel's CONFIG_ZRAM_DEF_COMP.
DEFAULT_ALGORITHM = "lz4"


NOT_OFFERED = {
    "842": "842 is not offered: no maintained library implements it outside the kernel "
           "(its lib/842 is not packaged for userspace)",
}


def check_algorithm(name: str) -> None:
    """CompressorError, naming why, unless `name` is an algorithm here."""
    if name in NOT_OFFERED:
        raise CompressorError(NOT_OFFERED[name])
    if name not in ALGORITHMS.names():
        raise CompressorError(f"unknown compression algorithm {name!r} "
                              f"(known: {' '.join(ALGORITHMS.names())})")


def default_streams() -> int:
    """Streams per device: enough for the FUSE worker threads of a small machine."""
    return max(4, 2 * (os.cpu_count() or 1))


# --- streams ---------------------------------------------------------------------------------

cdef zstream* zcomp_stream_get(zcomp* comp) noexcept nogil:
    """A free stream, waiting for one only if every stream is busy."""
    cdef unsigned int start = za_add_uint(&comp.hint, 1)
    cdef int i
    cdef zstream* s
    for i in range(comp.nr_streams):
        s = &comp.streams[(start + i) % comp.nr_streams]
        if pthread_mutex_trylock(&s.lock) == 0:
            return s
    s = &comp.streams[start % comp.nr_streams]
    pthread_mutex_lock(&s.lock)
    return s


cdef void zcomp_stream_put(zstream* s) noexcept nogil:
    pthread_mutex_unlock(&s.lock)


cdef zstream* zcomp_private_stream(zcomp* comp, int i) noexcept nogil:
    """Private stream i (0 <= i < nr_private): one owner thread, never shared, never locked."""
    return &comp.streams[comp.nr_streams + i]


cdef void _zcomp_free(zcomp* comp) noexcept nogil:
    cdef int i
    cdef zstream* s
    if comp.streams != NULL:
        for i in range(comp.nr_streams + comp.nr_private):
            s = &comp.streams[i]
            if s.ctx != NULL:
                comp.ops.ctx_destroy(s.ctx)
            free(s.buffer)
            free(s.page)
            pthread_mutex_destroy(&s.lock)
        free(comp.streams)
    if comp.cdict != NULL:
        ZSTD_freeCDict(<ZSTD_CDict*>comp.cdict)
    if comp.ddict != NULL:
        ZSTD_freeDDict(<ZSTD_DDict*>comp.ddict)
    for i in range(comp.nr_older):
        ZSTD_freeDDict(<ZSTD_DDict*>comp.older[i])
    free(comp.older)
    free(comp.older_names)
    free(comp)


cdef zcomp* _zcomp_create(const zcomp_ops* ops, int level) noexcept nogil:
    """A compressor without streams yet: its dictionary, if any, comes first, since each
    stream's context is bound to it when made."""
    cdef zcomp* comp = <zcomp*>calloc(1, sizeof(zcomp))
    if comp == NULL:
        return NULL
    comp.ops = ops
    comp.level = level
    return comp


cdef int _zcomp_add_streams(zcomp* comp, int nr, int nr_private) noexcept nogil:
    """`nr` shared and `nr_private` private streams: 0, or -1 (the caller frees comp)."""
    cdef int i
    cdef zstream* s
    comp.streams = <zstream*>calloc(nr + nr_private, sizeof(zstream))
    if comp.streams == NULL:
        return -1
    comp.nr_streams = nr
    comp.nr_private = nr_private
    for i in range(nr + nr_private):
        s = &comp.streams[i]
        pthread_mutex_init(&s.lock, NULL)
        s.ctx = comp.ops.ctx_create(comp)
        if posix_memalign(<void**>&s.buffer, PAGE_SIZE, ZCOMP_BUFFER) != 0:
            s.buffer = NULL
        # Page-aligned: it is also the bounce buffer of O_DIRECT reads from a backing device.
        if posix_memalign(<void**>&s.page, PAGE_SIZE, PAGE_SIZE) != 0:
            s.page = NULL
        if s.ctx == NULL or s.buffer == NULL or s.page == NULL:
            return -1
    return 0


def check_level(name: str, level: int) -> None:
    """CompressorError unless `level` is one of the algorithm's (the number itself is read
    by the caller, as the kernel reads it: zramfs.sysfs.kstrto)."""
    cdef _Algorithm a = ALGORITHMS.pin(name)
    try:
        if a.ops.level_min == a.ops.level_max:
            raise CompressorError(f"{name} has no levels")
        if not a.ops.level_min <= level <= a.ops.level_max:
            raise CompressorError(
                f"{name} level must be {a.ops.level_min}..{a.ops.level_max}, not {level}")
    finally:
        ALGORITHMS.unpin(name)


cdef class Compressor:
    """One device's compressor: `Compressor("zstd", level=5, streams=4)`.

    `private_streams` more streams are set aside for threads that own one each (the device's
    compression workers), outside the shared set that requests borrow from.

    `dictionary`: zstd's, as the kernel's `algorithm_params dict=PATH` gives one: prepared
    once here (a CDict at the level, a DDict), never on the request path. `older`: zstd
    dictionaries pages may have been compressed with before this one (a live restart that
    found another at the path), read with by the id each frame names, never written with.

    `compress`/`decompress` are for tests and tools; the device uses `comp` without the GIL.
    """

    def __init__(self, name: str, level: int | None = None, streams: int | None = None,
                 int private_streams=0, bytes dictionary=None, tuple older=()):
        cdef _Algorithm a = ALGORITHMS.pin(name)
        cdef int lvl = a.ops.level_default if level is None else level
        cdef int nr = default_streams() if streams is None else streams
        cdef int rc
        if not a.ops.level_min <= lvl <= a.ops.level_max or nr < 1 or private_streams < 0:
            ALGORITHMS.unpin(name)
            raise CompressorError(f"bad level {lvl} or streams {nr} for {name}")
        self.comp = _zcomp_create(a.ops, lvl)
        if self.comp == NULL:
            ALGORITHMS.unpin(name)
            raise MemoryError(f"cannot set up {name}")
        self.dictionary, self.older = dictionary, older
        why = None if dictionary is None else _prepare_dictionary(self.comp, name, dictionary)
        if why is None and older:
            why = _prepare_older(self.comp, name, older)
        if why is None:
            with nogil:
                rc = _zcomp_add_streams(self.comp, nr, private_streams)
            if rc != 0:
                _zcomp_free(self.comp)
                self.comp = NULL
                ALGORITHMS.unpin(name)
                raise MemoryError(f"cannot set up {nr} {name} streams")
        else:
            _zcomp_free(self.comp)
            self.comp = NULL
            ALGORITHMS.unpin(name)
            raise CompressorError(why)
        self.name = name
        self.level = lvl
        self.streams = nr

    @property
    def dict_id(self) -> int:
        """The dictionary's id (0: none, or a raw-content dictionary)."""
        return self.comp.dict_id if self.comp != NULL else 0

    @property
    def dict_name(self) -> int:
        """The name its frames carry for its dictionary (dictionary_name; 0: none)."""
        return self.comp.dict_name if self.comp != NULL else 0

    @property
    def dictionary_memory(self) -> int:
        """Bytes the dictionary prepared for compression takes (its CDict; 0: none)."""
        if self.comp == NULL or self.comp.cdict == NULL:
            return 0
        return ZSTD_sizeof_CDict(<const ZSTD_CDict*>self.comp.cdict)

    def destroy(self) -> None:
        if self.comp != NULL:
            with nogil:
                _zcomp_free(self.comp)
            self.comp = NULL
            self.dictionary = self.older = None     # after the CDict and DDicts are gone
            ALGORITHMS.unpin(self.name)

    def __dealloc__(self):
        if self.comp != NULL:
            _zcomp_free(self.comp)

    def compress(self, page) -> bytes | None:
        """The compressed page, or None where it does not fit a page (store it raw)."""
        cdef Py_buffer view
        cdef zstream* s
        cdef int n
        if self.comp == NULL:
            raise CompressorError("compressor is destroyed")
        PyObject_GetBuffer(page, &view, PyBUF_SIMPLE)
        try:
            if view.len != PAGE_SIZE:
                raise CompressorError(f"a page is {PAGE_SIZE} bytes, not {view.len}")
            with nogil:
                s = zcomp_stream_get(self.comp)
                n = zcomp_compress(self.comp, s, <const char*>view.buf, PAGE_SIZE)
            try:
                return PyBytes_FromStringAndSize(s.buffer, n) if n > 0 else None
            finally:
                zcomp_stream_put(s)
        finally:
            PyBuffer_Release(&view)

    def decompress(self, data) -> bytes:
        cdef Py_buffer view
        cdef zstream* s
        cdef int rc
        if self.comp == NULL:
            raise CompressorError("compressor is destroyed")
        out = PyBytes_FromStringAndSize(NULL, PAGE_SIZE)
        cdef char* dst = PyBytes_AS_STRING(out)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            with nogil:
                s = zcomp_stream_get(self.comp)
                rc = zcomp_decompress(self.comp, s, <const char*>view.buf, <int>view.len, dst)
                zcomp_stream_put(s)
        finally:
            PyBuffer_Release(&view)
        if rc != 0:
            raise CompressorError("data does not decompress to one page")
        return out
