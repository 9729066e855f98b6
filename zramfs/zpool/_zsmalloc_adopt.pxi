# zsmalloc's live restart (included into _zsmalloc.pyx): the one reader of a kept pool, for
# both ways a pool a process before this one left is taken on. zs_check walks its structure
# and zs_locate follows a handle, each pointer checked before it is followed: copying reads
# a pool mapped elsewhere, read-only, through them (zramfs.zpool._alloc, PoolImage); zs_adopt
# checks every handle of the slot table through them, then makes the pool, mapped where its
# process had it, this process's. Everything here runs without the GIL and takes no class
# lock: a kept pool is nobody's until zs_adopt returns it.
#
# What the old process was doing when it ended is not to be trusted: a class lock it held, a
# zspage it had pinned, an object it had allocated for a write that never reached the slot
# table, a zspage half made or half released. The slot table's handles are the truth: an
# object none of them names is free, a zspage with no such object is given back, and
# everything else (the groups, free lists, counts, the page source's freed runs) is rebuilt
# from them. All is checked before anything is changed.

cdef const char* zs_check(zpool_kept* k, const zregion* region, ssize_t delta) noexcept nogil:
    """The kept pool's root, classes and handle tables checked, then its descriptor runs
    (_check_descriptors). Reads only."""
    cdef zs_pool* pool = <zs_pool*>(region.base + ZPOOL_ROOT)
    cdef const char* old = region.base - delta          # where its process had the region
    cdef const char* first = old + ZPOOL_ROOT + sizeof(zs_pool)
    cdef const char* root_end = old + ZPOOL_ARENAS
    cdef const char* why
    cdef size_class* c
    cdef hentry** dir
    cdef uint32_t objs, j
    cdef int i
    k.root = <char*>pool
    k.delta = delta
    k.tags.tag = NULL
    if pool.pages.first != ZPOOL_ARENAS or not ZPOOL_ARENAS <= pool.pages.carved <= region.size:
        return "its arenas are not where this version keeps them"
    k.lo = old + ZPOOL_ARENAS
    k.hi = old + pool.pages.carved
    if not 1 <= pool.nr_classes <= NR_SIZES:
        return "its number of size classes is out of range"
    for i in range(pool.nr_classes):
        if not zpool_within(pool.classes[i], sizeof(size_class), first, root_end) \
                or (<const char*>pool.classes[i] - first) % sizeof(size_class):
            return "a size class is not in the pool's root"
        c = <size_class*>zpool_kept_at(k, pool.classes[i])
        if c.index != <uint32_t>i:
            return "a size class is not in the pool's root"
        if not MIN_SIZE <= c.size <= PAGE_SIZE or not 1 <= c.pages_per_zspage <= PAGES_MAX_RUN:
            return "a size class has a size out of range"
        objs = c.pages_per_zspage * PAGE_SIZE // c.size
        if c.objs_per_zspage != objs or c.desc_size != _desc_size(objs):
            return "a size class does not add up"
        if c.handles_next > c.handles_cap or c.handles_cap > <uint32_t>DIR_ENTRIES * CHUNK_ENTRIES \
                or c.handles_cap % CHUNK_ENTRIES:
            return "a handle table's size is out of range"
        if c.handles_cap:
            if not zpool_within(c.dir, DIR_PAGES * PAGE_SIZE, k.lo, k.hi):
                return "a handle table is outside the arenas"
            dir = <hentry**>zpool_kept_at(k, c.dir)
            for j in range(c.handles_cap // CHUNK_ENTRIES):
                if not zpool_within(dir[j], CHUNK_PAGES * PAGE_SIZE, k.lo, k.hi):
                    return "a handle table is outside the arenas"
    for i in range(NR_SIZES):
        if not zpool_within(pool.by_size[i], sizeof(size_class), first, root_end):
            return "a size maps to no size class"
        c = <size_class*>zpool_kept_at(k, pool.by_size[i])
        if c.index >= <uint32_t>pool.nr_classes or pool.classes[c.index] != pool.by_size[i]:
            return "a size maps to no size class"
    if pages_tags_init(&k.tags, k.lo, k.hi) != 0:
        return "no memory to read it"
    why = _check_descriptors(k)
    if why != NULL:
        pages_tags_free(&k.tags)
    return why


cdef const char* _check_descriptors(zpool_kept* k) noexcept nogil:
    """Every descriptor run of every class in the arenas, tagged with its class in k.tags
    (zs_locate trusts a descriptor only there); every zspage's pages in the arenas too. A
    list that loops tags a run twice: refused."""
    cdef zs_pool* pool = <zs_pool*>k.root
    cdef size_class* c
    cdef desc_run* run_old
    cdef desc_run* run
    cdef zspage* zs
    cdef uint32_t d, npages
    cdef int i
    for i in range(pool.nr_classes):
        c = <size_class*>zpool_kept_at(k, pool.classes[i])
        npages = _desc_run_pages(c)
        run_old = c.desc_runs
        while run_old != NULL:
            if not pages_tags_set(&k.tags, <const char*>run_old, npages, <uint16_t>(i + 1)):
                return "a zspage descriptor run is outside the arenas, or the runs loop"
            run = <desc_run*>zpool_kept_at(k, run_old)
            if run.npages != npages or run.ndesc != _desc_run_count(c, npages):
                return "a zspage descriptor run is damaged"
            for d in range(run.ndesc):
                zs = _desc_at(c, run, d)
                if zs.base == NULL:
                    continue
                if not zpool_within(zs.base, <size_t>c.pages_per_zspage * PAGE_SIZE, k.lo, k.hi) \
                        or (zs.base - k.lo) % PAGE_SIZE or zs.bump > c.objs_per_zspage:
                    return "a zspage descriptor is damaged"
            run_old = run.next
    return NULL


cdef zspage* _kept_zspage(const zpool_kept* k, size_class* c, zspage* zs_old) noexcept nogil:
    """The zspage descriptor zs_old names, as mapped now, if it is one of class c's (in a run
    _check_descriptors tagged, at a descriptor's place) and in use; else NULL."""
    cdef const char* run = pages_tags_run(&k.tags, <const char*>zs_old, <uint16_t>(c.index + 1))
    cdef size_t off
    cdef zspage* zs
    if run == NULL or <const char*>zs_old < run + sizeof(desc_run):
        return NULL
    off = <size_t>(<const char*>zs_old - run - sizeof(desc_run))
    if off % c.desc_size or off // c.desc_size >= (<desc_run*>zpool_kept_at(k, run)).ndesc:
        return NULL
    zs = <zspage*>zpool_kept_at(k, zs_old)
    return zs if zs.base != NULL else NULL


cdef const char* zs_locate(const zpool_kept* k, uint64_t handle, size_t size) noexcept nogil:
    """handle -> class -> handle table entry -> zspage -> object, each step checked, and the
    zspage's handle list naming the handle back."""
    cdef zs_pool* pool = <zs_pool*>k.root
    cdef uint32_t ci = <uint32_t>(handle >> 32)
    cdef uint32_t idx = <uint32_t>handle
    cdef size_class* c
    cdef hentry* e
    cdef zspage* zs
    if ci >= <uint32_t>pool.nr_classes:
        return NULL
    c = <size_class*>zpool_kept_at(k, pool.classes[ci])
    if idx == 0 or idx >= c.handles_next:          # below handles_cap: its chunk is checked
        return NULL
    e = <hentry*>zpool_kept_at(k, (<hentry**>zpool_kept_at(k, c.dir))[idx >> CHUNK_SHIFT])
    e += idx & (CHUNK_ENTRIES - 1)
    zs = _kept_zspage(k, c, e.zs)
    if zs == NULL or e.obj_idx >= zs.bump or _obj_handles(zs)[e.obj_idx] != idx \
            or not 1 <= e.size_or_next <= c.size or size > e.size_or_next:
        return NULL
    return zpool_kept_at(k, zs.base) + <size_t>e.obj_idx * c.size


# --- adoption in place -------------------------------------------------------------------------

cdef inline bint _marked(uint8_t** marks, uint32_t ci, uint32_t idx) noexcept nogil:
    return (marks[ci][idx >> 3] >> (idx & 7)) & 1


cdef inline bint _slot_named(size_class* c, uint8_t** marks, zspage* zs,
                             uint32_t obj_idx) noexcept nogil:
    """The object at obj_idx is one a handle of the slot table names (and the handle says so)."""
    cdef uint32_t idx = _obj_handles(zs)[obj_idx]
    cdef hentry* e
    if idx == 0 or idx >= c.handles_next or not _marked(marks, c.index, idx):
        return False
    e = _hentry(c, idx)
    return e.zs == zs and e.obj_idx == obj_idx


cdef const char* _mark_handles(zpool_kept* k, const uint64_t* handles, size_t n,
                               uint8_t** marks) noexcept nogil:
    """Marks each handle of the slot table in its class's bitmap, once zs_locate has found
    it a live object. In place (delta 0): the pool's pointers are good as they are."""
    cdef zs_pool* pool = <zs_pool*>k.root
    cdef uint32_t ci, idx
    cdef size_t i
    for i in range(pool.nr_classes):
        marks[i] = <uint8_t*>calloc(pool.classes[i].handles_next // 8 + 1, 1)
        if marks[i] == NULL:
            return "no memory for the handle bitmaps"
    for i in range(n):
        if zs_locate(k, handles[i], 1) == NULL:
            return "a slot's handle leads to no object"
        ci = <uint32_t>(handles[i] >> 32)
        idx = <uint32_t>handles[i]
        marks[ci][idx >> 3] |= <uint8_t>(1 << (idx & 7))
    return NULL


cdef size_t _live_runs(zs_pool* pool, uint8_t** marks, pages_run* runs,
                       size_t* held, size_t* meta) noexcept nogil:
    """Every run the pool keeps: zspages with an object a handle names, descriptor runs,
    handle tables. Counts them only while runs is NULL."""
    cdef size_t n = 0
    cdef size_class* c
    cdef desc_run* run
    cdef zspage* zs
    cdef uint32_t d, s, k
    cdef int i
    for i in range(pool.nr_classes):
        c = pool.classes[i]
        run = c.desc_runs
        while run != NULL:
            if runs != NULL:
                runs[n] = pages_run(<char*>run, run.npages)
                meta[0] += run.npages
            n += 1
            for d in range(run.ndesc):
                zs = _desc_at(c, run, d)
                if zs.base == NULL:
                    continue
                for s in range(zs.bump):
                    if _slot_named(c, marks, zs, s):
                        if runs != NULL:
                            runs[n] = pages_run(zs.base, c.pages_per_zspage)
                            held[0] += c.pages_per_zspage
                        n += 1
                        break
            run = run.next
        if c.handles_cap:
            if runs != NULL:
                runs[n] = pages_run(<char*>c.dir, DIR_PAGES)
                meta[0] += DIR_PAGES
            n += 1
            for k in range(c.handles_cap // CHUNK_ENTRIES):
                if runs != NULL:
                    runs[n] = pages_run(<char*>c.dir[k], CHUNK_PAGES)
                    meta[0] += CHUNK_PAGES
                n += 1
    return n


cdef void _rebuild_class(size_class* c, uint8_t** marks) noexcept nogil:
    """The class as its named objects make it: objects, zspages, groups, free lists, counts."""
    cdef desc_run* run
    cdef zspage* zs
    cdef uint32_t d, idx
    cdef int s
    cdef hentry* e
    pthread_mutex_init(&c.lock, NULL)
    memset(c.groups, 0, sizeof(c.groups))
    c.zspages = 0
    c.obj_used = 0
    c.desc_free = NULL
    run = c.desc_runs
    while run != NULL:
        for d in range(run.ndesc):
            zs = _desc_at(c, run, d)
            if zs.base == NULL:
                _desc_put(c, zs)
                continue
            zs.inuse = 0
            zs.pins = 0
            zs.freelist = -1
            for s in range(<int>zs.bump - 1, -1, -1):
                if _slot_named(c, marks, zs, <uint32_t>s):
                    zs.inuse += 1
                else:
                    memcpy(_obj_addr(c, zs, s), &zs.freelist, sizeof(int32_t))
                    zs.freelist = <int32_t>s
                    _obj_handles(zs)[s] = 0
            if zs.inuse == 0:          # its pages are not a live run: swept by pages_adopt
                _desc_put(c, zs)
                continue
            _link(c, zs)
            c.zspages += 1
            c.obj_used += zs.inuse
        run = run.next
    c.handles_free = 0
    for idx in range(c.handles_next - 1, 0, -1):
        if not _marked(marks, c.index, idx):
            e = _hentry(c, idx)
            e.zs = NULL
            e.obj_idx = 0
            e.size_or_next = c.handles_free
            c.handles_free = idx


cdef const char* zs_adopt(zregion* region, const uint64_t* handles, size_t n,
                          void** out) noexcept nogil:
    """The pool in `region` (mapped where its process had it), with the objects `handles`
    name (the slot table's, repeats allowed) and nothing else: NULL and *out the pool, or why
    not (and nothing changed)."""
    cdef zs_pool* pool = <zs_pool*>(region.base + ZPOOL_ROOT)
    cdef zpool_kept k
    cdef uint8_t* marks[NR_SIZES]
    cdef pages_run* runs = NULL
    cdef size_t nruns, held = 0, meta = 0
    cdef const char* why
    cdef int i
    why = zs_check(&k, region, 0)
    if why != NULL:
        return why
    memset(marks, 0, sizeof(marks))
    why = _mark_handles(&k, handles, n, marks)
    pages_tags_free(&k.tags)
    if why == NULL:
        nruns = _live_runs(pool, marks, NULL, NULL, NULL)
        runs = <pages_run*>malloc((nruns + 1) * sizeof(pages_run))
        if runs == NULL:
            why = "no memory for the list of runs"
    if why == NULL:
        _live_runs(pool, marks, runs, &held, &meta)
        if pages_runs_sound(&pool.pages, region, runs, nruns) != 0:
            why = "its pages overlap or lie outside its arenas"
    if why == NULL:
        for i in range(pool.nr_classes):
            _rebuild_class(pool.classes[i], marks)
        if pages_adopt(&pool.pages, region, runs, nruns, held, meta) != 0:
            why = "cannot start its populator thread"
    free(runs)
    for i in range(NR_SIZES):
        free(marks[i])
    if why == NULL:
        out[0] = pool
    return why
