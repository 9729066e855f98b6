# Minimal Cython declarations for libfuse 3.14's low-level API.
#
# FUSE_USE_VERSION must be defined to 314 by the build (setup.py passes
# define_macros=[('FUSE_USE_VERSION', '314')]); the header picks symbol
# versions (e.g. fuse_session_loop_mt -> fuse_session_loop_mt_312 semantics)
# from it.  Everything here is a plain C call and is declared nogil.
#
# Only what zramfs needs is declared; the ops table lists every member in
# header order anyway because Cython only needs the names we touch, while the
# C compiler sees the real struct.

from libc.stdint cimport uint64_t, uint32_t
from posix.types cimport off_t, mode_t, uid_t, gid_t, pid_t, dev_t
from posix.stat cimport struct_stat

cdef extern from "fuse_lowlevel.h" nogil:
    # ---- fuse_opt.h ---------------------------------------------------
    struct fuse_args:
        int argc
        char** argv
        int allocated
    void fuse_opt_free_args(fuse_args* args)

    # ---- fuse_common.h ------------------------------------------------
    struct fuse_file_info:
        int flags
        unsigned int writepage
        unsigned int direct_io      # reply: bypass page cache (FOPEN_DIRECT_IO)
        unsigned int keep_cache
        unsigned int flush
        unsigned int nonseekable
        unsigned int flock_release
        unsigned int cache_readdir
        unsigned int noflush
        # NOTE: no `parallel_direct_writes` in 3.14 (added in libfuse 3.15)
        uint64_t fh
        uint64_t lock_owner
        uint32_t poll_events

    struct fuse_conn_info:
        unsigned proto_major
        unsigned proto_minor
        unsigned max_write
        unsigned max_read
        unsigned max_readahead
        unsigned capable
        unsigned want
        unsigned max_background
        unsigned congestion_threshold
        unsigned time_gran

    # Opaque since API 3.12: configure via fuse_loop_cfg_* setters.
    struct fuse_loop_config:
        pass
    fuse_loop_config* fuse_loop_cfg_create()
    void fuse_loop_cfg_destroy(fuse_loop_config* config)
    void fuse_loop_cfg_set_idle_threads(fuse_loop_config* config, unsigned int value)
    void fuse_loop_cfg_set_max_threads(fuse_loop_config* config, unsigned int value)
    void fuse_loop_cfg_set_clone_fd(fuse_loop_config* config, unsigned int value)

    enum:
        FUSE_CAP_ASYNC_READ
        FUSE_CAP_POSIX_LOCKS
        FUSE_CAP_ATOMIC_O_TRUNC
        FUSE_CAP_EXPORT_SUPPORT
        FUSE_CAP_DONT_MASK
        FUSE_CAP_SPLICE_WRITE
        FUSE_CAP_SPLICE_MOVE
        FUSE_CAP_SPLICE_READ
        FUSE_CAP_FLOCK_LOCKS
        FUSE_CAP_IOCTL_DIR
        FUSE_CAP_AUTO_INVAL_DATA
        FUSE_CAP_READDIRPLUS
        FUSE_CAP_READDIRPLUS_AUTO
        FUSE_CAP_ASYNC_DIO
        FUSE_CAP_WRITEBACK_CACHE
        FUSE_CAP_NO_OPEN_SUPPORT
        FUSE_CAP_PARALLEL_DIROPS
        FUSE_CAP_POSIX_ACL
        FUSE_CAP_HANDLE_KILLPRIV
        FUSE_CAP_CACHE_SYMLINKS
        FUSE_CAP_NO_OPENDIR_SUPPORT
        FUSE_CAP_EXPLICIT_INVAL_DATA
        FUSE_CAP_EXPIRE_ONLY

    # ---- fuse_lowlevel.h ----------------------------------------------
    ctypedef uint64_t fuse_ino_t
    struct fuse_req:
        pass
    ctypedef fuse_req* fuse_req_t
    struct fuse_session:
        pass

    enum:
        FUSE_ROOT_ID
        FUSE_SET_ATTR_MODE
        FUSE_SET_ATTR_UID
        FUSE_SET_ATTR_GID
        FUSE_SET_ATTR_SIZE
        FUSE_SET_ATTR_ATIME
        FUSE_SET_ATTR_MTIME
        FUSE_SET_ATTR_ATIME_NOW
        FUSE_SET_ATTR_MTIME_NOW
        FUSE_SET_ATTR_CTIME

    struct fuse_entry_param:
        fuse_ino_t ino
        uint64_t generation
        struct_stat attr
        double attr_timeout
        double entry_timeout

    struct fuse_ctx:
        uid_t uid
        gid_t gid
        pid_t pid
        mode_t umask

    # Callbacks are invoked from libfuse worker threads: they must never
    # propagate exceptions (noexcept) and start without the GIL (nogil).
    struct fuse_lowlevel_ops:
        void (*init)(void* userdata, fuse_conn_info* conn) noexcept nogil
        void (*destroy)(void* userdata) noexcept nogil
        void (*lookup)(fuse_req_t req, fuse_ino_t parent, const char* name) noexcept nogil
        void (*forget)(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) noexcept nogil
        void (*getattr)(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept nogil
        void (*setattr)(fuse_req_t req, fuse_ino_t ino, struct_stat* attr, int to_set,
                        fuse_file_info* fi) noexcept nogil
        void (*open)(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept nogil
        void (*read)(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                     fuse_file_info* fi) noexcept nogil
        void (*write)(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size,
                      off_t off, fuse_file_info* fi) noexcept nogil
        void (*flush)(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept nogil
        void (*release)(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept nogil
        void (*fsync)(fuse_req_t req, fuse_ino_t ino, int datasync,
                      fuse_file_info* fi) noexcept nogil
        void (*opendir)(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept nogil
        void (*readdir)(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                        fuse_file_info* fi) noexcept nogil
        void (*releasedir)(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept nogil
        void (*statfs)(fuse_req_t req, fuse_ino_t ino) noexcept nogil
        void (*fallocate)(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
                          off_t length, fuse_file_info* fi) noexcept nogil
        # The tree's shape is fixed: these answer EPERM, as sysfs does.
        void (*mknod)(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
                      dev_t rdev) noexcept nogil
        void (*mkdir)(fuse_req_t req, fuse_ino_t parent, const char* name,
                      mode_t mode) noexcept nogil
        void (*unlink)(fuse_req_t req, fuse_ino_t parent, const char* name) noexcept nogil
        void (*rmdir)(fuse_req_t req, fuse_ino_t parent, const char* name) noexcept nogil
        void (*symlink)(fuse_req_t req, const char* link, fuse_ino_t parent,
                        const char* name) noexcept nogil
        void (*rename)(fuse_req_t req, fuse_ino_t parent, const char* name,
                       fuse_ino_t newparent, const char* newname,
                       unsigned int flags) noexcept nogil
        void (*link)(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent,
                     const char* newname) noexcept nogil
        void (*create)(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode,
                       fuse_file_info* fi) noexcept nogil

    # Replies: exactly one per request (fuse_reply_none only for forget).
    int fuse_reply_err(fuse_req_t req, int err)
    void fuse_reply_none(fuse_req_t req)
    int fuse_reply_entry(fuse_req_t req, const fuse_entry_param* e)
    int fuse_reply_attr(fuse_req_t req, const struct_stat* attr, double attr_timeout)
    int fuse_reply_open(fuse_req_t req, const fuse_file_info* fi)
    int fuse_reply_write(fuse_req_t req, size_t count)
    int fuse_reply_buf(fuse_req_t req, const char* buf, size_t size)
    size_t fuse_add_direntry(fuse_req_t req, char* buf, size_t bufsize,
                             const char* name, const struct_stat* stbuf, off_t off)

    void* fuse_req_userdata(fuse_req_t req)
    const fuse_ctx* fuse_req_ctx(fuse_req_t req)

    # Session lifecycle.
    fuse_session* fuse_session_new(fuse_args* args, const fuse_lowlevel_ops* op,
                                   size_t op_size, void* userdata)
    int fuse_session_mount(fuse_session* se, const char* mountpoint)
    int fuse_session_loop(fuse_session* se)
    int fuse_session_loop_mt(fuse_session* se, fuse_loop_config* config)
    void fuse_session_exit(fuse_session* se)
    int fuse_session_exited(fuse_session* se)
    void fuse_session_unmount(fuse_session* se)
    void fuse_session_destroy(fuse_session* se)
    int fuse_session_fd(fuse_session* se)
