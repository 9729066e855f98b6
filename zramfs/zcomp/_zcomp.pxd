# Compressors and their streams, for the device's data path (cimport zramfs.zcomp._zcomp).
#
# A zcomp is one device's compressor: an algorithm, a level, and a fixed set of streams set up
# when disksize is written (docs/design.md, hazard 4: nothing big is allocated on the request path). A request
# takes a stream, compresses or decompresses with it, and puts it back:
#
#     s = zcomp_stream_get(comp)
#     n = zcomp_compress(comp, s, page, cap)       # the result is in s.buffer
#     zcomp_stream_put(s)
#
# zcomp_compress() and zcomp_decompress() are the only doors to an algorithm, as in the
# kernel's zcomp.c: no caller touches a backend's ops or context.

from zramfs.pthread cimport pthread_mutex_t

cdef enum:
    ZCOMP_BUFFER = 8192        # more than any algorithm's bound for one page

cdef struct zcomp

ctypedef struct zcomp_ops:
    const char* name
    int level_default
    int level_min
    int level_max
    # A stream's context, bound to `comp`'s level and dictionary (made before the streams).
    void* (*ctx_create)(const zcomp* comp) noexcept nogil
    void (*ctx_destroy)(void* ctx) noexcept nogil
    # Returns the compressed length, or 0 if it does not fit dst_cap (store the page raw).
    # `comp` gives the level and the dictionary, if any.
    int (*compress)(const zcomp* comp, void* ctx, const char* src, char* dst,
                    int dst_cap) noexcept nogil
    # Returns 0 when exactly one page came out, -1 otherwise.
    int (*decompress)(const zcomp* comp, void* ctx, const char* src, int src_len,
                      char* dst) noexcept nogil

ctypedef struct zstream:
    pthread_mutex_t lock
    void* ctx
    char* buffer               # compressed output, ZCOMP_BUFFER bytes; page-aligned, so it
                               # is also where a compressed written-back page is read into
    char* page                 # a scratch page, for read-modify-write

cdef struct zcomp:
    const zcomp_ops* ops
    int level
    void* cdict                # a dictionary prepared for compression at `level`, or NULL
    void* ddict                # ... and for decompression
    unsigned int dict_id       # its id (0: none, or raw content)
    unsigned int dict_name     # the name its frames carry (dictionary_name; 0: none)
    void** older               # DDicts of dictionaries pages may have been compressed with
    unsigned int* older_names  # (and their names) before (a restart that loaded another):
    int nr_older               # decompression only
    int nr_streams             # shared: borrowed with zcomp_stream_get/put
    int nr_private             # after them: one per owner thread, zcomp_private_stream
    zstream* streams
    unsigned int hint

cdef zstream* zcomp_stream_get(zcomp* comp) noexcept nogil
cdef void zcomp_stream_put(zstream* s) noexcept nogil
cdef zstream* zcomp_private_stream(zcomp* comp, int i) noexcept nogil


cdef class Compressor:
    cdef zcomp* comp
    cdef bytes dictionary      # zstd's, which comp's CDict and DDict refer to, not copy
    cdef tuple older           # ... and those comp.older's DDicts refer to
    cdef readonly str name
    cdef readonly int level
    cdef readonly int streams


cdef inline int zcomp_compress(zcomp* comp, zstream* st, const char* page,
                               int cap) noexcept nogil:
    """One page into st.buffer: its compressed length, or 0 if that exceeds `cap` (store the
    page raw). The caller holds `st`, a stream of `comp`."""
    return comp.ops.compress(comp, st.ctx, page, st.buffer, cap)


cdef inline int zcomp_decompress(zcomp* comp, zstream* st, const char* src, int n,
                                 char* page) noexcept nogil:
    """`n` bytes of `src` back into one page: 0, or -1 if they are not one page's worth."""
    return comp.ops.decompress(comp, st.ctx, src, n, page)
