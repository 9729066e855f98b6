# A meta, included into _zram.pyx: `Meta`, what writing disksize creates and reset destroys (the
# kernel's old zram_meta): the slot table, the pool, the compressor's streams, the compression
# workers and the counters; and what Python reads of it (mm_stat, io_stat, block_state).
#
# Its methods run with the GIL held, from the trio thread or (maintenance, through Disk.call)
# a worker thread holding a reference on the meta; they release the GIL where they walk the
# table or wait for threads. Creation happens before the meta is attached to its disk and
# destroy after the disk let go of it (Disk.release), so neither races a request.

Stats = namedtuple("Stats", "mm_stat io_stat streams backend pool evicted")
Stats.__doc__ = """A snapshot of a meta's statistics: mm_stat's nine fields and io_stat's four
in the kernel's order, the compression streams, the allocator backend, the pool's unique name,
and the pages evicted."""


cdef class Meta:
    """What writing disksize creates: `Meta(disksize, "lz4", name="zram0")`.

    Everything the data path needs is made here, none of it later (hazard 4): the table, the
    pool (`backend`: zsmalloc or zbud), the compressor's streams, and `workers` compression
    threads (default: one per core but one) that take a share of the pages of large requests.
    """

    def __init__(self, size_t disksize, str algorithm=DEFAULT_ALGORITHM, level=None, *,
                 str backend=DEFAULT_BACKEND, str name="zram", streams=None,
                 int max_pages_per_zspage=DEFAULT_MAX_PAGES_PER_ZSPAGE, workers=None, Backing backing=None,
                 dict secondary=None, dict dictionaries=None, tuple older=(),
                 bint compressed_wb=False, tuple kept=None):
        """`backing`: the writeback device (the caller's to close, after destroy).
        `secondary`: recompression algorithms, {priority: (name, level or None)}.
        `dictionaries`: zstd dictionaries, {priority: bytes}, 0 for the primary algorithm.
        `older`: zstd dictionaries (bytes) the kept pages may have been compressed with, which
        every zstd compressor reads with (by the id a frame names) and none writes with.
        `compressed_wb`: writeback writes objects as stored (decompressed when read back).
        `kept`: the (table, pool) fds a daemon before this one kept (state_fds): the device
        is adopted in place, its memory mapped again and nothing copied (`adopted` says what
        it holds). TableImageError/PoolImageError for kept state this daemon cannot adopt,
        PoolInPlaceError for a pool to copy instead (take_over)."""
        cdef Compressor comp
        cdef int nr_workers = default_workers() if workers is None else workers
        if disksize == 0 or disksize % PAGE_SIZE:
            raise ValueError(f"disksize must be a positive multiple of {PAGE_SIZE}")
        if nr_workers < 0:
            raise ValueError("workers must be 0 or more")
        cdef size_t nr_pages = disksize >> PAGE_SHIFT
        cdef const ztable_header* h
        cdef zram_meta old
        self.adopted = None
        if kept is not None:
            old = _table_adopt(self, kept[0], kept[1], nr_pages, name, backend)
        else:
            _table_create(self, nr_pages, name)
        h = <const ztable_header*>self.region.base
        self.m = <zram_meta*>(self.region.base + ZRAM_OFFSET)
        self.disksize = disksize
        self.secondary = {}
        self.m.nr_pages = nr_pages
        self.m.table = <zslot*>(self.region.base + h.table_offset)
        self.m.ac_time = <uint32_t*>(self.region.base + h.ac_time_offset)
        if posix_memalign(<void**>&self.m.evict_page, PAGE_SIZE, PAGE_SIZE) != 0:
            self.m.evict_page = NULL
            self.destroy()
            raise MemoryError("no memory for the eviction page")
        pthread_mutex_init(&self.m.evict_lock, NULL)
        try:
            if self.pool is None:
                self.pool = _Pool(backend, name, max_pages_per_zspage)
            # One private stream a worker, and one for eviction.
            dictionaries = dictionaries or {}
            self.compressor = _Compressor(algorithm, level, streams,
                                          private_streams=nr_workers + 1,
                                          dictionary=dictionaries.get(0),
                                          older=older if algorithm == "zstd" else ())
            for prio, (sname, slevel) in sorted((secondary or {}).items()):
                if not 1 <= prio <= 3:
                    raise ValueError(f"recompression priority {prio} is not 1..3")
                self.secondary[prio] = _Compressor(sname, slevel, 2,
                                                   dictionary=dictionaries.get(prio),
                                                   older=older if sname == "zstd" else ())
        except BaseException:
            self.destroy()
            raise
        for prio, c in self.secondary.items():
            self.m.secondary[prio] = (<Compressor>c).comp
        if backing is not None:
            self.backing = backing
            self.m.backing = backing.b
        self.m.compressed_wb = compressed_wb
        self.m.wb_batch = WB_BATCH
        comp = self.compressor
        self.m.driver = self.pool.driver
        self.m.pool = self.pool.impl
        self.m.huge_size = self.pool.driver.huge_class_size(self.pool.impl)
        self.m.comp = comp.comp
        self.m.evict_stream = zcomp_private_stream(comp.comp, nr_workers)
        if nr_workers:
            with nogil:
                self.m.workers = zworkers_start(self.m.comp, nr_workers)
            if self.m.workers == NULL:
                self.destroy()
                raise MemoryError(f"cannot start {nr_workers} compression workers")
        self.workers = nr_workers
        if kept is not None:
            self.adopted = _table_recount(self, &old)

    def __cinit__(self):
        self.region.fd = -1
        self.region.base = NULL

    @property
    def state_fds(self) -> tuple[int, int]:
        """The memfds of the slot table and of the pool (the meta's to close): dups of them,
        kept past this process, let the next daemon adopt the device in place (Meta's `kept`)
        or copy it (`take_over`)."""
        return self.region.fd, self.pool.fd

    def take_over(self, int table_fd, int pool_fd) -> tuple[int, int]:
        """Copies a previous daemon's device into this meta, which must be new (nothing
        stored, not yet attached): (pages kept, pages lost). The fds are only read; the caller
        closes them (and so frees the old copy) once this meta's own fds are kept instead.
        TableImageError/PoolImageError for state this daemon cannot read."""
        return _table_take_over(self, table_fd, pool_fd)

    def _stop_workers(self) -> None:
        """The compression workers stopped and joined: they use the compressor's streams."""
        if self.m.workers != NULL:
            with nogil:
                zworkers_stop(self.m.workers)
            self.m.workers = NULL

    def _free_table(self) -> None:
        self._stop_workers()
        if self.m.evict_page != NULL:
            pthread_mutex_destroy(&self.m.evict_lock)
        free(self.m.evict_page)
        self.m = NULL
        region_close(&self.region)

    def destroy(self) -> None:
        """Frees everything. Only once no reference is held on the meta (Disk.release)."""
        if self.m == NULL:
            return
        self._stop_workers()
        if self.pool is not None:
            self.pool.destroy()       # frees every object at once: no need to walk the table
        self.m.dedup_store = NULL
        self.m.dedup_put = NULL
        self.m.dedup = NULL
        self.dedup = None             # its index frees itself
        if self.compressor is not None:
            self.compressor.destroy()
        for c in (self.secondary or {}).values():
            c.destroy()
        self._free_table()

    def __dealloc__(self):
        # Dropped without destroy: the pool and compressors free themselves as objects.
        if self.m != NULL:
            self._free_table()

    @property
    def mem_limit(self) -> int:
        return za_load(&self.m.limit_pages) << PAGE_SHIFT

    @mem_limit.setter
    def mem_limit(self, size_t nbytes) -> None:
        """Bytes, rounded up to pages; 0 for none. Eviction down to a lowered limit is the
        caller's to run (zramfs.zram._tiering.evict_to_limit), as maintenance."""
        self.m.limit_pages = (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT

    def reset_mem_used_max(self) -> None:
        """mem_used_max starts again from the memory used now."""
        self.m.max_used_pages = self.m.driver.total_pages(self.m.pool)

    def compact(self) -> int:
        return self.pool.compact()

    def mm_stat(self) -> tuple[int, ...]:
        """The nine fields of mm_stat, in the kernel's order."""
        cdef zram_meta* m = self.m
        return (
            za_load(&m.pages_stored) << PAGE_SHIFT,
            za_load(&m.compr_data_size),
            m.driver.total_pages(m.pool) << PAGE_SHIFT,
            za_load(&m.limit_pages) << PAGE_SHIFT,
            za_load(&m.max_used_pages) << PAGE_SHIFT,
            za_load(&m.same_pages),
            self.pool.pages_compacted,
            za_load(&m.huge_pages),
            za_load(&m.huge_pages_since),
        )

    def io_stat(self) -> tuple[int, int, int, int]:
        """failed_reads failed_writes invalid_io notify_free."""
        cdef zram_meta* m = self.m
        return (za_load(&m.failed_reads), za_load(&m.failed_writes),
                za_load(&m.invalid_io), za_load(&m.notify_free))

    def stats(self) -> Stats:
        return Stats(self.mm_stat(), self.io_stat(), self.compressor.streams,
                     self.pool.backend, self.pool.name, za_load(&self.m.evicted))

    def block_state(self) -> bytes:
        """debugfs's block_state, as the kernel prints it: a line for each stored page, its
        index, the time it was last accessed and its flags (s same-filled, w written back,
        h huge, i idle, r recompressed, n incompressible). Flags are read without the slot
        locks: a page changing meanwhile may show either state, as in the kernel."""
        cdef zram_meta* m = self.m
        cdef size_t i, n = 0, cap = 1 << 16
        cdef char* out = <char*>malloc(cap)
        cdef char* grown
        cdef zslot* s
        cdef uint32_t f
        cdef int k
        cdef char letters[8]
        if out == NULL:
            raise MemoryError()
        with nogil:
            for i in range(m.nr_pages):
                s = &m.table[i]
                f = zram_slot_flags(&s.flags)
                if not (f & (ZRAM_SAME | ZRAM_WB) or s.size):
                    continue
                if cap - n < 64:
                    cap *= 2
                    grown = <char*>realloc(out, cap)
                    if grown == NULL:
                        break
                    out = grown
                letters[0] = 115 if f & ZRAM_SAME else 46           # 's' or '.'
                letters[1] = 119 if f & ZRAM_WB else 46             # 'w'
                letters[2] = 104 if f & ZRAM_HUGE else 46           # 'h'
                letters[3] = 105 if f & ZRAM_IDLE else 46           # 'i'
                letters[4] = 114 if f & ZRAM_PRIO_MASK else 46      # 'r'
                letters[5] = 110 if f & ZRAM_INCOMPRESSIBLE else 46 # 'n'
                letters[6] = 0
                k = snprintf(out + n, cap - n, "%12zu %12u.%06u %s\n", i, m.ac_time[i], 0,
                             letters)
                n += k
        try:
            return PyBytes_FromStringAndSize(out, n)
        finally:
            free(out)

    def classes(self) -> list:
        """The allocator's size classes, as zsmalloc's debugfs `classes` (none for zbud)."""
        return self.pool.class_stats()
