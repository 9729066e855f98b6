# lzo and lzo-rle (included by _zcomp.pyx): LZO1X-1 from liblzo2, as the kernel's
# backend_lzo.c. The kernel's lzo-rle writes LZO1X with a run-length extension of its own
# that liblzo2 does not have; here lzo-rle stores plain LZO1X-1 objects under that name. An
# object never leaves the device (not through writeback either: a page written back is read
# back by the same daemon), so only its size and speed matter, and lzo-rle's extension pays
# off only on long runs of one byte, which zram stores as same-filled pages before any
# compressor sees them. LZO has no levels.

cdef extern from "lzo1x.h" nogil:
    ctypedef unsigned long lzo_uint
    int LZO_E_OK
    int LZO1X_1_MEM_COMPRESS
    int lzo_init()
    int lzo1x_1_compress(const unsigned char* src, lzo_uint src_len, unsigned char* dst,
                         lzo_uint* dst_len, void* wrkmem)
    int lzo1x_decompress_safe(const unsigned char* src, lzo_uint src_len, unsigned char* dst,
                              lzo_uint* dst_len, void* wrkmem)

if lzo_init() != LZO_E_OK:
    raise ImportError("liblzo2 failed its lzo_init() check")


cdef void* lzo_create(const zcomp* comp) noexcept nogil:
    return malloc(LZO1X_1_MEM_COMPRESS)


cdef void lzo_destroy(void* ctx) noexcept nogil:
    free(ctx)


cdef int lzo_compress(const zcomp* comp, void* ctx, const char* src, char* dst,
                      int cap) noexcept nogil:
    # dst is a stream's buffer of ZCOMP_BUFFER bytes, more than LZO1X's worst case for a
    # page (4096 + 4096/16 + 64 + 3): LZO1X takes no bound, so it compresses in full first.
    cdef lzo_uint n = 0
    if lzo1x_1_compress(<const unsigned char*>src, PAGE_SIZE, <unsigned char*>dst, &n,
                        ctx) != LZO_E_OK or n > <lzo_uint>cap:
        return 0
    return <int>n


cdef int lzo_decompress(const zcomp* comp, void* ctx, const char* src, int n,
                        char* dst) noexcept nogil:
    cdef lzo_uint out = PAGE_SIZE
    if lzo1x_decompress_safe(<const unsigned char*>src, n, <unsigned char*>dst, &out,
                             NULL) != LZO_E_OK:
        return -1
    return 0 if out == PAGE_SIZE else -1


cdef zcomp_ops LZO = zcomp_ops(
    name=b"lzo", level_default=0, level_min=0, level_max=0,
    ctx_create=lzo_create, ctx_destroy=lzo_destroy,
    compress=lzo_compress, decompress=lzo_decompress)
cdef zcomp_ops LZO_RLE = zcomp_ops(
    name=b"lzo-rle", level_default=0, level_min=0, level_max=0,
    ctx_create=lzo_create, ctx_destroy=lzo_destroy,
    compress=lzo_compress, decompress=lzo_decompress)
