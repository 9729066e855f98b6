# The page source (cimport zramfs.zpool._pages): runs of contiguous 4 KiB pages for the pool
# backends (_zsmalloc, _zbud), each of which embeds one `page_source` in its pool.
#
# All functions run without the GIL. pages_alloc and pages_free take the page source's lock,
# which is innermost: a backend calls them with its own class or pool lock held, never the
# other way round.
from libc.stdint cimport uint16_t

from zramfs.pthread cimport pthread_cond_t, pthread_mutex_t, pthread_t
from zramfs.common cimport za_load

cdef enum:
    PAGES_MAX_RUN = 16      # the longest run pages_alloc hands out: the longest zspage

cdef struct extent             # a freed run, kept for reuse (private to _pages.pyx)

# A memfd mapped shared: the memory a pool (or a slot table) keeps in, so that it outlives the
# process when the fd is kept (live restart: a new daemon maps the fd and finds it all).
ctypedef struct zregion:
    int fd
    char* base
    size_t size

# A new memfd of `size` bytes (sparse: nothing is resident until touched), mapped; 0 or -errno.
# `placed`: mapped in an area of its own where a later process can map it at the same address
# (region_adopt), if there is room there.
cdef int region_create(zregion* r, const char* name, size_t size, bint placed) noexcept nogil
# An existing memfd mapped whole and writable at exactly `base`: 0, -EEXIST when something of
# this process is there already, or another -errno. Takes no ownership of fd, as region_map.
cdef int region_adopt(zregion* r, int fd, char* base) noexcept nogil
# An existing memfd mapped whole (read-only unless `writable`); 0 or -errno. Takes no ownership
# of fd: region_close closes a dup.
cdef int region_map(zregion* r, int fd, bint writable) noexcept nogil
# Unmaps and closes; the memory itself goes only when every other holder of the fd closes it.
cdef void region_close(zregion* r) noexcept nogil
# Gives the range's memory back to the OS (a hole in the memfd); keeps the range mapped.
cdef void region_punch(zregion* r, char* addr, size_t length) noexcept nogil
# The next run of the memfd's data (not holes) within [start, limit): its first byte, and in
# *end the byte after it; limit, with *end == limit, when there is none.
cdef size_t region_data_run(const zregion* r, size_t start, size_t limit,
                            size_t* end) noexcept nogil
# Maps into this process the pages from `first` on that are in memory (not holes, not swapped
# out), so that they are locked under mlockall and counted in its RSS.
cdef void region_populate(zregion* r, size_t first) noexcept nogil

# A run of pages a backend holds, for adoption (pages_adopt).
ctypedef struct pages_run:
    char* addr
    size_t npages

ctypedef struct page_source:
    pthread_mutex_t lock
    zregion* region               # where the arenas are carved from, [first, region.size)
    size_t first
    size_t carved                 # offset in the region of the next arena
    char* bump
    char* bump_end
    char* populated               # the arena is resident (or being made so) up to here
    extent* runs[PAGES_MAX_RUN + 1]
    size_t pages_held             # pages handed out and not yet given back: mem_used_total
    size_t meta_pages             # runs handed out for the backend's own bookkeeping
    # The populator thread, which keeps the arena resident ahead of the bump (see pages_alloc).
    pthread_t populator
    pthread_cond_t want
    bint populator_asleep
    bint stop

# Arenas are carved from `region` at offsets `first` and up (the region outlives ps).
# 0, or -1 when the lock or the populator thread cannot be had. Nothing else may use ps yet.
cdef int pages_init(page_source* ps, zregion* region, size_t first) noexcept nogil
# Stops the populator and forgets the freed runs; the arenas stay in the region, whose owner
# unmaps them. Nothing else may use ps, then or after.
cdef void pages_destroy(page_source* ps) noexcept nogil
# Live restart: a page source a process before this one left in `region`, mapped at its old
# address, made this one's. pages_runs_sound sorts `runs` (every run the backend holds, its
# bookkeeping's too) and checks them against the arenas, reading only: 0 if sound, else -1.
# pages_adopt then frees every other page of the arenas (-1 when the populator cannot start).
cdef int pages_runs_sound(const page_source* ps, zregion* region, pages_run* runs,
                          size_t n) noexcept nogil
cdef int pages_adopt(page_source* ps, zregion* region, const pages_run* runs, size_t n,
                     size_t held, size_t meta) noexcept nogil

# Reading a kept pool (live restart): which pages of its arenas a backend's bookkeeping runs
# (zspage descriptors, zbud's descriptor pages) take, each run tagged with a number of the
# backend's (1..255: zsmalloc's class, plus one), so that a handle's descriptor is trusted
# only inside a run its walk found. Addresses are the old process's. Outside the region:
# calloc'ed, untouched pages cost nothing. Caller's own, no lock.
ctypedef struct pages_tags:
    const char* lo                # the first page of the arenas
    size_t npages
    uint16_t* tag                 # per page: tag << 8 | pages from its run's first, or 0
# Room for [lo, hi): 0, or -1 without memory.
cdef int pages_tags_init(pages_tags* t, const char* lo, const char* hi) noexcept nogil
cdef void pages_tags_free(pages_tags* t) noexcept nogil
# Tags the run [run, run + npages pages): False, and nothing tagged, when it is not page-aligned
# within [lo, hi) or any of its pages is tagged already (runs overlap, or a list loops).
cdef bint pages_tags_set(pages_tags* t, const char* run, size_t npages,
                         uint16_t tag) noexcept nogil
# The first page of the run tagged `tag` that holds p, or NULL.
cdef const char* pages_tags_run(const pages_tags* t, const char* p, uint16_t tag) noexcept nogil
# A run of 1..PAGES_MAX_RUN contiguous pages, or NULL.
cdef char* pages_alloc(page_source* ps, int npages) noexcept nogil
# The same, for the backend's bookkeeping (handle tables, zspage descriptors): charged to the
# budget but not counted in pages_held, as the kernel's mem_used_total counts zspages only.
# Never given back.
cdef char* pages_alloc_meta(page_source* ps, int npages) noexcept nogil
cdef char* pages_alloc_sparse(page_source* ps, int npages) noexcept nogil
# Gives a run from pages_alloc back, with its length.
cdef void pages_free(page_source* ps, char* addr, int npages) noexcept nogil


# Pages handed out and not given back: lock-free, for statistics and limits.
cdef inline size_t pages_held(page_source* ps) noexcept nogil:
    return za_load(&ps.pages_held)
