# cython: language_level=3
"""Compression algorithms (the kernel's names: lzo-rle, lzo, lz4, lz4hc, zstd, deflate) and
per-device compression streams.

The algorithms call liblzo2, liblz4, libzstd and zlib directly (lzo and deflate in
backend_lzo.pxi and backend_deflate.pxi), so compression runs without the GIL in the
FUSE worker threads. Each device gets `streams` contexts with their buffers, made when
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

cdef extern from "lz4.h" nogil:
    int LZ4_sizeofState()
    int LZ4_compress_fast_extState(void* state, const char* src, char* dst, int src_size,
                                   int dst_capacity, int acceleration)
    int LZ4_decompress_safe(const char* src, char* dst, int compressed_size, int dst_capacity)

cdef extern from "lz4hc.h" nogil:
    int LZ4_sizeofStateHC()
    int LZ4_compress_HC_extStateHC(void* state, const char* src, char* dst, int src_size,
                                   int dst_capacity, int level)

cdef extern from *:
    """
    #define ZSTD_STATIC_LINKING_ONLY     /* ZSTD_c_format: frames without their magic number */
    #include <zstd.h>
    """

cdef extern from "zstd.h" nogil:
    ctypedef struct ZSTD_CCtx:
        pass
    ctypedef struct ZSTD_DCtx:
        pass
    ctypedef struct ZSTD_CDict:
        pass
    ctypedef struct ZSTD_DDict:
        pass
    ctypedef struct ZSTD_frameHeader:
        unsigned dictID
    ctypedef enum ZSTD_cParameter:
        ZSTD_c_compressionLevel
        ZSTD_c_contentSizeFlag
        ZSTD_c_checksumFlag
        ZSTD_c_dictIDFlag
        ZSTD_c_format
    ctypedef enum ZSTD_dParameter:
        ZSTD_d_format
    enum:
        ZSTD_f_zstd1
        ZSTD_f_zstd1_magicless
        ZSTD_MAGICNUMBER
    ZSTD_CCtx* ZSTD_createCCtx()
    size_t ZSTD_freeCCtx(ZSTD_CCtx*)
    ZSTD_DCtx* ZSTD_createDCtx()
    size_t ZSTD_freeDCtx(ZSTD_DCtx*)
    size_t ZSTD_CCtx_setParameter(ZSTD_CCtx*, ZSTD_cParameter, int value)
    size_t ZSTD_DCtx_setParameter(ZSTD_DCtx*, ZSTD_dParameter, int value)
    size_t ZSTD_CCtx_refCDict(ZSTD_CCtx*, const ZSTD_CDict*)
    size_t ZSTD_compress2(ZSTD_CCtx*, void* dst, size_t dst_capacity, const void* src,
                          size_t src_size)
    ctypedef struct ZSTD_compressionParameters:
        unsigned windowLog
        unsigned chainLog
        unsigned hashLog
        unsigned searchLog
        unsigned minMatch
        unsigned targetLength
        int strategy
    ctypedef struct ZSTD_customMem:
        pass
    ctypedef enum ZSTD_dictLoadMethod_e:
        ZSTD_dlm_byRef
    ctypedef enum ZSTD_dictContentType_e:
        ZSTD_dct_auto
    enum:
        ZSTD_btlazy2
    const ZSTD_customMem ZSTD_defaultCMem
    ZSTD_compressionParameters ZSTD_getCParams(int level, unsigned long long src_size,
                                               size_t dict_size)
    ZSTD_CDict* ZSTD_createCDict_advanced(const void* dict, size_t size,
                                          ZSTD_dictLoadMethod_e load, ZSTD_dictContentType_e kind,
                                          ZSTD_compressionParameters params, ZSTD_customMem mem)
    size_t ZSTD_sizeof_CDict(const ZSTD_CDict*)
    size_t ZSTD_getFrameHeader_advanced(ZSTD_frameHeader* header, const void* src, size_t size,
                                        int format)
    unsigned ZSTD_getDictID_fromDDict(const ZSTD_DDict*)
    size_t ZSTD_decompress_usingDDict(ZSTD_DCtx*, void* dst, size_t dst_capacity,
                                      const void* src, size_t src_size, const ZSTD_DDict*)
    size_t ZSTD_freeCDict(ZSTD_CDict*)
    ZSTD_DDict* ZSTD_createDDict_byReference(const void* dict, size_t size)
    size_t ZSTD_freeDDict(ZSTD_DDict*)
    unsigned ZSTD_getDictID_fromDict(const void* dict, size_t size)
    unsigned ZSTD_isError(size_t)


class CompressorError(ValueError):
    """Unknown algorithm, bad level, or data that does not decompress to a page."""


# --- lz4 and lz4hc: one state buffer, decompression needs none ------------------------------
# LZ4_compress_fast_extState clears its 16 KiB state every page, but picks lz4's 16-bit hash
# table for inputs under 64 KiB. LZ4_resetStream_fast + LZ4_compress_fast_continue skips the
# clear but always uses the 32-bit table and prefix checks: measured here on 4 KiB pages of
# fio's 50 %-compressible data it is 40 % slower (1.1 vs 1.6-1.8 GB/s). The variant that has
# both, LZ4_compress_fast_extState_fastReset, is not exported by Debian's liblz4.

cdef void* lz4_create(const zcomp* comp) noexcept nogil:
    return malloc(LZ4_sizeofState())


cdef void* lz4hc_create(const zcomp* comp) noexcept nogil:
    return malloc(LZ4_sizeofStateHC())


cdef void lz4_destroy(void* ctx) noexcept nogil:
    free(ctx)


cdef int lz4_compress(const zcomp* comp, void* ctx, const char* src, char* dst,
                      int cap) noexcept nogil:
    return LZ4_compress_fast_extState(ctx, src, dst, PAGE_SIZE, cap, comp.level)


cdef int lz4hc_compress(const zcomp* comp, void* ctx, const char* src, char* dst,
                        int cap) noexcept nogil:
    return LZ4_compress_HC_extStateHC(ctx, src, dst, PAGE_SIZE, cap, comp.level)


cdef int lz4_decompress(const zcomp* comp, void* ctx, const char* src, int n,
                        char* dst) noexcept nogil:
    return 0 if LZ4_decompress_safe(src, dst, n, PAGE_SIZE) == PAGE_SIZE else -1


include "backend_lzo.pxi"
include "backend_deflate.pxi"


# --- zstd: a compression and a decompression context ----------------------------------------
# Objects land in 16-byte size classes, so every byte of a frame's header counts: frames are
# written without the magic number (ZSTD_f_zstd1_magicless, 4 bytes) and without the content
# size (always a page: 2 bytes, less the window byte it then takes), and without a checksum.
# Frames with their magic (written before, or kept from an older daemon) still read back: a
# magicless frame cannot start with the magic, whose first byte would be a frame header with
# its reserved bit set.
#
# A frame written with a dictionary names it, by zramfs's own name for it (dictionary_name: a
# hash of its bytes, with the top bit set) in the frame header's dictionary id field, where
# zstd would put its own id. zstd's id does not do: a raw-content dictionary has none (0, so
# any other raw one would read its frames, into other bytes), and two trained ones may share
# one. A frame is read with the dictionary of the name it carries, the field taken out again
# (zstd checks a frame's id against the DDict's own), or not at all: a frame whose dictionary
# is missing is a read error, never other bytes. The name costs what zstd's id cost a trained
# dictionary's frames (4 bytes) and 4 bytes more a raw one's.

cdef extern from *:
    """
    #define ZC_NAME_BIT 0x80000000u   /* set in every name; zstd's trainer picks ids below 2**31 */
    """
    const unsigned int NAME_BIT "ZC_NAME_BIT"

cdef enum:
    FHD_SINGLE_SEGMENT = 0x20  # the frame header descriptor's bits (RFC 8878, 3.1.1.1.1)
    FHD_DICT_ID = 0x03         # the size of the dictionary id field: 0, 1, 2 or 4 bytes

ctypedef struct zstd_ctx:
    ZSTD_CCtx* cctx
    ZSTD_DCtx* dctx
    bint magicless             # the format dctx is set to
    char* frame                # ZCOMP_BUFFER bytes: a named frame with its name taken out


cdef bint zstd_ok(size_t rc) noexcept nogil:
    return not ZSTD_isError(rc)


cdef void* zstd_create(const zcomp* comp) noexcept nogil:
    """Both contexts, their parameters set once: the level or the prepared dictionary (whose
    CDict carries the level), then the lean frame format, with no dictionary id of zstd's (a
    name is put there instead). The DDict is picked per frame."""
    cdef zstd_ctx* z = <zstd_ctx*>calloc(1, sizeof(zstd_ctx))
    if z == NULL:
        return NULL
    z.cctx = ZSTD_createCCtx()
    z.dctx = ZSTD_createDCtx()
    z.frame = <char*>malloc(ZCOMP_BUFFER)
    if (z.cctx == NULL or z.dctx == NULL or z.frame == NULL
            or not zstd_ok(ZSTD_CCtx_setParameter(z.cctx, ZSTD_c_compressionLevel, comp.level))
            or not zstd_ok(ZSTD_CCtx_setParameter(z.cctx, ZSTD_c_contentSizeFlag, 0))
            or not zstd_ok(ZSTD_CCtx_setParameter(z.cctx, ZSTD_c_checksumFlag, 0))
            or not zstd_ok(ZSTD_CCtx_setParameter(z.cctx, ZSTD_c_dictIDFlag, 0))
            or not zstd_ok(ZSTD_CCtx_setParameter(z.cctx, ZSTD_c_format, ZSTD_f_zstd1_magicless))
            or not zstd_ok(ZSTD_DCtx_setParameter(z.dctx, ZSTD_d_format, ZSTD_f_zstd1_magicless))
            or (comp.cdict != NULL and not zstd_ok(
                ZSTD_CCtx_refCDict(z.cctx, <const ZSTD_CDict*>comp.cdict)))):
        zstd_destroy(z)
        return NULL
    z.magicless = True
    return z


cdef void zstd_destroy(void* ctx) noexcept nogil:
    cdef zstd_ctx* z = <zstd_ctx*>ctx
    if z.cctx != NULL:
        ZSTD_freeCCtx(z.cctx)
    if z.dctx != NULL:
        ZSTD_freeDCtx(z.dctx)
    free(z.frame)
    free(z)


cdef inline int zstd_dict_id_at(const unsigned char* header) noexcept nogil:
    """Where a frame's dictionary id field starts, from its header descriptor at `header`:
    after the descriptor and, unless the frame is a single segment, the window byte."""
    return 1 if header[0] & FHD_SINGLE_SEGMENT else 2


cdef int zstd_compress(const zcomp* comp, void* ctx, const char* src, char* dst,
                       int cap) noexcept nogil:
    """The frame, and with a dictionary its name put in the header (4 bytes of the room):
    its length, or 0 where it does not fit (the page is then stored raw)."""
    cdef unsigned char* d = <unsigned char*>dst
    cdef int at
    cdef size_t n
    if comp.dict_name == 0:
        n = ZSTD_compress2((<zstd_ctx*>ctx).cctx, dst, cap, src, PAGE_SIZE)
        return 0 if ZSTD_isError(n) else <int>n
    if cap <= 4:
        return 0
    n = ZSTD_compress2((<zstd_ctx*>ctx).cctx, dst, cap - 4, src, PAGE_SIZE)
    if ZSTD_isError(n):
        return 0
    at = zstd_dict_id_at(d)
    if d[0] & FHD_DICT_ID or <int>n < at:
        return 0                  # zstd wrote an id after all: unnamed, so stored raw
    memmove(dst + at + 4, dst + at, n - at)
    d[at] = comp.dict_name & 0xFF
    d[at + 1] = (comp.dict_name >> 8) & 0xFF
    d[at + 2] = (comp.dict_name >> 16) & 0xFF
    d[at + 3] = comp.dict_name >> 24
    d[0] |= FHD_DICT_ID           # a 4-byte field
    return <int>n + 4


cdef bint zstd_framed(const char* src, int n) noexcept nogil:
    """A frame with zstd's magic number (little-endian 0xFD2FB528) in front."""
    cdef const unsigned char* b = <const unsigned char*>src
    return (n >= 4 and (b[0] | (<unsigned>b[1] << 8) | (<unsigned>b[2] << 16)
                        | (<unsigned>b[3] << 24)) == ZSTD_MAGICNUMBER)


cdef const ZSTD_DDict* zstd_ddict_named(const zcomp* comp, unsigned name) noexcept nogil:
    """The DDict of the dictionary named `name`: the compressor's own or an older one; NULL
    if it has none of that name."""
    cdef int i
    if comp.ddict != NULL and name == comp.dict_name:
        return <const ZSTD_DDict*>comp.ddict
    for i in range(comp.nr_older):
        if comp.older_names[i] == name:
            return <const ZSTD_DDict*>comp.older[i]
    return NULL


cdef const ZSTD_DDict* zstd_ddict_for(const zcomp* comp, unsigned dict_id) noexcept nogil:
    """For a frame without a name (written before names, or by a daemon before this one): the
    DDict of the dictionary of zstd's id `dict_id`, the compressor's own or an older one. A
    frame naming none (id 0) gets the own one, as before names a raw-content dictionary had
    no id; a frame naming one the compressor lacks gets NULL."""
    cdef int i
    if dict_id == 0 or dict_id == comp.dict_id:
        return <const ZSTD_DDict*>comp.ddict
    for i in range(comp.nr_older):
        if ZSTD_getDictID_fromDDict(<const ZSTD_DDict*>comp.older[i]) == dict_id:
            return <const ZSTD_DDict*>comp.older[i]
    return NULL


cdef int zstd_decompress(const zcomp* comp, void* ctx, const char* src, int n,
                         char* dst) noexcept nogil:
    """A frame back into a page, with the dictionary it names; -1 where it names one this
    compressor does not have (a read error: never decoded with another)."""
    cdef zstd_ctx* z = <zstd_ctx*>ctx
    cdef bint magicless = not zstd_framed(src, n)
    cdef ZSTD_frameHeader h
    cdef const ZSTD_DDict* ddict
    cdef int start = 0 if magicless else 4          # the header descriptor
    cdef int at
    cdef size_t out
    if magicless != z.magicless:
        if ZSTD_isError(ZSTD_DCtx_setParameter(
                z.dctx, ZSTD_d_format, ZSTD_f_zstd1_magicless if magicless else ZSTD_f_zstd1)):
            return -1
        z.magicless = magicless
    if ZSTD_getFrameHeader_advanced(&h, src, n, ZSTD_f_zstd1_magicless if magicless
                                    else ZSTD_f_zstd1) != 0:
        return -1
    ddict = zstd_ddict_named(comp, h.dictID) if h.dictID & NAME_BIT else NULL
    if ddict != NULL:
        # The name out, as zstd wrote the frame: zstd refuses a DDict of another id.
        at = start + zstd_dict_id_at(<const unsigned char*>src + start)
        if n - 4 > ZCOMP_BUFFER or n < at + 4:
            return -1
        memcpy(z.frame, src, at)
        z.frame[start] = <char>(<unsigned char>src[start] & ~FHD_DICT_ID)
        memcpy(z.frame + at, src + at + 4, n - at - 4)
        src, n = z.frame, n - 4
    else:
        ddict = zstd_ddict_for(comp, h.dictID)
        if ddict == NULL and h.dictID != 0:
            return -1                                # its dictionary is not here
    out = ZSTD_decompress_usingDDict(z.dctx, dst, PAGE_SIZE, src, n, ddict)
    return 0 if not ZSTD_isError(out) and out == PAGE_SIZE else -1


cdef zcomp_ops LZ4 = zcomp_ops(
    name=b"lz4", level_default=1, level_min=1, level_max=65537,   # lz4: the acceleration
    ctx_create=lz4_create, ctx_destroy=lz4_destroy,
    compress=lz4_compress, decompress=lz4_decompress)
cdef zcomp_ops LZ4HC = zcomp_ops(
    name=b"lz4hc", level_default=9, level_min=1, level_max=12,
    ctx_create=lz4hc_create, ctx_destroy=lz4_destroy,
    compress=lz4hc_compress, decompress=lz4_decompress)
cdef zcomp_ops ZSTD = zcomp_ops(
    name=b"zstd", level_default=3, level_min=-22, level_max=22,
    ctx_create=zstd_create, ctx_destroy=zstd_destroy,
    compress=zstd_compress, decompress=zstd_decompress)


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


def dictionary_id(bytes data) -> int:
    """A zstd dictionary's id (0: none, or a raw-content dictionary)."""
    return ZSTD_getDictID_fromDict(<const char*>data, len(data))


def dictionary_name(bytes data) -> int:
    """The name the frames written with dictionary `data` carry: 31 bits of a hash of its
    bytes (BLAKE2b), the top bit set. Two dictionaries a device's pages may depend on must
    not share one (the device refuses the second)."""
    return NAME_BIT | int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(),
                                     "little") & ~NAME_BIT


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


cdef ZSTD_compressionParameters _page_dict_params(int level, size_t dict_size) noexcept nogil:
    """zstd's parameters for one page after a dictionary of `dict_size`, with the tables of
    the binary-tree strategies (btlazy2 and up: zstd's higher levels) cut to what a
    dictionary and a page can fill. zstd sizes them for its window, which it rounds up past
    the dictionary (a 1 MiB one at level 19: a 2 MiB window, tables of 32 MiB); a tree of
    2**chainLog entries holds 2**(chainLog-1) positions, so one bit over the dictionary's size
    holds it all (a page's own positions push out the dictionary's oldest), and a hash of a
    quarter of that finds the same matches: on the bench's corpus, objects the same size to
    0.001 % (levels 16 and 19, dictionaries of 110 KiB to 1 MiB), the 1 MiB dictionary's
    CDict at level 19 in 10 MiB."""
    cdef ZSTD_compressionParameters p = ZSTD_getCParams(level, PAGE_SIZE, dict_size)
    cdef unsigned bits = 1
    if p.strategy >= ZSTD_btlazy2:
        while (<size_t>1 << bits) < dict_size:
            bits += 1
        p.chainLog = min(p.chainLog, bits + 1)
        p.hashLog = min(p.hashLog, p.chainLog - 2)
    return p


cdef str _prepare_dictionary(zcomp* comp, str name, bytes dictionary):
    """zstd's CDict (at the compressor's level) and DDict, made once; why not, or None. Both
    refer to `dictionary`, which the caller keeps until comp is freed (one copy, not three)."""
    cdef const char* d = dictionary
    cdef size_t n = len(dictionary)
    if name != "zstd":
        return f"{name} takes no dictionary"
    if n == 0:
        return "an empty dictionary"
    with nogil:
        comp.cdict = ZSTD_createCDict_advanced(d, n, ZSTD_dlm_byRef, ZSTD_dct_auto,
                                               _page_dict_params(comp.level, n), ZSTD_defaultCMem)
        comp.ddict = ZSTD_createDDict_byReference(d, n)
        comp.dict_id = ZSTD_getDictID_fromDict(d, n)
    if comp.cdict == NULL or comp.ddict == NULL:
        return "not a zstd dictionary"
    comp.dict_name = dictionary_name(dictionary)
    return None


cdef str _prepare_older(zcomp* comp, str name, tuple older):
    """DDicts of the `older` dictionaries (bytes each), for decompression only; they refer
    to the bytes, which the caller keeps until comp is freed. Why not, or None."""
    cdef bytes d
    if name != "zstd":
        return f"{name} takes no dictionary"
    comp.older = <void**>calloc(len(older), sizeof(void*))
    comp.older_names = <unsigned int*>calloc(len(older), sizeof(unsigned int))
    if comp.older == NULL or comp.older_names == NULL:
        return "no memory for the older dictionaries"
    for d in older:
        comp.older[comp.nr_older] = ZSTD_createDDict_byReference(<const char*>d, len(d))
        if comp.older[comp.nr_older] == NULL:
            return "an older dictionary is not a zstd dictionary"
        comp.older_names[comp.nr_older] = dictionary_name(d)
        comp.nr_older += 1
    return None


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
