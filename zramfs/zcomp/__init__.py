"""The compressors, as the kernel's zcomp: per-CPU streams, and every backend (lz4, lz4hc,
zstd with its dictionaries, lzo, lzo-rle, deflate) behind the one zcomp_compress() door."""
