# Recompression (included by _tiering.pyx): zram.rst's `recompress`, spread over threads at
# idle priority that claim chunks of the table, compress a page without its slot lock and
# store the result only where the slot did not change meanwhile; and how those threads give
# way to foreground requests.

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int nanosleep(const timespec* req, timespec* rem)

cdef enum:
    YIELD_US = 10000           # an idle thread's pause while foreground requests come in ...
    YIELD_MAX = 20             # ... and after this many in a row, one page all the same


cdef void _yield_to_foreground(size_t* seen) noexcept nogil:
    """While the data path takes requests (any device's), pauses YIELD_US at a time, so the
    CPUs stay idle between them: a thread at idle priority still costs foreground I/O what
    taking it off a CPU costs (a CPU running it cannot poll for the next wake-up: on a VM,
    cpuidle-haltpoll) and its caches. After YIELD_MAX pauses in a row it goes on with one
    page, so a foreground that never stops still leaves it moving.

    Measured (2026-12-06, this 2-vCPU VM, fio random 4K QD32 on another device from the start
    of a recompression of the bench's 512 MiB corpus, zstd 19 + 1 MiB dictionary): without
    the pauses fio kept 0.70-0.84x of its rate alone; with pauses of 0.5 ms 0.85-0.89x, 2 ms
    0.86-0.88x (the sleepers' own wake-ups cost), 10 ms 0.93-0.95x. Alone, it never pauses."""
    cdef timespec t
    cdef size_t now
    cdef int i
    t.tv_sec, t.tv_nsec = 0, YIELD_US * 1000
    for i in range(YIELD_MAX):
        now = zram_requests()
        if now == seen[0]:
            return
        seen[0] = now
        nanosleep(&t, NULL)


cdef bint _recompress_wanted(zram_meta* m, zslot* s, int pick, size_t threshold,
                             int top) noexcept nogil:
    """A page of the type, at least `threshold` big, not known incompressible, and not already
    compressed by the highest algorithm this run may use (`top`): as the kernel, such a page
    is passed over, not tried again (and so not counted against max_pages)."""
    cdef uint32_t f = zram_slot_flags(&s.flags)
    return (_picked(m, s, pick) and s.size >= threshold and not f & ZRAM_INCOMPRESSIBLE
            and <int>((f & ZRAM_PRIO_MASK) >> ZRAM_PRIO_SHIFT) < top)


cdef enum:
    RECOMP_CHUNK = 64          # pages a recompression thread claims at a time

ctypedef struct zrecomp:
    zram_meta* m
    int pick
    int only                   # 0: every secondary above a page's own; else that priority
    int top                    # the highest priority this run may use
    size_t threshold
    size_t max_pages           # 0: no limit
    int* stop                  # set: stop at the next chunk (Meta.tier_stop)
    int cancelled              # stopped by `stop` (atomic)
    bint polite                # pauses while foreground requests come in
    size_t cursor              # the next page index to claim (atomic)
    size_t tried               # pages tried (atomic), against max_pages
    size_t done                # pages recompressed (atomic)


cdef int _recompress_page(zrecomp* r, zslot* s, char* page, char* out) noexcept nogil:
    """One page: picked and read under its slot lock (marked ZRAM_UNDER_WB: any change of the
    slot clears it), compressed by the secondary algorithms above its own without the lock,
    then, locked again, stored only if the slot is unchanged and the result lands in a
    smaller size class, within mem_limit. Without the lock while it compresses, a thread at
    idle priority never holds up a writer of the same page. 1 recompressed, 0 not (marked
    incompressible where no algorithm shrank it), -1: max_pages is reached."""
    cdef zram_meta* m = r.m
    cdef uint32_t flags, f
    cdef uint64_t handle
    cdef size_t old_class
    cdef int prio, n = 0, best = 0, rc
    cdef zcomp* c
    cdef zstream* st
    zram_slot_lock(&s.flags)
    if not _recompress_wanted(m, s, r.pick, r.threshold, r.top):
        zram_slot_unlock(&s.flags)
        return 0
    if r.max_pages and za_add(&r.tried, 1) >= r.max_pages:
        zram_slot_unlock(&s.flags)
        return -1
    flags = zram_slot_flags(&s.flags)
    st = zcomp_stream_get(m.comp)
    rc = zram_slot_load(m, s, page, st)
    zcomp_stream_put(st)
    if rc != 0:
        zram_slot_unlock(&s.flags)
        return 0
    handle = s.handle
    old_class = m.driver.class_size(m.pool, s.size)
    zram_slot_set_flags(&s.flags, flags | ZRAM_UNDER_WB)
    zram_slot_unlock(&s.flags)

    for prio in range(((flags & ZRAM_PRIO_MASK) >> ZRAM_PRIO_SHIFT) + 1, 4):
        c = m.secondary[prio]
        if c == NULL or (r.only and prio != r.only):
            continue
        st = zcomp_stream_get(c)
        n = zcomp_compress(c, st, page, <int>m.huge_size - 1)
        if n > 0 and m.driver.class_size(m.pool, n) < old_class:
            memcpy(out, st.buffer, n)
            best = prio
        zcomp_stream_put(st)
        if best:
            break

    rc = 0
    zram_slot_lock(&s.flags)
    f = zram_slot_flags(&s.flags)
    if f & ZRAM_UNDER_WB and s.handle == handle:
        f &= ~ZRAM_UNDER_WB
        zram_slot_set_flags(&s.flags, f)
        if not best:
            zram_slot_set_flags(&s.flags, f | ZRAM_INCOMPRESSIBLE)
        elif zram_slot_replace(m, s, out, n, (f & ZRAM_IDLE) | (<uint32_t>best << ZRAM_PRIO_SHIFT),
                               False) == 0:
            rc = 1
        # -ENOMEM: no room now; the page stays as it was, for a later try
    elif f & ZRAM_UNDER_WB:
        zram_slot_set_flags(&s.flags, f & ~ZRAM_UNDER_WB)
    zram_slot_unlock(&s.flags)
    return rc


cdef void* _recompress_main(void* arg) noexcept nogil:
    """A recompression thread: claims RECOMP_CHUNK pages at a time until the table or
    max_pages is done."""
    cdef zrecomp* r = <zrecomp*>arg
    cdef char* page = NULL
    cdef char* out = NULL
    cdef size_t seen = zram_requests()
    cdef size_t first, i
    cdef int rc
    if (posix_memalign(<void**>&page, PAGE_SIZE, PAGE_SIZE) != 0
            or posix_memalign(<void**>&out, PAGE_SIZE, PAGE_SIZE) != 0):
        free(page)
        return NULL
    while True:
        if za_load_int(r.stop):
            za_store_int(&r.cancelled, 1)
            break
        first = za_add(&r.cursor, RECOMP_CHUNK)
        if first >= r.m.nr_pages:
            break
        rc = 0
        for i in range(first, min(first + RECOMP_CHUNK, r.m.nr_pages)):
            if r.polite:
                _yield_to_foreground(&seen)
            rc = _recompress_page(r, &r.m.table[i], page, out)
            if rc < 0:
                break
            za_add(&r.done, <size_t>rc)
        if rc < 0:
            za_store(&r.cursor, r.m.nr_pages)     # the others stop at their next claim
            break
    free(page)
    free(out)
    return NULL


cdef long _recompress(zram_meta* m, int pick, size_t threshold, size_t max_pages, int only,
                      int nr_threads, bint polite, int* stop, bint* cancelled) noexcept nogil:
    """Recompresses the pages `pick` and `threshold` select, trying at most `max_pages`
    (0: no limit), on `nr_threads` threads at idle priority (`polite`: pausing while the data
    path takes requests), until done or `stop` is set (`cancelled` then). The pages
    recompressed. As the kernel's, one page's outcome does not depend on another's, so the
    threads' order changes which pages a max_pages run takes, never the result."""
    cdef zrecomp r
    memset(&r, 0, sizeof(r))
    r.m, r.pick, r.only, r.threshold, r.max_pages = m, pick, only, threshold, max_pages
    r.stop, r.polite = stop, polite
    r.top = only
    if not only:
        for r.top in range(3, 0, -1):
            if m.secondary[r.top] != NULL:
                break
    _on_idle_threads(_recompress_main, &r, nr_threads)
    cancelled[0] = za_load_int(&r.cancelled) != 0
    return <long>za_load(&r.done)
