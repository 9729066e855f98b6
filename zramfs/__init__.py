"""zramfs: the kernel's zram in userspace, served through FUSE.

From the bottom up: zpool/ (the allocator), zcomp/ (the compressors), zram/ (a device's data
path), fuse/ (the FUSE engine), sysfs/ (the devices and the tree the trio thread serves),
service/ (the daemon process); on top, the commands (cli, ctl) and the supervisor, which a
running daemon re-executes by these module names (`python -m zramfs.cli`, `zramfs.supervisor`).
Shared by the C parts: common.h (page size, clock, atomics), threads.h and pthread.pxd.
"""
