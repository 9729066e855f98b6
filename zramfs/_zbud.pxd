# zbud's driver table, for the backend registry (cimport zramfs._zbud). A function, since
# Cython cannot cimport a module-level variable. Callable without the GIL.
from zramfs.zpool cimport zpool_driver

cdef const zpool_driver* zbud_driver() noexcept nogil
