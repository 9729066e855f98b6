# Dedup of identical pages (cimport zramfs.zram._dedup): the index of a device's reference counted
# objects, found by a hash of their page or by their handle. The slot table is the truth: an
# object's count is the number of slots with ZRAM_DEDUP and its handle, and the index is a
# cache of it that zdedup_rebuild makes again from a scan of the table. No slot points into
# the index.
#
# The device reaches it only through the two hooks it sets in the meta (zram.dedup_store and
# zram.dedup_put, see _zram.pxd); tiering asks zdedup_shared. All run without the GIL.
from libc.stdint cimport uint16_t, uint32_t, uint64_t

from zramfs.zram._zram cimport zram_meta, zslot
from zramfs.pthread cimport pthread_mutex_t

ctypedef struct zdedup_entry:
    uint64_t handle
    uint64_t hash          # XXH3_64bits of the page (with E_HASHED in flags)
    uint32_t refs          # ZRAM_DEDUP slots with this handle, and writers' pins on it
    uint16_t size          # the object's size, as its slots' `size`
    uint16_t flags         # ZRAM_HUGE and the priority bits: how to decompress it; E_HASHED
    uint32_t next_hash     # chains: an entry's number + 1, 0 ends
    uint32_t next_handle

ctypedef struct zdedup:
    pthread_mutex_t lock   # the index lock: after a slot lock, and nothing is taken under it
    zdedup_entry* entries  # `capacity` of them, from calloc: untouched ones cost nothing
    uint32_t* by_hash      # buckets, `mask + 1` of each
    uint32_t* by_handle
    uint64_t mask
    uint32_t capacity
    uint32_t used          # entries ever handed out (the rest are untouched)
    uint32_t free_list     # freed entries, chained through next_hash
    # dedup_stat, under the lock (read without it): objects, references, and the sum over
    # objects of size * (refs - 1)
    size_t nr_entries
    size_t nr_refs
    size_t saved

# Slot lock held: the object in the slot is shared with other slots (or a writer is checking
# it) just now. Tiering leaves such objects where they are.
cdef bint zdedup_shared(zram_meta* m, zslot* s) noexcept nogil

# The index made again from the slot table: every ZRAM_DEDUP slot counted on its handle; with
# `rehash` each object is read once and hashed (else its twins are not found until written
# again). No I/O or maintenance may run meanwhile (a restart, before the device goes live).
# 0 or -ENOMEM; -EIO when an object does not read back (it is then counted, not hashed).
cdef int zdedup_rebuild(zram_meta* m, bint rehash) noexcept nogil
