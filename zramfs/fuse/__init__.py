"""The FUSE engine: the kernel's protocol (fuse_kernel.h), the opcode dispatch, mounting, and
the transports that carry requests: /dev/fuse read by worker threads, and FUSE over io_uring.
It answers READ/WRITE/FALLOCATE through the data path's data_ops (zramfs.zram.data_ops) and
everything else through the tree's Python handlers; it knows nothing of zram itself."""
