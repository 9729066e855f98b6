# A live restart's side of the data path, included into _zram.pyx: the slot table's memfd (its
# header, the `zram_meta` struct whose counters a successor keeps, the table and the access times),
# and the two ways a new daemon gets a device back from it:
#
# - adoption in place (Meta(kept=...)): the kept table mapped again as this meta's, the kept
#   pool adopted with the objects its slots name (zpool's pool_adopt), mm_stat recounted;
# - copying (Meta.take_over): every object copied out of the old pool (PoolImage) into a new
#   meta's, for a pool that cannot be adopted in place.
#
# Both run with the GIL held or released as each function says, before the meta is attached
# (no request, no maintenance, no other thread touches the table meanwhile: so no slot lock
# is needed but the one the pool's door, zram_slot_replace, asks for). Nothing here is on the
# request path. The memfd's layout is a format: a daemon of the previous build reads it.

# The table's memfd: this header, the `zram_meta` struct (its counters are what a successor keeps of
# it), then the slot table and the access times, each from a page boundary.
ctypedef struct ztable_header:
    char magic[16]
    uint32_t version
    uint32_t pointer_size
    uint64_t nr_pages
    uint64_t zram_size
    uint64_t slot_size
    uint64_t table_offset
    uint64_t ac_time_offset

cdef enum:
    ZRAM_OFFSET = 256             # the zram_meta struct, after the header

TABLE_MAGIC = b"zramfs-table"
TABLE_VERSION = 1


class TableImageError(Exception):
    """The fd holds no slot table this version can adopt, or one of another size."""


Adopted = namedtuple("Adopted", "pages lost shared")
Adopted.__doc__ = """What a meta adopted in place holds: pages kept, pages lost (written back
to blocks the backing device cannot give again), and slots marked as sharing an object
(ZRAM_DEDUP: the device must have dedup on)."""


# --- the table's memfd -----------------------------------------------------------------------

cdef size_t _table_offset() noexcept nogil:
    return (ZRAM_OFFSET + sizeof(zram_meta) + PAGE_SIZE - 1) & ~(<size_t>PAGE_SIZE - 1)


cdef size_t _ac_time_offset(size_t nr_pages) noexcept nogil:
    return _table_offset() + ((nr_pages * sizeof(zslot) + PAGE_SIZE - 1)
                              & ~(<size_t>PAGE_SIZE - 1))


cdef int _table_create(Meta meta, size_t nr_pages, str name) except -1:
    """A new, empty table's memfd for `meta` (GIL held): sparse, so untouched slots cost
    nothing; kept across a restart."""
    cdef ztable_header* h
    rc = region_create(&meta.region, f"zramfs-table:{name}".encode(),
                       _ac_time_offset(nr_pages) + nr_pages * sizeof(uint32_t), False)
    if rc != 0:
        raise MemoryError(f"no memory for a slot table of {nr_pages} pages: "
                          f"{os.strerror(-rc)}")
    h = <ztable_header*>meta.region.base
    strncpy(h.magic, TABLE_MAGIC, sizeof(h.magic))
    h.version = TABLE_VERSION
    h.pointer_size = sizeof(void*)
    h.nr_pages = nr_pages
    h.zram_size = sizeof(zram_meta)
    h.slot_size = sizeof(zslot)
    h.table_offset = _table_offset()
    h.ac_time_offset = _ac_time_offset(nr_pages)
    return 0


cdef const ztable_header* _table_header(zregion* r, size_t nr_pages) except NULL:
    """The header of a kept slot table mapped in `r`, checked (GIL held): TableImageError if
    it is no table of this layout for a device of `nr_pages`."""
    cdef const ztable_header* h = <const ztable_header*>r.base
    if r.size < PAGE_SIZE or memcmp(h.magic, <const char*>TABLE_MAGIC,
                                    len(TABLE_MAGIC) + 1) != 0:
        raise TableImageError("not a zramfs slot table (bad magic)")
    if (h.version != TABLE_VERSION or h.pointer_size != sizeof(void*)
            or h.zram_size != sizeof(zram_meta) or h.slot_size != sizeof(zslot)
            or h.table_offset != _table_offset()):
        raise TableImageError(f"slot table format {h.version}, this zramfs reads "
                              f"{TABLE_VERSION} (or another build's layout)")
    if h.nr_pages != nr_pages:
        raise TableImageError(f"slot table of {h.nr_pages} pages, the device has {nr_pages}")
    if h.ac_time_offset != _ac_time_offset(nr_pages) \
            or r.size < h.ac_time_offset + h.nr_pages * sizeof(uint32_t):
        raise TableImageError("slot table truncated")
    return h


cdef size_t _stored_slots(const zregion* r, size_t i, size_t* end) noexcept nogil:
    """The next run of slots from `i` on that the table's memfd has pages for, [first, *end);
    first == *end == nr_pages when there is none. A slot in a hole was never written: reading
    it would make the page resident for nothing (a shared-memory read fault allocates)."""
    cdef const ztable_header* h = <const ztable_header*>r.base
    cdef size_t offset = h.table_offset, nr = h.nr_pages
    cdef size_t limit = offset + nr * sizeof(zslot), stop
    cdef size_t data = region_data_run(r, offset + min(i, nr) * sizeof(zslot), limit, &stop)
    end[0] = (stop - offset + sizeof(zslot) - 1) // sizeof(zslot)
    if data == limit:
        return nr
    return max(i, (data - offset) // sizeof(zslot))


cdef inline uint64_t* _remap_slot(uint64_t* remap, size_t mask, uint64_t old) noexcept nogil:
    """The (old handle, new handle) pair of `old` in an open-addressed table, or the empty
    pair where it goes (handles are never 0)."""
    cdef size_t i = ((old * <uint64_t>0x9E3779B97F4A7C15) >> 17) & mask
    while remap[2 * i] != 0 and remap[2 * i] != old:
        i = (i + 1) & mask
    return &remap[2 * i]


cdef uint64_t* _remap_new(size_t entries, size_t* mask) noexcept nogil:
    """An empty remap table for `entries` handles, at most half full; NULL without memory."""
    cdef size_t n = 1
    while n < 2 * entries:
        n <<= 1
    mask[0] = n - 1
    return <uint64_t*>calloc(2 * n, sizeof(uint64_t))


cdef void _hand_on_counters(zram_meta* m, const zram_meta* old) noexcept nogil:
    """What cannot be recounted from the table is the old daemon's to hand on."""
    m.max_used_pages = max(old.max_used_pages, m.driver.total_pages(m.pool))
    m.huge_pages_since = old.huge_pages_since
    m.failed_reads = old.failed_reads
    m.failed_writes = old.failed_writes
    m.invalid_io = old.invalid_io
    m.notify_free = old.notify_free
    m.evicted = old.evicted


# --- adoption in place -----------------------------------------------------------------------

cdef zram_meta _table_adopt(Meta meta, int table_fd, int pool_fd, size_t nr_pages, str name,
                       str backend) except *:
    """The kept slot table mapped in place as `meta`'s region, and the kept pool adopted with
    the objects its slots name (pool_adopt); then, and only then, the table made this meta's:
    the old process's zram_meta struct cleared (returned: the counters a recount cannot give;
    _table_recount releases the slot locks). GIL held. On failure nothing kept is changed."""
    cdef const ztable_header* h
    cdef zslot* table
    cdef uint64_t* handles
    cdef size_t i, first, end, n = 0
    cdef zram_meta old
    rc = region_map(&meta.region, table_fd, True)
    if rc != 0:
        raise TableImageError(f"fd {table_fd} is not a slot table: {os.strerror(-rc)}")
    try:
        h = _table_header(&meta.region, nr_pages)
        table = <zslot*>(meta.region.base + h.table_offset)
        handles = <uint64_t*>malloc((nr_pages + 1) * sizeof(uint64_t))
        if handles == NULL:
            raise MemoryError(f"no memory for the handles of {nr_pages} pages")
        try:
            first = _stored_slots(&meta.region, 0, &end)
            while first < end:
                for i in range(first, end):
                    if zram_slot_has_object(&table[i], table[i].flags):
                        handles[n] = table[i].handle
                        n += 1
                first = _stored_slots(&meta.region, end, &end)
            meta.pool = pool_adopt(pool_fd, handles, n, name)
        finally:
            free(handles)
        if meta.pool.backend != backend:
            meta.pool.destroy()
            raise PoolImageError(f"a {meta.pool.backend} pool, the device's zpool is {backend}")
    except BaseException:
        region_close(&meta.region)
        raise
    memcpy(&old, meta.region.base + ZRAM_OFFSET, sizeof(zram_meta))
    memset(meta.region.base + ZRAM_OFFSET, 0, sizeof(zram_meta))
    return old


cdef object _table_recount(Meta meta, const zram_meta* old):
    """mm_stat's counters from the adopted table (written-back blocks taken again from the
    backing device), the rest from the old process's struct; what was adopted (Adopted). First
    the slot locks the old process's threads held are released and its writebacks in flight
    forgotten. GIL held; nothing uses the table before this."""
    cdef zram_meta* m = meta.m
    cdef zslot* s
    cdef size_t i, first, end, shared = 0, lost = 0, mask = 0
    cdef uint64_t* seen = NULL
    cdef uint64_t* pair
    cdef uint32_t size
    first = _stored_slots(&meta.region, 0, &end)
    while first < end:
        for i in range(first, end):
            s = &m.table[i]
            if s.flags & (ZRAM_LOCK | ZRAM_UNDER_WB):
                s.flags &= ~(<uint32_t>ZRAM_LOCK | ZRAM_UNDER_WB)
            shared += (s.flags & ZRAM_DEDUP) != 0
        first = _stored_slots(&meta.region, end, &end)
    if shared:
        # A shared object counts once in compr_data_size: its handle is marked when seen.
        seen = _remap_new(shared, &mask)
        if seen == NULL:
            raise MemoryError("no memory to count the shared objects")
    first = _stored_slots(&meta.region, 0, &end)
    while first < end:
        for i in range(first, end):
            s = &m.table[i]
            if s.flags & ZRAM_WB and (m.backing == NULL or not backing_take(m.backing, s.handle)):
                lost += 1
                continue
            if not s.flags & (ZRAM_SAME | ZRAM_WB) and not s.size:
                continue                  # empty
            size = s.size if zram_slot_has_object(s, s.flags) else 0
            if size and s.flags & ZRAM_DEDUP:
                pair = _remap_slot(seen, mask, s.handle)
                if pair[0] != 0:
                    size = 0              # counted with another slot
                pair[0] = s.handle
            zram_stat_stored(m, s.flags, size)
        first = _stored_slots(&meta.region, end, &end)
    free(seen)
    _hand_on_counters(m, old)
    return Adopted(pages=m.pages_stored, lost=lost, shared=shared)


# --- copying ---------------------------------------------------------------------------------

ctypedef struct ztakeover:
    size_t pages              # pages copied (same-filled, written back and objects alike)
    size_t lost               # slots whose object could not be found (should be 0)


cdef ztakeover _take_over(zram_meta* m, const zram_meta* old, const zslot* old_table,
                          const uint32_t* old_ac, PoolImage image) noexcept nogil:
    """Fills the empty `m` from a previous daemon's table: same-filled words and written-back
    blocks as they were, each object copied out of the old pool into m's. The slot table is
    the truth: an object no slot points at (a write that never finished) is not copied, and
    slot locks held by the old daemon's threads are not carried over. A write the old daemon
    had not answered is sent again by the kernel (FUSE_NOTIFY_RESEND) and rewrites its pages.
    Without the GIL."""
    cdef ztakeover r
    cdef size_t i, mask = 0
    cdef uint32_t flags
    cdef int rc
    cdef uint64_t* remap = NULL
    cdef uint64_t* pair = NULL
    cdef const char* src
    cdef zslot* s
    r.pages = 0
    r.lost = 0
    # Dedup (zramfs.zram._dedup, enabled on m before this): an object several ZRAM_DEDUP slots
    # share is copied once, its new handle found by its old one. Without dedup on m, or
    # without memory for the map, each slot gets its own copy, an ordinary object.
    if m.dedup != NULL:
        remap = _remap_new(m.nr_pages, &mask)
    for i in range(m.nr_pages):
        flags = old_table[i].flags & ~(<uint32_t>ZRAM_LOCK | ZRAM_UNDER_WB)
        if remap == NULL:
            flags &= ~(<uint32_t>ZRAM_DEDUP)
        s = &m.table[i]
        if flags & (ZRAM_SAME | ZRAM_WB):
            if flags & ZRAM_WB and (m.backing == NULL
                                    or not backing_take(m.backing, old_table[i].handle)):
                r.lost += 1
                continue
            s.handle = old_table[i].handle
            s.size = old_table[i].size
            s.flags = flags
            zram_stat_stored(m, flags, 0)
        elif old_table[i].size:
            if flags & ZRAM_DEDUP:
                pair = _remap_slot(remap, mask, old_table[i].handle)
                if pair[1] != 0:              # copied already, for another slot
                    s.handle = pair[1]
                    s.size = old_table[i].size
                    s.flags = flags
                    zram_stat_stored(m, flags, 0)
                    m.ac_time[i] = old_ac[i]
                    r.pages += 1
                    continue
            # Into the pool by the one door, which counts what it stores.
            src = image.locate(old_table[i].handle, old_table[i].size)
            rc = -EIO
            if src != NULL:
                zram_slot_lock(&s.flags)
                rc = zram_slot_replace(m, s, src, old_table[i].size, flags, False)
                zram_slot_unlock(&s.flags)
            if rc != 0:
                r.lost += 1
                continue
            if flags & ZRAM_DEDUP:
                pair[0] = old_table[i].handle
                pair[1] = s.handle
        else:
            continue
        m.ac_time[i] = old_ac[i]
        r.pages += 1
    # The copies above counted as new huge pages: the old count replaces that.
    _hand_on_counters(m, old)
    free(remap)
    return r


cdef tuple _table_take_over(Meta meta, int table_fd, int pool_fd):
    """Meta.take_over's work (GIL held, released while it copies): (pages kept, pages lost)."""
    cdef zregion old
    cdef const ztable_header* h
    cdef ztakeover r
    cdef PoolImage image
    if meta.m.pages_stored:
        raise RuntimeError("take_over into a meta that holds pages")
    rc = region_map(&old, table_fd, False)
    if rc != 0:
        raise TableImageError(f"fd {table_fd} is not a slot table: {os.strerror(-rc)}")
    try:
        h = _table_header(&old, meta.m.nr_pages)
        image = _PoolImage(pool_fd)
        try:
            with nogil:
                r = _take_over(meta.m, <const zram_meta*>(old.base + ZRAM_OFFSET),
                               <const zslot*>(old.base + h.table_offset),
                               <const uint32_t*>(old.base + h.ac_time_offset), image)
        finally:
            image.close()
    finally:
        region_close(&old)
    return r.pages, r.lost
