# zstd (included by _zcomp.pyx): libzstd, as the kernel's backend_zstd.c, with its
# dictionaries: the lean frame format, a dictionary's name in each frame, and the CDict/DDict
# made once per compressor. The compress and decompress functions run without the GIL, each
# context by one stream holder at a time; the dictionary set-up runs with it, at disksize.

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
        ZSTD_btopt
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


cdef zcomp_ops ZSTD = zcomp_ops(
    name=b"zstd", level_default=3, level_min=-22, level_max=22,
    ctx_create=zstd_create, ctx_destroy=zstd_destroy,
    compress=zstd_compress, decompress=zstd_decompress)


def dictionary_id(bytes data) -> int:
    """A zstd dictionary's id (0: none, or a raw-content dictionary)."""
    return ZSTD_getDictID_fromDict(<const char*>data, len(data))


def dictionary_name(bytes data) -> int:
    """The name the frames written with dictionary `data` carry: 31 bits of a hash of its
    bytes (BLAKE2b), the top bit set. Two dictionaries a device's pages may depend on must
    not share one (the device refuses the second)."""
    return NAME_BIT | int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(),
                                     "little") & ~NAME_BIT


cdef ZSTD_compressionParameters _page_dict_params(int level, size_t dict_size) noexcept nogil:
    """zstd's parameters for one page after a dictionary of `dict_size`, with the tables of
    the binary-tree strategies (btlazy2 and up: zstd's higher levels) cut to what a
    dictionary and a page can fill. zstd sizes them for its window, which it rounds up past
    the dictionary (a 1 MiB one at level 19: a 2 MiB window, tables of 32 MiB); a tree of
    2**chainLog entries holds 2**(chainLog-1) positions, so one bit over the dictionary's size
    holds it all (a page's own positions push out the dictionary's oldest), and a hash of a
    quarter of that finds the same matches: on the bench's corpus, objects the same size to
    0.001 % (levels 16 and 19, dictionaries of 110 KiB to 1 MiB), the 1 MiB dictionary's
    CDict at level 19 in 10 MiB.

    Levels 18 and up (btultra, btultra2) run btopt's parser, with their own search depth and
    target length: on a page after a dictionary their extra work buys little. On a sixteenth
    of the bench's corpus with its 1 MiB dictionary (2026-12-06, recompression's sizes, each
    page the smaller of lz4's and zstd's size class): 0.6482x lz4's memory at 1009 pages/s a
    thread with zstd's level 19 (btultra and btultra2 alike), 0.6500x at 1662 pages/s with
    btopt; a recompression of the whole corpus takes 0.6x the time for 0.3 % more memory.
    (With btopt the cut tables give frames 0.2 % larger than zstd's full ones, in the 0.3 %.)"""
    cdef ZSTD_compressionParameters p = ZSTD_getCParams(level, PAGE_SIZE, dict_size)
    cdef unsigned bits = 1
    if p.strategy >= ZSTD_btlazy2:
        while (<size_t>1 << bits) < dict_size:
            bits += 1
        p.chainLog = min(p.chainLog, bits + 1)
        p.hashLog = min(p.hashLog, p.chainLog - 2)
    p.strategy = min(p.strategy, <int>ZSTD_btopt)
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
