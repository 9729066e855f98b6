# zbud's driver table, for the backend registry (cimport zramfs.zpool._zbud). A function, since
# Cython cannot cimport a module-level variable. Callable without the GIL.
from zramfs.zpool.zpool cimport zpool_driver

cdef const zpool_driver* zbud_driver() noexcept nogil
