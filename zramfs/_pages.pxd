# The page source (cimport zramfs._pages): runs of contiguous 4 KiB pages for the pool
# backends (_zsmalloc, _zbud), each of which embeds one `page_source` in its pool.
#
# All functions run without the GIL. pages_alloc and pages_free take the page source's lock,
# which is innermost: a backend calls them with its own class or pool lock held, never the
# other way round.
from zramfs.pthread cimport pthread_cond_t, pthread_mutex_t, pthread_t
from zramfs.zram cimport za_load

cdef enum:
    PAGES_MAX_RUN = 16      # the longest run pages_alloc hands out: the longest zspage

cdef struct extent             # a freed run, kept for reuse (private to _pages.pyx)
cdef struct arena              # one mmap'ed arena (private to _pages.pyx)

ctypedef struct page_source:
    pthread_mutex_t lock
    arena* arenas
    char* bump
    char* bump_end
    char* populated               # the arena is resident (or being made so) up to here
    extent* runs[PAGES_MAX_RUN + 1]
    size_t pages_held             # pages handed out and not yet given back: mem_used_total
    # The populator thread, which keeps the arena resident ahead of the bump (see pages_alloc).
    pthread_t populator
    pthread_cond_t want
    bint populator_asleep
    bint stop

# 0, or -1 when the lock or the populator thread cannot be had. Nothing else may use ps yet.
cdef int pages_init(page_source* ps) noexcept nogil
# Stops the populator and unmaps every arena, and with them every run handed out.
# Nothing else may use ps, then or after.
cdef void pages_destroy(page_source* ps) noexcept nogil
# A run of 1..PAGES_MAX_RUN contiguous pages, or NULL.
cdef char* pages_alloc(page_source* ps, int npages) noexcept nogil
# Gives a run from pages_alloc back, with its length.
cdef void pages_free(page_source* ps, char* addr, int npages) noexcept nogil


# Pages handed out and not given back: lock-free, for statistics and limits.
cdef inline size_t pages_held(page_source* ps) noexcept nogil:
    return za_load(&ps.pages_held)
