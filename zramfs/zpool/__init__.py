"""The allocator, as the kernel's mm/zsmalloc.c and mm/zbud.c: the page source in a memfd
(_pages), the two backends over it (_zsmalloc, _zbud) and the pool the device holds (_alloc)."""
