# Tiering over the slot table (cimport zramfs.zram._tiering): nothing is exported at C level; the
# eviction function is handed to the data path through zram.evict (see _zram.pxd).
