# Mounting, included by _fuse.pyx: a FUSE tree put at a mountpoint and taken away again, as
# root with mount(2) and umount2(2), otherwise through fusermount3 (package fuse3). Plain
# Python, called with the GIL from Session (its _lock serialises unmount and close).

def _mount(mountpoint: str, fsname: str, options: list[str]) -> int:
    """Mounts a FUSE file system at `mountpoint`; its /dev/fuse descriptor. As root with
    mount(2); otherwise through fusermount3 (package fuse3), which passes the descriptor back
    over a socket named in _FUSE_COMMFD."""
    import ctypes
    if os.geteuid() != 0:
        return _mount_fusermount(mountpoint, fsname, options)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = ",".join([f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}",
                     f"group_id={os.getgid()}", *options])
    libc = ctypes.CDLL(None, use_errno=True)
    MS_NOSUID, MS_NODEV = 2, 4
    if libc.mount(fsname.encode(), mountpoint.encode(), b"fuse.zramfs",
                  MS_NOSUID | MS_NODEV, data.encode()) != 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, f"mount {mountpoint}: {os.strerror(e)}")
    return fd


def _mount_fusermount(mountpoint: str, fsname: str, options: list[str]) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        opts = ",".join([f"fsname={fsname}", "subtype=zramfs", *options])
        done = subprocess.run(["fusermount3", "-o", opts, "--", mountpoint], env=env,
                              pass_fds=[theirs.fileno()], capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(_errno.EIO, f"fusermount3: {done.stderr.strip()}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise OSError(_errno.EIO, "fusermount3 passed no descriptor")
    return fds[0]


def _unmount(mountpoint: str) -> None:
    """Lazily: the tree goes at once; the connection ends once nothing has a file open."""
    import ctypes
    if os.geteuid() == 0:
        ctypes.CDLL(None, use_errno=True).umount2(mountpoint.encode(), 2)   # MNT_DETACH
    elif shutil.which("fusermount3"):
        subprocess.run(["fusermount3", "-u", "-z", "--", mountpoint], capture_output=True)
