# zbud's live restart (included into _zbud.pyx): the one reader of a kept pool, for both ways
# a pool a process before this one left is taken on, as zsmalloc's (_zsmalloc_adopt.pxi).
# zbud_check walks its pages of descriptors and zbud_locate follows a handle, each pointer
# checked before it is followed: copying reads a pool mapped elsewhere, read-only, through
# them (zramfs.zpool._alloc, PoolImage); zbud_adopt checks every handle of the slot table
# through them, then makes the pool, mapped where its process had it, this process's. All
# runs without the GIL and takes no lock: a kept pool is nobody's until zbud_adopt returns it.
#
# The slot table's handles are the truth: a buddy none of them names is free, a page with no
# such buddy is given back, and the lists, the free descriptors and the page source's freed
# runs are rebuilt from them; the pool lock the old process may have held is made anew.

cdef const char* zbud_check(zpool_kept* k, const zregion* region, ssize_t delta) noexcept nogil:
    """The kept pool's pages of descriptors found and tagged in k.tags (zbud_locate trusts a
    descriptor only there), and every descriptor in use checked. Reads only."""
    cdef zbud_pool* pool = <zbud_pool*>(region.base + ZPOOL_ROOT)
    cdef const char* old = region.base - delta          # where its process had the region
    cdef const char* why
    k.root = <char*>pool
    k.delta = delta
    k.tags.tag = NULL
    if pool.pages.first != ZPOOL_ARENAS or not ZPOOL_ARENAS <= pool.pages.carved <= region.size:
        return "its arenas are not where this version keeps them"
    k.lo = old + ZPOOL_ARENAS
    k.hi = old + pool.pages.carved
    if pages_tags_init(&k.tags, k.lo, k.hi) != 0:
        return "no memory to read it"
    why = _find_descriptors(k) if pool.desc_runs != NULL else _find_unlisted_descriptors(k)
    if why == NULL:
        why = _check_descriptors(k)
    if why != NULL:
        pages_tags_free(&k.tags)
    return why


cdef const char* _find_descriptors(zpool_kept* k) noexcept nogil:
    """The pool's list of descriptor pages, each tagged: a list that loops tags one twice."""
    cdef zbud_run* run_old = (<zbud_pool*>k.root).desc_runs
    cdef zbud_run* run
    while run_old != NULL:
        if not pages_tags_set(&k.tags, <const char*>run_old - (PAGE_SIZE - sizeof(zbud_run)),
                              1, 1):
            return "a page of descriptors is outside the arenas, or the pages loop"
        run = <zbud_run*>zpool_kept_at(k, run_old)
        if run.ndesc != _descs_per_page():
            return "a page of descriptors is damaged"
        run_old = run.next
    return NULL


cdef const char* _find_unlisted_descriptors(zpool_kept* k) noexcept nogil:
    """A pool made before zbud listed its pages of descriptors: they are those of the
    descriptors on its lists and free list, each followed only into the arenas, at a
    descriptor's place. Bounded: a list that loops runs out of descriptors."""
    cdef zbud_pool* pool = <zbud_pool*>k.root
    cdef size_t budget = <size_t>(k.hi - k.lo) // PAGE_SIZE * _descs_per_page()
    cdef zbud_page* d
    cdef const char* page
    cdef int i
    for i in range(NCHUNKS + 2):
        d = pool.lists[i] if i <= NCHUNKS else pool.desc_free
        while d != NULL:
            if budget == 0:
                return "its lists of descriptors loop"
            budget -= 1
            page = <const char*>(<size_t>d & ~(<size_t>PAGE_SIZE - 1))
            if pages_tags_run(&k.tags, page, 1) == NULL \
                    and not pages_tags_set(&k.tags, page, 1, 1):
                return "a descriptor is outside the arenas"
            if _kept_desc(k, d) == NULL:
                return "a descriptor is not where descriptors are"
            d = (<zbud_page*>zpool_kept_at(k, d)).next
    return NULL


cdef const char* _check_descriptors(zpool_kept* k) noexcept nogil:
    """Each descriptor in use (with a page) in the tagged pages: its page in the arenas,
    its buddies' sizes fit in it."""
    cdef zbud_page* zp
    cdef size_t p, i
    for p in range(k.tags.npages):
        if k.tags.tag[p] == 0:
            continue
        zp = <zbud_page*>zpool_kept_at(k, k.lo + p * PAGE_SIZE)
        for i in range(_descs_per_page()):
            if zp[i].base == NULL:
                continue
            if not zpool_within(zp[i].base, PAGE_SIZE, k.lo, k.hi) \
                    or (zp[i].base - k.lo) % PAGE_SIZE or zp[i].first_size > PAGE_SIZE \
                    or zp[i].last_size > PAGE_SIZE \
                    or _chunks(zp[i].first_size) + _chunks(zp[i].last_size) > NCHUNKS:
                return "a descriptor is damaged"
    return NULL


cdef zbud_page* _kept_desc(const zpool_kept* k, zbud_page* d_old) noexcept nogil:
    """The descriptor d_old names, as mapped now, if it lies in a tagged page, at a
    descriptor's place; else NULL."""
    cdef const char* page = pages_tags_run(&k.tags, <const char*>d_old, 1)
    cdef size_t off
    if page == NULL:
        return NULL
    off = <size_t>(<const char*>d_old - page)
    if off % sizeof(zbud_page) or off // sizeof(zbud_page) >= _descs_per_page():
        return NULL
    return <zbud_page*>zpool_kept_at(k, d_old)


cdef const char* zbud_locate(const zpool_kept* k, uint64_t handle, size_t size) noexcept nogil:
    """handle -> descriptor -> page -> buddy, each step checked."""
    cdef zbud_page* zp = _kept_desc(k, <zbud_page*>(handle & ~(<uint64_t>1)))
    cdef size_t stored
    if zp == NULL or zp.base == NULL:
        return NULL
    stored = zp.last_size if handle & 1 else zp.first_size
    if stored == 0 or size > stored:
        return NULL
    return _buddy(zpool_kept_at(k, zp.base), zp, handle)


# --- adoption in place -------------------------------------------------------------------------

cdef int _handle_order(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t*>a)[0]
    cdef uint64_t y = (<const uint64_t*>b)[0]
    return -1 if x < y else (1 if x > y else 0)


cdef bint _named(const uint64_t* named, size_t n, uint64_t handle) noexcept nogil:
    """`handle` is in `named` (sorted)."""
    cdef size_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) // 2
        if named[mid] < handle:
            lo = mid + 1
        else:
            hi = mid
    return lo < n and named[lo] == handle


cdef size_t _live_runs(zpool_kept* k, const uint64_t* named, size_t n, pages_run* runs,
                       size_t* held, size_t* meta) noexcept nogil:
    """Every run the pool keeps: its pages of descriptors, and each page with a buddy a
    handle names. Counts them only while runs is NULL."""
    cdef size_t nruns = 0, p, i
    cdef zbud_page* zp
    for p in range(k.tags.npages):
        if k.tags.tag[p] == 0:
            continue
        zp = <zbud_page*>(k.lo + p * PAGE_SIZE)
        if runs != NULL:
            runs[nruns] = pages_run(<char*>zp, 1)
            meta[0] += 1
        nruns += 1
        for i in range(_descs_per_page()):
            if zp[i].base != NULL and (_named(named, n, <uint64_t>&zp[i])
                                       or _named(named, n, <uint64_t>&zp[i] | 1)):
                if runs != NULL:
                    runs[nruns] = pages_run(zp[i].base, 1)
                    held[0] += 1
                nruns += 1
    return nruns


cdef void _rebuild(zpool_kept* k, const uint64_t* named, size_t n) noexcept nogil:
    """The pool as its named buddies make it: sizes, lists, free descriptors, the list of
    descriptor pages (made anew, so a pool from before that list gets one), its lock."""
    cdef zbud_pool* pool = <zbud_pool*>k.root
    cdef zbud_run* run
    cdef zbud_page* zp
    cdef size_t p, i
    memset(pool.lists, 0, sizeof(pool.lists))
    pool.desc_free = NULL
    pool.desc_runs = NULL
    pthread_mutex_init(&pool.lock, NULL)
    for p in range(k.tags.npages):
        if k.tags.tag[p] == 0:
            continue
        zp = <zbud_page*>(k.lo + p * PAGE_SIZE)
        run = _run_of(<char*>zp)
        run.ndesc = _descs_per_page()
        run.next = pool.desc_runs
        pool.desc_runs = run
        for i in range(_descs_per_page() - 1, -1, -1):
            if not _named(named, n, <uint64_t>&zp[i]):
                zp[i].first_size = 0
            if not _named(named, n, <uint64_t>&zp[i] | 1):
                zp[i].last_size = 0
            if zp[i].base == NULL or zp[i].first_size == 0 and zp[i].last_size == 0:
                _desc_put(pool, &zp[i])       # its page, if any, is swept by pages_adopt
            else:
                _zbud_link(pool, &zp[i])


cdef const char* zbud_adopt(zregion* region, const uint64_t* handles, size_t n,
                            void** out) noexcept nogil:
    """The pool in `region` (mapped where its process had it), with the buddies `handles`
    name (the slot table's, repeats allowed) and nothing else: NULL and *out the pool, or why
    not (and nothing changed)."""
    cdef zbud_pool* pool = <zbud_pool*>(region.base + ZPOOL_ROOT)
    cdef zpool_kept k
    cdef uint64_t* named
    cdef pages_run* runs = NULL
    cdef size_t nruns, held = 0, meta = 0, i
    cdef const char* why = zbud_check(&k, region, 0)
    if why != NULL:
        return why
    named = <uint64_t*>malloc((n + 1) * sizeof(uint64_t))
    if named == NULL:
        why = "no memory for the handles"
    else:
        for i in range(n):
            if zbud_locate(&k, handles[i], 1) == NULL:
                why = "a slot's handle leads to no object"
                break
            named[i] = handles[i]
    if why == NULL:
        qsort(named, n, sizeof(uint64_t), _handle_order)
    if why == NULL:
        nruns = _live_runs(&k, named, n, NULL, NULL, NULL)
        runs = <pages_run*>malloc((nruns + 1) * sizeof(pages_run))
        if runs == NULL:
            why = "no memory for the list of runs"
    if why == NULL:
        _live_runs(&k, named, n, runs, &held, &meta)
        if pages_runs_sound(&pool.pages, region, runs, nruns) != 0:
            why = "its pages overlap or lie outside its arenas"
    if why == NULL:
        _rebuild(&k, named, n)
        if pages_adopt(&pool.pages, region, runs, nruns, held, meta) != 0:
            why = "cannot start its populator thread"
    pages_tags_free(&k.tags)
    free(runs)
    free(named)
    if why == NULL:
        out[0] = pool
    return why
