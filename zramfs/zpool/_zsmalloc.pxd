# zsmalloc's driver table, for the backend registry (cimport zramfs.zpool._zsmalloc). A function,
# since Cython cannot cimport a module-level variable. Callable without the GIL.
from zramfs.zpool.zpool cimport zpool_driver

cdef const zpool_driver* zsmalloc_driver() noexcept nogil
