# deflate (included by _zcomp.pyx): raw deflate from zlib, as the kernel's
# backend_deflate.c (no zlib header or checksum, memLevel 9, levels 1-9, default 6). The
# window is 4 KiB, a whole page, where the kernel takes 2 KiB from the crypto API: a match
# anywhere in the page is found, for a few bytes less an object; objects never leave the
# device, so nothing needs the kernel's exact stream.

cdef extern from "zlib.h" nogil:
    ctypedef struct z_stream:
        const unsigned char* next_in
        unsigned avail_in
        unsigned char* next_out
        unsigned avail_out
        void* zalloc
        void* zfree
        void* opaque
    int Z_OK
    int Z_STREAM_END
    int Z_FINISH
    int Z_DEFLATED
    int Z_DEFAULT_STRATEGY
    int deflateInit2(z_stream* s, int level, int method, int window_bits, int mem_level,
                     int strategy)
    int deflateReset(z_stream* s)
    int deflate(z_stream* s, int flush)
    int deflateEnd(z_stream* s)
    int inflateInit2(z_stream* s, int window_bits)
    int inflateReset(z_stream* s)
    int inflate(z_stream* s, int flush)
    int inflateEnd(z_stream* s)

cdef enum:
    DEFLATE_WINDOW_BITS = -12      # raw deflate (negative), a 4 KiB window
    DEFLATE_MEM_LEVEL = 9

ctypedef struct deflate_ctx:
    z_stream c
    z_stream d
    bint c_ready
    bint d_ready


cdef void* deflate_create(const zcomp* comp) noexcept nogil:
    cdef deflate_ctx* z = <deflate_ctx*>calloc(1, sizeof(deflate_ctx))
    if z == NULL:
        return NULL
    z.c_ready = deflateInit2(&z.c, comp.level, Z_DEFLATED, DEFLATE_WINDOW_BITS,
                             DEFLATE_MEM_LEVEL, Z_DEFAULT_STRATEGY) == Z_OK
    z.d_ready = inflateInit2(&z.d, DEFLATE_WINDOW_BITS) == Z_OK
    if not (z.c_ready and z.d_ready):
        deflate_destroy(z)
        return NULL
    return z


cdef void deflate_destroy(void* ctx) noexcept nogil:
    cdef deflate_ctx* z = <deflate_ctx*>ctx
    if z.c_ready:
        deflateEnd(&z.c)
    if z.d_ready:
        inflateEnd(&z.d)
    free(z)


cdef int deflate_compress(const zcomp* comp, void* ctx, const char* src, char* dst,
                          int cap) noexcept nogil:
    cdef z_stream* s = &(<deflate_ctx*>ctx).c
    if deflateReset(s) != Z_OK:
        return 0
    s.next_in = <const unsigned char*>src
    s.avail_in = PAGE_SIZE
    s.next_out = <unsigned char*>dst
    s.avail_out = cap
    if deflate(s, Z_FINISH) != Z_STREAM_END:
        return 0                    # it did not fit `cap`: stored raw
    return cap - <int>s.avail_out


cdef int deflate_decompress(const zcomp* comp, void* ctx, const char* src, int n,
                            char* dst) noexcept nogil:
    cdef z_stream* s = &(<deflate_ctx*>ctx).d
    if inflateReset(s) != Z_OK:
        return -1
    s.next_in = <const unsigned char*>src
    s.avail_in = n
    s.next_out = <unsigned char*>dst
    s.avail_out = PAGE_SIZE
    if inflate(s, Z_FINISH) != Z_STREAM_END or s.avail_out != 0 or s.avail_in != 0:
        return -1
    return 0


cdef zcomp_ops DEFLATE = zcomp_ops(
    name=b"deflate", level_default=6, level_min=1, level_max=9,
    ctx_create=deflate_create, ctx_destroy=deflate_destroy,
    compress=deflate_compress, decompress=deflate_decompress)
