# lz4 and lz4hc (included by _zcomp.pyx): liblz4, as the kernel's backend_lz4.c and
# backend_lz4hc.c. Called without the GIL, each context by one stream holder at a time.

cdef extern from "lz4.h" nogil:
    int LZ4_sizeofState()
    int LZ4_compress_fast_extState(void* state, const char* src, char* dst, int src_size,
                                   int dst_capacity, int acceleration)
    int LZ4_decompress_safe(const char* src, char* dst, int compressed_size, int dst_capacity)

cdef extern from "lz4hc.h" nogil:
    int LZ4_sizeofStateHC()
    int LZ4_compress_HC_extStateHC(void* state, const char* src, char* dst, int src_size,
                                   int dst_capacity, int level)


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


cdef zcomp_ops LZ4 = zcomp_ops(
    name=b"lz4", level_default=1, level_min=1, level_max=65537,   # lz4: the acceleration
    ctx_create=lz4_create, ctx_destroy=lz4_destroy,
    compress=lz4_compress, decompress=lz4_decompress)
cdef zcomp_ops LZ4HC = zcomp_ops(
    name=b"lz4hc", level_default=9, level_min=1, level_max=12,
    ctx_create=lz4hc_create, ctx_destroy=lz4_destroy,
    compress=lz4hc_compress, decompress=lz4_decompress)
