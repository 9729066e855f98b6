"""The FUSE engine: the kernel's protocol (fuse_kernel.h), the opcode dispatch, mounting, and
the transports that carry requests: /dev/fuse read by worker threads, and FUSE over io_uring.
It answers READ/WRITE/FALLOCATE through the data path's data_ops (zramfs.zram.data_ops) and
everything else through the tree's Python handlers; it knows nothing of zram itself.

One extension, _fuse, in files as the kernel's fs/fuse/: _fuse.pyx (the protocol: requests,
INIT, dispatch, the data path, Session), dev.pxi (the /dev/fuse workers), dev_uring.pxi (the
io_uring rings), ops.pxi (the requests Python answers), mount.pxi (mounting)."""
