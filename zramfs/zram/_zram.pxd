# A device's slot table and data path (cimport zramfs.zram._zram): the request entry points,
# and the slot API and mm_stat's counters that tiering and dedup work over.
#
# A front end (zramfs.fuse) reaches zram_read/write/fallocate through the data ops
# (data_ops.h) by a device file's handle, without the GIL, from its worker threads; each
# returns bytes done (0 for fallocate) or a negative errno. A request first takes a reference
# on the disk's meta, only while the meta is live (zram.h's zram_get; docs/design.md, hazard
# 1); reset clears LIVE, waits for the count to drain, then frees. Maintenance (writeback,
# recompression, compaction, eviction from an attribute) holds the same reference, through
# Disk.call.
from libc.stdint cimport int64_t, uint32_t, uint64_t
from posix.types cimport off_t

from zramfs.zpool._alloc cimport Pool
from zramfs.zpool._pages cimport zregion
from zramfs.zpool.zpool cimport zpool_driver
from zramfs.zram._backing cimport zbacking
from zramfs.zram._workers cimport zworkers
from zramfs.zcomp._zcomp cimport zcomp, zstream
from zramfs.pthread cimport pthread_mutex_t

ctypedef struct zslot:
    uint64_t handle        # the object; a same-filled page's word; a written-back page's block
    uint32_t flags         # ZRAM_* bits and the slot lock (zram.h), atomic
    uint32_t size          # compressed size, 0 for an empty or same-filled page

cdef struct zram_meta

# Writes least recently used pages back until `excess` pages (and some slack) are free; set by
# zramfs.zram._tiering while eviction is on. Called by a writer over mem_limit, its slot lock held.
ctypedef void (*zram_evict_fn)(zram_meta* m, size_t excess) noexcept nogil

# Dedup's hooks, set by zramfs.zram._dedup before the device goes live and never changed after.
# store: stores a page that is not same-filled, sharing a stored twin where there is one, else
# through the device's own zram_slot_compress (slot lock held; 0 or -errno). put: drops one
# slot's reference on a ZRAM_DEDUP object; true when it was the last, so the caller frees the
# object (zram_obj_free; slot lock held).
ctypedef int (*zram_dedup_store_fn)(zram_meta* m, zslot* s, const char* page,
                                    zstream* st) noexcept nogil
ctypedef bint (*zram_dedup_put_fn)(zram_meta* m, uint64_t handle) noexcept nogil

# What writing disksize creates and reset frees (the kernel's old struct zram_meta; Meta is its
# Python face): the table, the pool, the compressors and the counters mm_stat and io_stat show.
cdef struct zram_meta:
    zslot* table
    size_t nr_pages
    const zpool_driver* driver
    void* pool
    size_t huge_size       # compressed sizes from here up are stored raw
    zcomp* comp
    zcomp* secondary[4]    # recompression algorithms by priority 1..3; [0] unused
    size_t limit_pages     # mem_limit, 0 = none (atomic)
    zworkers* workers      # NULL: every request is served inline
    uint32_t* ac_time      # per slot: last access, CLOCK_MONOTONIC_COARSE seconds
    zbacking* backing      # NULL: no backing device
    # tiering's state, owned by zramfs.zram._tiering
    int compressed_wb      # write back objects as stored (compressed_writeback)
    size_t wb_batch        # writeback I/Os in flight at once (writeback_batch_size)
    int wb_limit_enable
    size_t wb_limit        # pages still allowed to be written back, while enabled (atomic)
    zram_evict_fn evict    # NULL: a write over mem_limit fails
    size_t evicted         # pages evicted (atomic)
    size_t clock_hand      # eviction's CLOCK position (evict_lock)
    pthread_mutex_t evict_lock
    zstream* evict_stream  # eviction's private stream: it must not wait for a shared one
    char* evict_page       # a page-aligned page, for eviction (evict_lock)
    # dedup's state, owned by zramfs.zram._dedup; NULL while dedup is off
    void* dedup            # its index of objects (a zdedup)
    zram_dedup_store_fn dedup_store
    zram_dedup_put_fn dedup_put
    # mm_stat, io_stat: atomic counters
    size_t compr_data_size
    size_t pages_stored
    size_t max_used_pages
    size_t same_pages
    size_t huge_pages
    size_t huge_pages_since
    size_t failed_reads
    size_t failed_writes
    size_t invalid_io
    size_t notify_free

# A device, from hot_add to hot_remove (the kernel's struct zram; Disk is its Python face): its
# meta while initialised, and what outlives a reset.
ctypedef struct zram:
    int64_t state          # ZRAM_LIVE | references held on the meta
    uint32_t id            # the device's id, and which device of that id this is
    uint32_t generation    # (atomic; set before the disk goes live)
    zram_meta* meta             # NULL while the device is not initialised
    size_t gone            # 1: the device is removed, its file fails with EIO (atomic)
    # the block layer's stat file: lives as long as the disk, across resets
    size_t ios[3]          # read, write, discard requests
    size_t sectors[3]
    size_t ticks_ns[3]

# The FUSE layer's entry points. `generation`: the device the caller means (0: whichever);
# a disk since reused for a newer device of the same id answers EIO.
cdef ssize_t zram_read(zram* disk, uint32_t generation, char* buf, size_t size,
                        off_t off) noexcept nogil
cdef ssize_t zram_write(zram* disk, uint32_t generation, const char* buf, size_t size,
                         off_t off) noexcept nogil
cdef int zram_fallocate(zram* disk, uint32_t generation, int mode, off_t off,
                         off_t length) noexcept nogil

# Requests the data path has taken, on every device of this process, since it started: how
# tiering's idle-priority threads see that foreground I/O runs.
cdef size_t zram_requests() noexcept nogil

# The slot API, for tiering and dedup. Each takes the slot's lock held (zram_slot_lock) unless
# it says otherwise, and a reference on the meta.
cdef void zram_slot_free(zram_meta* m, zslot* s) noexcept nogil
cdef int zram_slot_load(zram_meta* m, zslot* s, char* page, zstream* st) noexcept nogil
cdef int zram_slot_replace(zram_meta* m, zslot* s, const char* data, size_t n, uint32_t flags,
                           bint may_evict) noexcept nogil
cdef int zram_slot_compress(zram_meta* m, zslot* s, const char* page, zstream* st,
                            uint32_t flags) noexcept nogil
cdef bint zram_slot_has_object(zslot* s, uint32_t flags) noexcept nogil

# mm_stat, moved here only (atomic: any thread, any lock). A slot took (stored) or let go of
# (dropped) content of `flags`; `size`: an object's bytes new to the pool (0: none, or shared).
# zram_obj_free frees an object and takes its bytes off, with its last slot or dedup pin.
cdef void zram_stat_stored(zram_meta* m, uint32_t flags, size_t size) noexcept nogil
cdef void zram_stat_dropped(zram_meta* m, uint32_t flags) noexcept nogil
cdef void zram_obj_free(zram_meta* m, uint64_t handle, size_t size) noexcept nogil


cdef class Meta:
    cdef zram_meta* m
    cdef zregion region           # the memfd the table, access times and counters live in
    cdef Pool pool
    cdef object compressor
    cdef readonly size_t disksize
    cdef readonly int workers
    cdef readonly object backing
    cdef readonly dict secondary
    cdef readonly object dedup    # zramfs.zram._dedup's index, which frees itself; None: off
    cdef readonly object adopted  # what a meta adopted in place holds (Adopted); None: new
    cdef int tier_stop            # 1: the running writeback or recompression stops (atomic)


cdef class Disk:
    cdef zram* disk
    cdef readonly Meta meta
