# cython: language_level=3
"""The page source under both pool backends: runs of contiguous 4 KiB pages from arenas carved
out of a memfd region.

The region (a memfd mapped shared) is what lets a pool outlive its process: the daemon keeps
the fd across a restart and the next one maps it (docs/design.md, live restart). It owns the
arenas, the freed runs and the populator thread; the backends (_zsmalloc, _zbud)
own what they put in the pages. Each function runs without the GIL. pages_alloc and
pages_free are called with a backend's class or pool lock held (never the other way round),
so the page source's own lock is innermost.

Freed runs go back to the OS at once (a hole punched in the memfd: shared memory ignores
MADV_DONTNEED, and locked memory refuses it) and are kept, by length, for reuse; their bookkeeping
lives outside them so that keeping them costs no resident memory. A populator thread keeps up
to RESERVE_PAGES (1 MiB) of fresh arena resident ahead of use: in the process's RSS, not in
mem_used_total.

Above the page sources, one budget for the whole process: the pages every pool may hold
together (the daemon sets it from its cgroup's limit and the machine's RAM, zramfs.service.budget). A
run past it is refused, so a write fails as one over mem_limit does, instead of the OOM killer
ending the daemon and every device with it.
"""
from libc.stdint cimport uint16_t
from libc.stdlib cimport calloc, malloc, free, qsort
from libc.string cimport memset

from zramfs.common cimport PAGE_SIZE, za_add, za_load, za_store, za_sub
from zramfs.common cimport PAGE_SHIFT as _PAGE_SHIFT
from zramfs.pthread cimport (pthread_cond_destroy, pthread_cond_init, pthread_cond_signal,
                            pthread_cond_wait, pthread_join, pthread_mutex_destroy,
                            pthread_mutex_init, pthread_mutex_lock, pthread_mutex_unlock,
                            zram_thread_start)

# The page size of every part (common.h), for Python: zramfs.sysfs.kstrto takes it from here.
PAGE_SHIFT = _PAGE_SHIFT

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <sched.h>
    #include <unistd.h>
    #include <sys/mman.h>
    #include <sys/stat.h>
    #include <stdlib.h>
    #ifndef MADV_POPULATE_READ
    #define MADV_POPULATE_READ 22
    #endif
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23
    #endif
    #ifndef MAP_FIXED_NOREPLACE
    #define MAP_FIXED_NOREPLACE 0x100000
    #endif
    /* The calling thread only runs on a CPU that nothing else wants. */
    static void ps_sched_idle(void) {
        struct sched_param p = {0};
        sched_setscheduler(0, SCHED_IDLE, &p);
    }
    """
    void ps_sched_idle() nogil
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset) nogil
    int munmap(void* addr, size_t length) nogil
    int madvise(void* addr, size_t length, int advice) nogil
    int memfd_create(const char* name, unsigned flags) nogil
    int ftruncate(int fd, long length) nogil
    int fallocate(int fd, int mode, long offset, long length) nogil
    int dup(int fd) nogil
    int close(int fd) nogil
    int fcntl(int fd, int cmd, ...) nogil
    struct stat:
        long st_size
    int fstat(int fd, stat* st) nogil
    int errno
    void* MAP_FAILED
    int PROT_READ, PROT_WRITE, MAP_SHARED, MAP_NORESERVE, MAP_FIXED_NOREPLACE
    int MADV_POPULATE_WRITE, MADV_POPULATE_READ, MFD_CLOEXEC, FALLOC_FL_PUNCH_HOLE
    int FALLOC_FL_KEEP_SIZE, F_DUPFD_CLOEXEC, SEEK_DATA, SEEK_HOLE, EEXIST
    long lseek(int fd, long offset, int whence) nogil
    int mincore(void* addr, size_t length, unsigned char* vec) nogil

cdef enum:
    ARENA_PAGES = 16384     # 64 MiB of address space a time
    PREFAULT_PAGES = 64     # fresh arena pages made resident ahead, in one madvise
    RESERVE_PAGES = 256     # the populator keeps this much of the arena resident ahead
    POPULATE_PAGES = 32     # ... this much at a time

# Where placed regions (a pool's) are mapped: a fixed stretch of address space that the kernel's
# own choices (the executable and its heap near 85 TiB, mmap and the stack below 128 TiB) leave
# alone on x86-64, so a restarted daemon finds a kept pool's address still free and maps it
# there again, every pointer in it good as it is (zramfs.zpool._alloc, Pool.adopt).
cdef size_t PLACE_START = <size_t>32 << 40
cdef size_t PLACE_END = <size_t>64 << 40
cdef size_t PLACE_ALIGN = <size_t>1 << 30


cdef struct extent:
    char* addr
    extent* next


# The process's budget (atomics; no lock): pages all pools may hold, 0 for no budget; the pages
# they hold; and how many runs the budget refused.
cdef size_t _budget_pages = 0
cdef size_t _pages_all = 0
cdef size_t _refused = 0


cdef bint _charge(int npages) noexcept nogil:
    """Counts npages against the budget; False (and nothing counted) past it."""
    cdef size_t budget = za_load(&_budget_pages)
    if za_add(&_pages_all, npages) + npages > budget and budget:
        za_sub(&_pages_all, npages)
        za_add(&_refused, 1)
        return False
    return True


# --- regions ---------------------------------------------------------------------------------

cdef int region_create(zregion* r, const char* name, size_t size, bint placed) noexcept nogil:
    cdef int err
    r.base = NULL
    r.size = size
    r.fd = memfd_create(name, MFD_CLOEXEC)
    if r.fd < 0:
        return -errno
    if ftruncate(r.fd, <long>size) != 0:
        err = errno
        close(r.fd)
        r.fd = -1
        return -err
    if placed and _region_place(r) == 0:
        return 0
    return _region_mmap(r, True)


cdef int _region_place(zregion* r) noexcept nogil:
    """Maps r at the first free place of the placed area; -1 if there is none (the caller
    maps it anywhere)."""
    cdef size_t step = (r.size + PLACE_ALIGN - 1) & ~(<size_t>PLACE_ALIGN - 1)
    cdef size_t addr = PLACE_START
    while addr + r.size <= PLACE_END:
        if region_map_at(r, r.fd, <char*>addr) == 0:
            return 0
        addr += step
    return -1


cdef int region_map_at(zregion* r, int fd, char* base) noexcept nogil:
    cdef void* p = mmap(base, r.size, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_NORESERVE | MAP_FIXED_NOREPLACE, fd, 0)
    if p == MAP_FAILED:
        return -errno
    if p != <void*>base:            # a kernel before 4.17 takes the flag as a hint
        munmap(p, r.size)
        return -EEXIST
    r.base = base
    return 0


cdef int _region_open(zregion* r, int fd) noexcept nogil:
    """r holds a dup of the memfd `fd` and its size, not yet mapped; 0 or -errno."""
    cdef stat st
    r.base = NULL
    r.fd = fcntl(fd, F_DUPFD_CLOEXEC, 3)
    if r.fd < 0:
        return -errno
    if fstat(r.fd, &st) != 0 or st.st_size <= 0:
        close(r.fd)
        r.fd = -1
        return -22          # EINVAL: not a region
    r.size = <size_t>st.st_size
    return 0


cdef int region_adopt(zregion* r, int fd, char* base) noexcept nogil:
    cdef int rc = _region_open(r, fd)
    if rc == 0:
        rc = region_map_at(r, r.fd, base)
        if rc != 0:
            close(r.fd)
            r.fd = -1
    return rc


cdef int region_map(zregion* r, int fd, bint writable) noexcept nogil:
    cdef int rc = _region_open(r, fd)
    return rc if rc != 0 else _region_mmap(r, writable)


cdef int _region_mmap(zregion* r, bint writable) noexcept nogil:
    cdef int err
    cdef int prot = PROT_READ | PROT_WRITE if writable else PROT_READ
    # MAP_NORESERVE: the region is address space only until pages are touched.
    cdef void* p = mmap(NULL, r.size, prot, MAP_SHARED | MAP_NORESERVE, r.fd, 0)
    if p == MAP_FAILED:
        err = errno
        close(r.fd)
        r.fd = -1
        return -err
    r.base = <char*>p
    return 0


cdef void region_close(zregion* r) noexcept nogil:
    if r.base != NULL:
        munmap(r.base, r.size)
        r.base = NULL
    if r.fd >= 0:
        close(r.fd)
        r.fd = -1


cdef void region_punch(zregion* r, char* addr, size_t length) noexcept nogil:
    fallocate(r.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, <long>(addr - r.base),
              <long>length)     # a hint, as MADV_DONTNEED was: errors leave the pages in use


cdef size_t region_data_run(const zregion* r, size_t start, size_t limit,
                            size_t* end) noexcept nogil:
    cdef long data, hole
    end[0] = limit
    if start >= limit:
        return limit
    data = lseek(r.fd, <long>start, SEEK_DATA)
    if data < 0 or <size_t>data >= limit:
        return limit        # ENXIO: no data past start
    hole = lseek(r.fd, data, SEEK_HOLE)
    if hole >= 0 and <size_t>hole < limit:
        end[0] = <size_t>hole
    return <size_t>data


cdef void region_populate(zregion* r, size_t first) noexcept nogil:
    """Maps the region's pages from `first` on that are in memory into this process: the
    memfd's data (region_data_run), less what is swapped out (mincore). Mapped, they count in
    the process's RSS and are locked under mlockall; a swapped-out page is left to fault in
    when it is used, as reading it now could wait on a swap device this very daemon serves.
    mincore counts a page still in the swap cache as in memory: what keeps kept pages from
    getting there in the first place is the old daemon's keeper (zramfs.service.reclaim).
    Holes stay holes: a read fault would fill them."""
    cdef size_t end, npages, i, j
    cdef size_t off = region_data_run(r, first, r.size, &end)
    cdef unsigned char* vec
    while off < r.size:
        npages = (end - off) // PAGE_SIZE
        vec = <unsigned char*>malloc(npages)
        if vec == NULL:
            return
        if mincore(r.base + off, end - off, vec) == 0:
            i = 0
            while i < npages:
                if not vec[i] & 1:
                    i += 1
                    continue
                j = i
                while j < npages and vec[j] & 1:
                    j += 1
                madvise(r.base + off + i * PAGE_SIZE, (j - i) * PAGE_SIZE,
                        MADV_POPULATE_READ)         # a hint: errors ignored
                i = j
        free(vec)
        off = region_data_run(r, end, r.size, &end)


# --- the page source -------------------------------------------------------------------------

cdef void* _populator_main(void* arg) noexcept nogil:
    """Makes fresh arena pages resident ahead of their use, RESERVE_PAGES at most, and only on
    a CPU that would otherwise idle: a fault costs more than the zeroing it does (most in a
    VM), and done inline, under a class lock, it was a sixth of the daemon's time in fresh
    writes. The page-source lock is dropped around each madvise; a run handed out meanwhile
    just faults as it is written."""
    cdef page_source* ps = <page_source*>arg
    cdef char* start
    cdef char* end
    ps_sched_idle()
    pthread_mutex_lock(&ps.lock)
    while not ps.stop:
        start = end = NULL
        if ps.bump != NULL:         # no arena before the first allocation
            start = max(ps.populated, ps.bump)
            end = min(ps.bump + <size_t>RESERVE_PAGES * PAGE_SIZE, ps.bump_end)
        if start >= end:
            ps.populator_asleep = True
            pthread_cond_wait(&ps.want, &ps.lock)
            ps.populator_asleep = False
            continue
        end = min(end, start + <size_t>POPULATE_PAGES * PAGE_SIZE)
        ps.populated = end
        pthread_mutex_unlock(&ps.lock)
        madvise(start, end - start, MADV_POPULATE_WRITE)     # a hint: errors ignored
        pthread_mutex_lock(&ps.lock)
    pthread_mutex_unlock(&ps.lock)
    return NULL


cdef int pages_init(page_source* ps, zregion* region, size_t first) noexcept nogil:
    memset(ps, 0, sizeof(page_source))
    ps.region = region
    ps.first = first
    ps.carved = first
    return _start(ps)


cdef int _start(page_source* ps) noexcept nogil:
    """The page source's lock, its condition and its populator thread, made; 0, or -1 (and
    none of them) when the lock or the thread cannot be had."""
    if pthread_mutex_init(&ps.lock, NULL) != 0:
        return -1
    pthread_cond_init(&ps.want, NULL)
    if zram_thread_start(&ps.populator, _populator_main, ps) != 0:
        pthread_cond_destroy(&ps.want)
        pthread_mutex_destroy(&ps.lock)
        return -1
    return 0


cdef void pages_destroy(page_source* ps) noexcept nogil:
    cdef extent* e
    cdef extent* en
    cdef int i
    pthread_mutex_lock(&ps.lock)
    ps.stop = True
    pthread_cond_signal(&ps.want)
    pthread_mutex_unlock(&ps.lock)
    pthread_join(ps.populator, NULL)
    # every run still handed out goes with the region
    za_sub(&_pages_all, ps.pages_held + ps.meta_pages)
    for i in range(PAGES_MAX_RUN + 1):
        e = ps.runs[i]
        while e != NULL:
            en = e.next
            free(e)
            e = en
    pthread_cond_destroy(&ps.want)
    pthread_mutex_destroy(&ps.lock)


cdef int _push_run(page_source* ps, char* addr, int npages) noexcept nogil:
    cdef extent* e = <extent*>malloc(sizeof(extent))
    if e == NULL:
        return -1        # the run is leaked to the arena (still mapped, never resident)
    e.addr = addr
    e.next = ps.runs[npages]
    ps.runs[npages] = e
    return 0


cdef char* _new_arena(page_source* ps) noexcept nogil:
    """The region's next ARENA_PAGES, or NULL when it has no more. Page-source lock held."""
    cdef size_t length = <size_t>ARENA_PAGES * PAGE_SIZE
    if ps.carved + length > ps.region.size:
        return NULL
    ps.carved += length
    return ps.region.base + ps.carved - length


cdef char* pages_alloc(page_source* ps, int npages) noexcept nogil:
    """A run of npages contiguous pages, or NULL. Takes the page-source lock."""
    return _pages_alloc(ps, npages, False)


cdef char* pages_alloc_meta(page_source* ps, int npages) noexcept nogil:
    return _pages_alloc(ps, npages, True)


cdef char* pages_alloc_sparse(page_source* ps, int npages) noexcept nogil:
    """pages_alloc_meta, for a table filled from its front: the run is handed out as a hole
    (zeros), so its pages become resident only as they are written. Arena pages are made
    resident ahead of use; a handle table's run of 16 pages holding a few entries made each
    size class cost 96 KiB, 14 MiB of RSS over a pool of 300 MiB."""
    cdef char* addr = _pages_alloc(ps, npages, True)
    if addr != NULL:
        region_punch(ps.region, addr, <size_t>npages * PAGE_SIZE)
    return addr


cdef char* _pages_alloc(page_source* ps, int npages, bint meta) noexcept nogil:
    cdef char* addr = NULL
    cdef char* fault_from = NULL
    cdef char* fault_to = NULL
    cdef extent* e
    cdef int n
    if not _charge(npages):
        return NULL
    pthread_mutex_lock(&ps.lock)
    # Exact fit first, then split a longer freed run.
    for n in range(npages, PAGES_MAX_RUN + 1):
        e = ps.runs[n]
        if e != NULL:
            ps.runs[n] = e.next
            addr = e.addr
            free(e)
            if n > npages:
                _push_run(ps, addr + <size_t>npages * PAGE_SIZE, n - npages)
            break
    if addr == NULL:
        if ps.bump + <size_t>npages * PAGE_SIZE > ps.bump_end:
            # Keep the old arena's tail for later, then start a new arena.
            while ps.bump != NULL and ps.bump < ps.bump_end:
                n = min(<int>((ps.bump_end - ps.bump) // PAGE_SIZE), PAGES_MAX_RUN)
                _push_run(ps, ps.bump, n)
                ps.bump += <size_t>n * PAGE_SIZE
            addr = _new_arena(ps)
            if addr == NULL:
                pthread_mutex_unlock(&ps.lock)
                za_sub(&_pages_all, npages)
                return NULL
            ps.bump = addr
            ps.bump_end = addr + <size_t>ARENA_PAGES * PAGE_SIZE
            ps.populated = addr
        addr = ps.bump
        ps.bump += <size_t>npages * PAGE_SIZE
        if ps.bump > ps.populated:
            # The populator is behind (the CPUs are busy): rather than fault page by page
            # as objects are copied in, one madvise makes the next PREFAULT_PAGES resident.
            fault_from = ps.populated if ps.populated > addr else addr
            fault_to = min(ps.bump + <size_t>PREFAULT_PAGES * PAGE_SIZE, ps.bump_end)
            ps.populated = fault_to
        if (ps.populator_asleep
                and ps.populated - ps.bump < <size_t>RESERVE_PAGES * PAGE_SIZE // 2):
            pthread_cond_signal(&ps.want)
    if meta:
        ps.meta_pages += npages
    else:
        ps.pages_held += npages
    pthread_mutex_unlock(&ps.lock)
    if fault_from != NULL:
        madvise(fault_from, fault_to - fault_from, MADV_POPULATE_WRITE)  # a hint: errors ignored
    return addr


cdef void pages_free(page_source* ps, char* addr, int npages) noexcept nogil:
    """Gives the run's memory back to the OS and keeps its address range for reuse."""
    region_punch(ps.region, addr, <size_t>npages * PAGE_SIZE)
    pthread_mutex_lock(&ps.lock)
    _push_run(ps, addr, npages)
    ps.pages_held -= npages
    pthread_mutex_unlock(&ps.lock)
    za_sub(&_pages_all, npages)


cdef int _run_order(const void* a, const void* b) noexcept nogil:
    cdef char* x = (<const pages_run*>a).addr
    cdef char* y = (<const pages_run*>b).addr
    return -1 if x < y else (1 if x > y else 0)


cdef char* _swept_to(const page_source* ps, zregion* region) noexcept nogil:
    """The end of the arena space a pool in `region` has used: past it, nothing was ever
    handed out."""
    return ps.bump if ps.bump != NULL else region.base + ps.carved


cdef int pages_runs_sound(const page_source* ps, zregion* region, pages_run* runs,
                          size_t n) noexcept nogil:
    """Sorts runs by address; 0 if every run is within the arenas a page source left in
    `region` (at its old address) and no two overlap, else -1. Reads only."""
    cdef char* lo
    cdef char* hi
    cdef char* end
    cdef size_t i
    cdef size_t arena = <size_t>ARENA_PAGES * PAGE_SIZE
    if ps.carved > region.size or ps.carved < ps.first or ps.first % PAGE_SIZE \
            or (ps.carved - ps.first) % arena:
        return -1
    if ps.bump != NULL and not (region.base + ps.first <= ps.bump <= ps.bump_end
                                and ps.bump_end == region.base + ps.carved):
        return -1
    hi = _swept_to(ps, region)
    lo = region.base + ps.first
    qsort(runs, n, sizeof(pages_run), _run_order)
    for i in range(n):
        end = runs[i].addr + runs[i].npages * PAGE_SIZE
        if runs[i].npages == 0 or runs[i].addr < lo or end > hi \
                or (runs[i].addr - region.base) % PAGE_SIZE:
            return -1
        lo = end
    return 0


cdef int pages_adopt(page_source* ps, zregion* region, const pages_run* runs, size_t n,
                     size_t held, size_t meta) noexcept nogil:
    """A page source left in `region` by a process before this one, made this process's: its
    lock and populator anew; every page of its arenas that no run of `runs` (sorted, sound:
    pages_runs_sound) holds given back and kept as freed runs; `held` + `meta` pages counted
    as pages_held and meta_pages, and in the budget (even past it: they are held already).
    What the old process was doing is forgotten, and what it had half done is freed: the
    runs are the backend's truth. 0, or -1 when the thread cannot be had (and then nothing
    is freed or counted)."""
    cdef char* at = region.base + ps.first
    cdef char* end = _swept_to(ps, region)
    cdef size_t i
    ps.region = region
    ps.populated = ps.bump
    ps.populator_asleep = False
    ps.stop = False
    for i in range(PAGES_MAX_RUN + 1):
        ps.runs[i] = NULL
    if _start(ps) != 0:
        return -1
    # The populator reads only the bump and what it populated, under the lock; the freed
    # runs, made here without it, are the allocators' (none runs yet).
    for i in range(n + 1):
        _sweep(ps, at, runs[i].addr if i < n else end)
        if i < n:
            at = runs[i].addr + runs[i].npages * PAGE_SIZE
    ps.pages_held = held
    ps.meta_pages = meta
    za_add(&_pages_all, held + meta)
    return 0


cdef void _sweep(page_source* ps, char* start, char* end) noexcept nogil:
    """[start, end) is nobody's: a hole in the memfd, kept as freed runs."""
    cdef int n
    if start >= end:
        return
    region_punch(ps.region, start, <size_t>(end - start))
    while start < end:
        n = min(<int>((end - start) // PAGE_SIZE), PAGES_MAX_RUN)
        _push_run(ps, start, n)
        start += <size_t>n * PAGE_SIZE


# --- a kept pool's bookkeeping runs ------------------------------------------------------------

cdef int pages_tags_init(pages_tags* t, const char* lo, const char* hi) noexcept nogil:
    t.lo = lo
    t.npages = <size_t>(hi - lo) // PAGE_SIZE if hi > lo else 0
    t.tag = <uint16_t*>calloc(t.npages + 1, sizeof(uint16_t))
    return 0 if t.tag != NULL else -1


cdef void pages_tags_free(pages_tags* t) noexcept nogil:
    free(t.tag)
    t.tag = NULL
    t.npages = 0


cdef bint pages_tags_set(pages_tags* t, const char* run, size_t npages,
                         uint16_t tag) noexcept nogil:
    cdef size_t first, i
    if run < t.lo or (run - t.lo) % PAGE_SIZE or npages == 0 or npages > 255 or tag == 0:
        return False
    first = <size_t>(run - t.lo) // PAGE_SIZE
    if first + npages > t.npages:
        return False
    for i in range(npages):
        if t.tag[first + i]:
            return False
    for i in range(npages):
        t.tag[first + i] = <uint16_t>((tag << 8) | i)
    return True


cdef const char* pages_tags_run(const pages_tags* t, const char* p, uint16_t tag) noexcept nogil:
    cdef size_t page
    if p < t.lo:
        return NULL
    page = <size_t>(p - t.lo) // PAGE_SIZE
    if page >= t.npages or t.tag[page] >> 8 != tag:
        return NULL
    return t.lo + (page - (t.tag[page] & 0xFF)) * PAGE_SIZE


def set_budget(size_t pages) -> None:
    """The pages all pools of this process may hold together; 0 for no budget."""
    za_store(&_budget_pages, pages)


def budget_stat() -> tuple[int, int, int]:
    """(budget, pages held by all pools, runs refused for the budget), in pages."""
    return za_load(&_budget_pages), za_load(&_pages_all), za_load(&_refused)

