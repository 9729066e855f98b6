# cython: language_level=3
"""Dedup of identical pages: a page whose content equals a stored object's shares that object.

Owns: the index of a device's reference counted objects (`zdedup`), the write path's search
for a twin, and dedup_stat. The device calls in through two hooks it keeps in its meta
(`zram_meta.dedup_store` in the store path, `zram_meta.dedup_put` in zram_slot_free), set by `enable`
before the device goes live; the rest of the data path knows nothing of it.

    meta = Meta(64 << 20, "lz4")
    _dedup.enable(meta)            # before the disk is attached: dedup is a pre-init setting
    _dedup.stat(meta)              # (pages_deduplicated, bytes_saved, hash_table_entries)

How a page is stored (slot lock held, the page not same-filled, which stays in the slot):
1. its content hash, XXH3_64bits of the 4 KiB page;
2. under the index lock, the newest object with that hash gets a reference (a pin), so it
   cannot go while it is looked at; no lock is held while it is decompressed;
3. byte for byte: the object decompressed into the stream's buffer and compared (memcmp);
4. equal: the slot points to the object (ZRAM_DEDUP, the pin now the slot's reference), then
   the slot's old content is freed (hazard 8's order); not equal (a hash collision) or none
   found: the page is compressed and stored as a new object the index knows, as today.

The slot table is the truth, the index a cache. A ZRAM_DEDUP slot holds one reference on the
object whose handle it has; an object's count is the number of such slots (plus pins of
writers checking it, which last only while they hold their own slot's lock). An object is
freed by whoever drops its last reference: a slot being freed or overwritten, or a writer
whose check failed. zdedup_rebuild makes the index again from a scan of the table; without a
rehash the objects are counted but not findable, and dedup simply finds fewer twins. Nothing
in a slot points into the index; the index holds handles, which compaction never changes.

Objects the index cannot take (it is full: more objects than pages, which only writers in
flight can make) are stored without ZRAM_DEDUP, as with dedup off.

Tiering (zramfs.zram._tiering) leaves a shared object alone: writing one slot's page back or
recompressing it would free nothing (and recompression would store the page twice).
An object with one reference is written back, recompressed or evicted as any other: its
slot's reference goes with it, and the new home (a backing block, a recompressed object) is
outside the index. Compaction moves objects under their handles, and a mapped (pinned)
object is never moved, so a shared object read by two slots at once is safe.

Lock order, outermost first: a compression stream; a slot lock; the eviction lock (a writer
over mem_limit evicts, and eviction frees through zram_slot_free); the index lock, under which
nothing else is taken (decompression, the pool's map and free all happen outside it); the
allocator's class locks. Reset needs nothing: the index goes with the meta, after the drain.
The hooks and zdedup_* run without the GIL (each says which locks it wants); the Python
functions hold it, and rebuild drops it while it scans.
"""
from __future__ import annotations

from libc.errno cimport EIO, ENOMEM
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memset

from zramfs.zcomp._zcomp cimport zcomp_stream_get, zcomp_stream_put, zstream
from zramfs.zram._zram cimport (Meta, zram_meta, zram_obj_free, zram_slot_compress, zram_slot_free,
                                zram_slot_load, zram_stat_stored, zslot)
from zramfs.pthread cimport (pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock,
                             pthread_mutex_unlock)
from zramfs.common cimport PAGE_SIZE, posix_memalign, za_load
from zramfs.zram.zram cimport (ZRAM_DEDUP, ZRAM_HUGE, ZRAM_PRIO_MASK, ZRAM_SAME, ZRAM_WB,
                               zram_slot_flags, zram_slot_set_flags)

# xxHash's XXH3: the fastest well-kept non-cryptographic hash for a 4 KiB input (tens of GB/s,
# vectorised, stable output across versions since 0.8), from Debian's libxxhash. A collision
# costs only a wasted compare: every match is confirmed byte for byte.
cdef extern from "xxhash.h" nogil:
    uint64_t XXH3_64bits(const void* data, size_t length)

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutexattr_t:
        pass
    int PTHREAD_MUTEX_ADAPTIVE_NP
    int pthread_mutexattr_init(pthread_mutexattr_t*)
    int pthread_mutexattr_settype(pthread_mutexattr_t*, int)
    int pthread_mutexattr_destroy(pthread_mutexattr_t*)

cdef enum:
    E_HASHED = 1 << 15       # an entry's flag: in the hash chains (its hash is known)
    E_OBJ_FLAGS = ZRAM_HUGE | ZRAM_PRIO_MASK
    SLACK = 1024             # entries beyond one a page: objects of writers in flight


# --- the index: entries by hash and by handle, under the index lock --------------------------

cdef inline zdedup_entry* _entry(zdedup* d, uint32_t ref) noexcept nogil:
    return &d.entries[ref - 1]


cdef inline uint64_t _handle_bucket(zdedup* d, uint64_t handle) noexcept nogil:
    cdef uint64_t x = handle * <uint64_t>0x9E3779B97F4A7C15
    return (x ^ (x >> 29)) & d.mask


cdef uint32_t _by_handle(zdedup* d, uint64_t handle) noexcept nogil:
    """Index lock held: the entry of an object, 0 if none."""
    cdef uint32_t ref = d.by_handle[_handle_bucket(d, handle)]
    while ref and _entry(d, ref).handle != handle:
        ref = _entry(d, ref).next_handle
    return ref


cdef uint32_t _alloc_entry(zdedup* d) noexcept nogil:
    """Index lock held: a free entry (refs 0, in no chain), 0 when all are taken."""
    cdef uint32_t ref = d.free_list
    if ref:
        d.free_list = _entry(d, ref).next_hash
    elif d.used < d.capacity:
        d.used += 1
        ref = d.used
    if ref:
        memset(_entry(d, ref), 0, sizeof(zdedup_entry))
    return ref


cdef void _link(zdedup* d, uint32_t ref) noexcept nogil:
    """Index lock held: the entry into the handle chains, and the hash chains if hashed."""
    cdef zdedup_entry* e = _entry(d, ref)
    cdef uint64_t b = _handle_bucket(d, e.handle)
    e.next_handle = d.by_handle[b]
    d.by_handle[b] = ref
    if e.flags & E_HASHED:
        b = e.hash & d.mask
        e.next_hash = d.by_hash[b]
        d.by_hash[b] = ref
    d.nr_entries += 1


cdef void _unlink_and_free(zdedup* d, uint32_t ref) noexcept nogil:
    """Index lock held: the entry out of its chains and onto the free list."""
    cdef zdedup_entry* e = _entry(d, ref)
    cdef uint32_t* p = &d.by_handle[_handle_bucket(d, e.handle)]
    while p[0] != ref:
        p = &_entry(d, p[0]).next_handle
    p[0] = e.next_handle
    if e.flags & E_HASHED:
        p = &d.by_hash[e.hash & d.mask]
        while p[0] != ref:
            p = &_entry(d, p[0]).next_hash
        p[0] = e.next_hash
    d.nr_entries -= 1
    e.refs = 0
    e.next_hash = d.free_list
    d.free_list = ref


cdef bint _put(zdedup* d, uint64_t handle) noexcept nogil:
    """Drops a reference (a slot's or a pin); true when it was the last: the entry is gone and
    the caller frees the object. An object the index does not know is kept (a leak, never a
    page freed under another slot; zdedup_rebuild counts it again)."""
    cdef uint32_t ref
    cdef zdedup_entry* e
    cdef bint last = False
    pthread_mutex_lock(&d.lock)
    ref = _by_handle(d, handle)
    if ref:
        e = _entry(d, ref)
        e.refs -= 1
        d.nr_refs -= 1
        if e.refs == 0:
            _unlink_and_free(d, ref)
            last = True
        else:
            d.saved -= e.size
    pthread_mutex_unlock(&d.lock)
    return last


# --- the device's hooks ----------------------------------------------------------------------

cdef bint _dedup_put(zram_meta* m, uint64_t handle) noexcept nogil:
    """zram.dedup_put: zram_slot_free's, slot lock held."""
    return _put(<zdedup*>m.dedup, handle)


ctypedef struct zpin:
    uint64_t handle
    uint32_t size
    uint32_t flags


cdef bint _pin_or_reserve(zdedup* d, uint64_t hash, zpin* out,
                          uint32_t* reserved) noexcept nogil:
    """A reference on the newest object with this hash, so it stays while it is compared;
    where there is none, a free entry for the object about to be stored (`reserved`, 0 when
    none is left), in the same hold of the lock: a unique page takes it twice, not three
    times."""
    cdef uint32_t ref
    cdef zdedup_entry* e
    pthread_mutex_lock(&d.lock)
    ref = d.by_hash[hash & d.mask]
    while ref and _entry(d, ref).hash != hash:
        ref = _entry(d, ref).next_hash
    if ref:
        e = _entry(d, ref)
        e.refs += 1
        d.nr_refs += 1
        d.saved += e.size
        out.handle, out.size, out.flags = e.handle, e.size, e.flags & E_OBJ_FLAGS
    else:
        reserved[0] = _alloc_entry(d)
    pthread_mutex_unlock(&d.lock)
    return ref != 0


cdef void _unpin(zram_meta* m, zpin* p) noexcept nogil:
    """The pin of a twin that was not one; its object freed if every slot let go meanwhile."""
    if _put(<zdedup*>m.dedup, p.handle):
        zram_obj_free(m, p.handle, p.size)


cdef bint _share(zram_meta* m, zslot* s, const char* page, uint64_t hash, zstream* st,
                 uint32_t* reserved) noexcept nogil:
    """Slot lock held: the slot made to share a stored twin of `page`, if there is one; its old
    content freed after. Uses st.buffer (free until the page is compressed). Where there is
    no twin to check, `reserved` gets an entry for the new object (or 0)."""
    cdef zpin p
    cdef zslot obj, old
    if not _pin_or_reserve(<zdedup*>m.dedup, hash, &p, reserved):
        return False
    # A slot of our own for the object, to read it with the device's own load.
    obj.handle, obj.size, obj.flags = p.handle, p.size, p.flags
    if zram_slot_load(m, &obj, st.buffer, st) != 0 or memcmp(st.buffer, page, PAGE_SIZE) != 0:
        _unpin(m, &p)
        return False
    old = s[0]
    s.handle = p.handle
    s.size = p.size
    zram_slot_set_flags(&s.flags, ZRAM_DEDUP | p.flags)
    zram_stat_stored(m, ZRAM_DEDUP | p.flags, 0)     # the object is counted already
    zram_slot_free(m, &old)       # may be the same object: the pin kept it
    return True


cdef int _dedup_store(zram_meta* m, zslot* s, const char* page, zstream* st) noexcept nogil:
    """zram.dedup_store: slot lock held, the page not same-filled. A twin's object shared, or
    the page compressed and stored as a new object the index knows. 0 or -errno."""
    cdef zdedup* d = <zdedup*>m.dedup
    cdef uint64_t hash = XXH3_64bits(page, PAGE_SIZE)
    cdef uint32_t ref = 0
    cdef uint32_t flags = ZRAM_DEDUP
    cdef zdedup_entry* e
    cdef int rc
    if _share(m, s, page, hash, st, &ref):
        return 0
    # An entry taken before the object is stored, so an object is never ZRAM_DEDUP without
    # one; none left (or a twin that was not one): the object is an ordinary one.
    if not ref:
        flags = 0
    rc = zram_slot_compress(m, s, page, st, flags)       # the device's own store path
    if not ref:
        return rc
    pthread_mutex_lock(&d.lock)
    e = _entry(d, ref)
    if rc == 0:
        # Only this slot (locked) has the handle yet: nobody can put it before it is linked.
        e.handle = s.handle
        e.hash = hash
        e.size = <uint16_t>s.size
        e.flags = <uint16_t>((zram_slot_flags(&s.flags) & E_OBJ_FLAGS) | E_HASHED)
        e.refs = 1
        d.nr_refs += 1
        _link(d, ref)
    else:
        e.next_hash = d.free_list
        d.free_list = ref
    pthread_mutex_unlock(&d.lock)
    return rc


# --- for tiering and restart -----------------------------------------------------------------

cdef bint zdedup_shared(zram_meta* m, zslot* s) noexcept nogil:
    cdef zdedup* d = <zdedup*>m.dedup
    cdef uint32_t ref
    cdef bint shared = False
    if d == NULL or not zram_slot_flags(&s.flags) & ZRAM_DEDUP:
        return False
    pthread_mutex_lock(&d.lock)
    ref = _by_handle(d, s.handle)
    if ref:
        shared = _entry(d, ref).refs > 1
    pthread_mutex_unlock(&d.lock)
    return shared


cdef void _clear(zdedup* d) noexcept nogil:
    """Index lock held: empty, as when made (the buckets zeroed, the entries all free)."""
    memset(d.by_hash, 0, (d.mask + 1) * sizeof(uint32_t))
    memset(d.by_handle, 0, (d.mask + 1) * sizeof(uint32_t))
    d.used = 0
    d.free_list = 0
    d.nr_entries = d.nr_refs = d.saved = 0


cdef int zdedup_rebuild(zram_meta* m, bint rehash) noexcept nogil:
    cdef zdedup* d = <zdedup*>m.dedup
    cdef size_t i
    cdef zslot* s
    cdef uint32_t f, ref
    cdef zdedup_entry* e
    cdef zstream* st = NULL
    cdef char* page = NULL
    cdef int rc = 0
    if d == NULL:
        return 0
    if rehash:
        if posix_memalign(<void**>&page, PAGE_SIZE, PAGE_SIZE) != 0:
            return -ENOMEM
        st = zcomp_stream_get(m.comp)
    pthread_mutex_lock(&d.lock)
    _clear(d)
    for i in range(m.nr_pages):
        s = &m.table[i]
        f = zram_slot_flags(&s.flags)
        if not f & ZRAM_DEDUP or not s.size or f & (ZRAM_SAME | ZRAM_WB):
            continue
        ref = _by_handle(d, s.handle)
        if ref:
            e = _entry(d, ref)
            e.refs += 1
            d.nr_refs += 1
            d.saved += e.size
            continue
        ref = _alloc_entry(d)
        if not ref:
            rc = -ENOMEM          # cannot happen: at most one object a page
            break
        e = _entry(d, ref)
        e.handle = s.handle
        e.size = <uint16_t>s.size
        e.flags = <uint16_t>(f & E_OBJ_FLAGS)
        e.refs = 1
        d.nr_refs += 1
        if rehash:
            # Index lock held over a load: nothing else runs now (the function's contract).
            if zram_slot_load(m, s, page, st) == 0:
                e.hash = XXH3_64bits(page, PAGE_SIZE)
                e.flags |= E_HASHED
            else:
                rc = -EIO
        _link(d, ref)
    pthread_mutex_unlock(&d.lock)
    if st != NULL:
        zcomp_stream_put(st)
    free(page)
    return rc


# --- Python faces ----------------------------------------------------------------------------

cdef class Index:
    """A device's index, owned by its Meta (meta.dedup) and freed with it."""
    cdef zdedup* d

    def __cinit__(self, size_t nr_pages):
        cdef pthread_mutexattr_t attr
        cdef size_t cap = min(nr_pages + SLACK, <size_t>0xFFFFFFF0)
        cdef size_t buckets = 1
        while buckets < cap:
            buckets <<= 1
        self.d = <zdedup*>calloc(1, sizeof(zdedup))
        if self.d == NULL:
            raise MemoryError("no memory for the dedup index")
        # calloc of large arrays maps zero pages lazily: entries and buckets cost as they are
        # used: 32 bytes an entry, and 2 x 4 bytes a bucket (up to 2 buckets a page).
        self.d.entries = <zdedup_entry*>calloc(cap, sizeof(zdedup_entry))
        self.d.by_hash = <uint32_t*>calloc(buckets, sizeof(uint32_t))
        self.d.by_handle = <uint32_t*>calloc(buckets, sizeof(uint32_t))
        if self.d.entries == NULL or self.d.by_hash == NULL or self.d.by_handle == NULL:
            raise MemoryError(f"no memory for a dedup index of {cap} objects")
        self.d.capacity = <uint32_t>cap
        self.d.mask = buckets - 1
        # Adaptive: the lock is held for a few lookups, so a waiter spins a little before it
        # sleeps (the futex round trip costs more than the wait).
        pthread_mutexattr_init(&attr)
        pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP)
        pthread_mutex_init(&self.d.lock, &attr)
        pthread_mutexattr_destroy(&attr)

    def __dealloc__(self):
        if self.d != NULL:
            if self.d.capacity:
                pthread_mutex_destroy(&self.d.lock)
            free(self.d.entries)
            free(self.d.by_hash)
            free(self.d.by_handle)
            free(self.d)
            self.d = NULL


def enable(Meta meta) -> None:
    """Dedup on for a meta before it is attached to its disk: it is a setting of the device's
    creation, as the kernel's pre-init attributes. Before Meta.take_over, so that objects
    shared in the previous daemon stay shared (and ZRAM_DEDUP slots stay counted); a meta
    that holds pages already gets its index from its slot table."""
    cdef Index index
    if meta.dedup is not None:
        if za_load(&meta.m.pages_stored):
            rebuild(meta, True)
        return
    index = Index(meta.m.nr_pages)
    meta.dedup = index
    meta.m.dedup = index.d
    meta.m.dedup_put = _dedup_put
    meta.m.dedup_store = _dedup_store
    if za_load(&meta.m.pages_stored):
        rebuild(meta, True)


def enabled(Meta meta) -> bool:
    return meta.dedup is not None


def stat(Meta meta) -> tuple[int, int, int]:
    """dedup_stat's fields: pages_deduplicated (pages stored beyond the first of each shared
    object), bytes_saved (the compressed bytes those pages would take again) and
    hash_table_entries (objects in the index). Writers checking a twin count for a moment."""
    cdef zdedup* d = <zdedup*>meta.m.dedup
    if d == NULL:
        return (0, 0, 0)
    cdef size_t entries = za_load(&d.nr_entries), refs = za_load(&d.nr_refs)
    return (refs - entries if refs > entries else 0, za_load(&d.saved), entries)


def rebuild(Meta meta, bint rehash=True) -> None:
    """zdedup_rebuild, for a meta no request or maintenance uses meanwhile."""
    cdef int rc
    with nogil:
        rc = zdedup_rebuild(meta.m, rehash)
    if rc == -ENOMEM:
        raise MemoryError("the dedup index is full")
    if rc:
        raise OSError(-rc, "an object of the device does not read back")


def check(Meta meta) -> str | None:
    """What is wrong with the index against the slot table, None if nothing: each object's
    count equals its ZRAM_DEDUP slots, and the statistics their sums. For tests, with no I/O
    in flight."""
    cdef zram_meta* m = meta.m
    cdef zdedup* d = <zdedup*>m.dedup
    cdef size_t i
    cdef zslot* s
    cdef uint32_t f, ref
    if d == NULL:
        return None
    counts: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for i in range(m.nr_pages):
        s = &m.table[i]
        f = zram_slot_flags(&s.flags)
        if f & ZRAM_DEDUP:
            if not s.size or f & (ZRAM_SAME | ZRAM_WB):
                return f"slot {i}: ZRAM_DEDUP on a slot without an object (flags {f:#x})"
            counts[s.handle] = counts.get(s.handle, 0) + 1
            sizes[s.handle] = s.size
    with nogil:
        pthread_mutex_lock(&d.lock)
    try:
        if d.nr_entries != <size_t>len(counts):
            return f"{d.nr_entries} entries for {len(counts)} objects"
        if d.nr_refs != sum(counts.values()):
            return f"{d.nr_refs} references for {sum(counts.values())} slots"
        if d.saved != sum(sizes[h] * (n - 1) for h, n in counts.items()):
            return f"bytes_saved {d.saved} is not the objects' sum"
        for h, n in counts.items():
            ref = _by_handle(d, h)
            if not ref:
                return f"object {h:#x} of {n} slots is not in the index"
            if _entry(d, ref).refs != n or _entry(d, ref).size != sizes[h]:
                return f"object {h:#x}: {_entry(d, ref).refs} references for {n} slots"
        return None
    finally:
        pthread_mutex_unlock(&d.lock)
