"""A device's data path, as the kernel's drivers/block/zram: the slot table and the requests
(_zram, with the meta in _meta.pxi and a live restart's adoption and copying in
_restart.pxi), writeback, recompression (_recompress.pxi), idle and eviction (_tiering),
dedup (_dedup), the backing device (_backing) and the compression workers (_workers).
C-level and without the GIL; the front end (zramfs.fuse) reaches it through data_ops
alone."""
