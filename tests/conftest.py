"""Shared fixtures: a real zramfs daemon in a subprocess on its own temporary mountpoint, and
clean-up that runs pass or fail (swapoff, umount, losetup -d, fusermount3 -u, the process).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The corpus of real files is the benchmarks' and the tests' (scripts/corpus.py), not the
# product's.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from disk_io import IoDisk  # noqa: E402
from zramfs.zram._zram import Meta  # noqa: E402
from zramfs.service.pidfile import pid_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ZRAMFS = [sys.executable, "-m", "zramfs.cli"]
PAGE = 4096
PUNCH_HOLE = 0x02 | 0x01     # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: what loop sends for discard
ZERO_RANGE = 0x10 | 0x01     # FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE: for write-zeroes
_libc = ctypes.CDLL(None, use_errno=True)


def can_mount_fuse() -> str | None:
    """Why FUSE tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3 (Debian package fuse3)"
    return None


requires_fuse = pytest.mark.skipif(can_mount_fuse() is not None,
                                   reason=str(can_mount_fuse()))

# The engine's transports (zramfs daemon --fuse-transport); mount-level tests run on each.
TRANSPORTS = ("classic", "io_uring")
URING_PARAM = Path("/sys/module/fuse/parameters/enable_uring")


def uring_unavailable() -> str | None:
    """Why the io_uring transport cannot run here, or None."""
    if not URING_PARAM.exists():
        return f"no FUSE over io_uring in this kernel ({URING_PARAM} missing: needs 6.14+)"
    if not os.access(URING_PARAM, os.W_OK):
        return f"{URING_PARAM} is not writable"
    return None


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """A SIGTERM to pytest, which would end it without teardown, is made an interrupt
    meanwhile, so that what a test changed on the machine is put back then too."""
    old = signal.getsignal(signal.SIGTERM)
    if old == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        if old == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, old)


@pytest.fixture(scope="session")
def uring_param_restored() -> Iterator[None]:
    """The fuse module's enable_uring as it was before the first io_uring test, written back
    after the last one, pass or fail (a daemon asked for io_uring switches it on), a SIGTERM
    to pytest included (sigterm_as_interrupt)."""
    before = URING_PARAM.read_text().strip()
    with sigterm_as_interrupt():
        try:
            yield
        finally:
            if URING_PARAM.read_text().strip() != before:
                URING_PARAM.write_text(before + "\n")


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Each FUSE transport in turn; io_uring is skipped, with the reason, where the kernel
    lacks it."""
    if request.param == "io_uring":
        reason = uring_unavailable()
        if reason:
            pytest.skip(reason)
        request.getfixturevalue("uring_param_restored")
    return request.param


def run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def attached(meta: Meta) -> IoDisk:
    """A disk of its own (an id of the tests' range) with `meta` attached: the data path
    without a mount, its I/O through the data ops (disk_io)."""
    disk = IoDisk()
    disk.attach(meta)
    return disk


def destroy(disk: IoDisk) -> None:
    """Detaches, drains and destroys the disk's meta, as reset does."""
    disk.detach()
    disk.release().destroy()


class Cleanup:
    """Callbacks run last-in first-out; every one runs even if another fails."""

    def __init__(self) -> None:
        self._stack: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, fn: Callable[[], object]) -> None:
        self._stack.append((what, fn))

    def run_all(self) -> None:
        errors = []
        while self._stack:
            what, fn = self._stack.pop()
            try:
                fn()
            except Exception as e:  # keep cleaning; report at the end
                errors.append(f"{what}: {e!r}")
        if errors:
            raise AssertionError("clean-up failed: " + "; ".join(errors))


class Daemon:
    """A running `zramfs daemon` and its tree."""

    def __init__(self, mountpoint: Path, proc: subprocess.Popen, log: Path,
                 cleanup: Cleanup) -> None:
        self.mnt = mountpoint
        self.proc = proc
        self.log = log
        self.cleanup = cleanup
        self.transport = "classic"

    def dev(self, name: str = "zram0") -> Path:
        return self.mnt / "dev" / name

    def sys(self, name: str, attr: str) -> Path:
        return self.mnt / "sys" / "block" / name / attr

    def read(self, name: str, attr: str) -> str:
        return self.sys(name, attr).read_text()

    def write(self, name: str, attr: str, value: str) -> None:
        fd = os.open(self.sys(name, attr), os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def mm_stat(self, name: str = "zram0") -> list[int]:
        return [int(x) for x in self.read(name, "mm_stat").split()]

    def hot_add(self) -> str:
        return "zram" + (self.mnt / "sys/class/zram-control/hot_add").read_text().strip()

    def hot_remove(self, name: str) -> None:
        fd = os.open(self.mnt / "sys/class/zram-control/hot_remove", os.O_WRONLY)
        try:
            os.write(fd, name.removeprefix("zram").encode())
        finally:
            os.close(fd)

    def device(self, size: str = "256M", algorithm: str = "lz4",
               params: str | None = None) -> str:
        """A new initialised device's name; `params` are its algorithm_params (a zstd
        dictionary: "dict=PATH"), written before disksize."""
        name = self.hot_add()
        self.write(name, "comp_algorithm", algorithm)
        if params is not None:
            self.write(name, "algorithm_params", params)
        self.write(name, "disksize", size)
        return name

    def losetup(self, name: str) -> str:
        """Binds a device file to a loop device with direct I/O. The undo detaches it only
        while it is still bound to that file: a test may detach early, and another test on
        this machine may have the same loop device by then."""
        back = str(self.dev(name))
        loop = run("losetup", "--direct-io=on", "--find", "--show", back, timeout=60).stdout.strip()
        self.cleanup.push(f"losetup -d {loop}", lambda: detach_if_ours(loop, back))
        return loop

    def rss(self) -> int:
        """The daemon's resident memory, bytes."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None


def fallocate(path: Path, mode: int, off: int, length: int) -> None:
    """fallocate(2) with any mode (os.posix_fallocate only allocates)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        if _libc.fallocate(fd, mode, ctypes.c_long(off), ctypes.c_long(length)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fallocate mode {mode:#x}: {os.strerror(err)}")
    finally:
        os.close(fd)


def race(stop: threading.Event, loops: list[Callable[[], object]],
         readers: list[Callable[[], object]]) -> None:
    """Runs `loops` (they run until `stop` is set) beside `readers` until every reader is
    done, then stops the loops and waits for them."""
    looping = [threading.Thread(target=fn) for fn in loops]
    reading = [threading.Thread(target=fn) for fn in readers]
    for t in looping + reading:
        t.start()
    for t in reading:
        t.join()
    stop.set()
    for t in looping:
        t.join()


def backing_file(loop: str) -> str | None:
    """What a loop device is bound to, or None if it is free."""
    try:
        return Path(f"/sys/block/{Path(loop).name}/loop/backing_file").read_text().strip()
    except FileNotFoundError:
        return None


def swap_used_kib(dev: str) -> int:
    """The 'Used' column of /proc/swaps for dev, 0 if it is not there."""
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        f = line.split()
        if f[0] == dev:
            return int(f[3])
    return 0


def swap_is_on(dev: str) -> bool:
    return any(line.split()[0] == dev
               for line in Path("/proc/swaps").read_text().splitlines()[1:])


def detach_if_ours(loop: str, back: str) -> None:
    if backing_file(loop) == back:
        run("losetup", "-d", loop, timeout=60)


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def is_mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def stop_daemon(proc: subprocess.Popen, mountpoint: Path, timeout: float = 15) -> int | None:
    """SIGTERM, then lazy unmount and kill if it will not go. Returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    if is_mounted(mountpoint):
        run("fusermount3", "-u", "-z", str(mountpoint), check=False)
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    return proc.returncode


def release_holders(mountpoint: Path) -> None:
    """Swap, mounts and loop devices still on files under the mountpoint (a failed test)."""
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        dev = line.split()[0]
        back = Path(f"/sys/block/{Path(dev).name}/loop/backing_file")
        if back.exists() and back.read_text().strip().startswith(str(mountpoint)):
            run("swapoff", dev, check=False)
    for line in run("losetup", "-l", "-n", "-O", "NAME,BACK-FILE", check=False).stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].startswith(str(mountpoint)):
            for mline in Path("/proc/mounts").read_text().splitlines():
                if mline.split()[0] == parts[0]:
                    run("umount", "-l", mline.split()[1], check=False)
            run("losetup", "-d", parts[0], check=False)


# Runs a command with descriptors at 3, 4, ... and LISTEN_PID = its own pid, as systemd
# starts a service with its stored descriptors: argv is N, N source fds, then the command.
# The sources (pass_fds: inheritable) are closed, or the command would hold them too: a
# restarted daemon would keep its predecessor's pool memfd, all its memory, for its life.
_LISTEN_SHIM = """
import fcntl, os, sys
n = int(sys.argv[1]); fds = [int(a) for a in sys.argv[2:2 + n]]; cmd = sys.argv[2 + n:]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + n) for fd in fds]
for fd in set(fds) - set(range(3, 3 + n)):
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(cmd[0], cmd)
"""


def start_daemon(mountpoint: Path, log: Path, *args: str, env: dict[str, str] | None = None,
                 listen_fds: list[tuple[str, int]] = (),
                 supervised: bool = False) -> subprocess.Popen:
    """`zramfs daemon` on `mountpoint`, its output appended to `log`. Without `supervised`,
    the serving process itself (--no-supervisor). `listen_fds` (name, fd) are passed as a
    service manager passes its stored descriptors (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID)."""
    cmd = [*ZRAMFS, "--log-level", "debug", "daemon", "--mountpoint", str(mountpoint), *args]
    if not supervised:
        cmd.append("--no-supervisor")
    if env is None:               # no service manager, whatever runs the tests
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    env = {k: v for k, v in env.items() if not k.startswith("LISTEN_")}
    fds = [fd for _, fd in listen_fds]
    if fds:
        env["LISTEN_FDS"] = str(len(fds))
        env["LISTEN_FDNAMES"] = ":".join(name for name, _ in listen_fds)
        cmd = [sys.executable, "-c", _LISTEN_SHIM, str(len(fds)), *map(str, fds), *cmd]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                pass_fds=fds)


def wait_serving(d: Daemon, times: int = 1) -> None:
    """Until the log says "serving" `times` times (the tree mounted or adopted, and the
    config's devices set up)."""
    wait_for(lambda: d.log.read_bytes().count(b"serving ") >= times or not d.alive(), 60,
             "the daemon to mount and set up")
    if not d.alive():
        raise AssertionError(f"daemon exited {d.proc.returncode}:\n{d.log.read_text()}")


@contextlib.contextmanager
def zramfs_daemon(*args: str, tmp: Path | None = None, env: dict[str, str] | None = None,
                  supervised: bool = False, transport: str = "classic") -> Iterator[Daemon]:
    """A daemon on a new temporary mountpoint (see start_daemon) with the FUSE `transport`,
    stopped and cleaned up at the end; a test that starts the next daemon on the tree sets
    `d.proc` to it."""
    cleanup = Cleanup()
    base = Path(tempfile.mkdtemp(prefix="zramfs-test-", dir=tmp))
    mountpoint = base / "mnt"
    log = base / "daemon.log"
    d = Daemon(mountpoint, start_daemon(mountpoint, log, "--fuse-transport", transport, *args,
                                        env=env, supervised=supervised),
               log, cleanup)
    try:
        wait_serving(d)
        # The transport asked for is the one serving (io_uring could fall back silently).
        if transport != "auto":
            assert f"FUSE transport: {transport}".encode() in log.read_bytes(), log.read_text()
        d.transport = transport
        yield d
    finally:
        try:
            cleanup.run_all()
        finally:
            release_holders(mountpoint)
            stop_daemon(d.proc, mountpoint)
            pid_file(mountpoint).unlink(missing_ok=True)     # a killed daemon's
            if not is_mounted(mountpoint):
                shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def daemon(transport: str) -> Iterator[Daemon]:
    """A daemon on each transport in turn."""
    reason = can_mount_fuse()
    if reason:
        pytest.skip(reason)
    with zramfs_daemon(transport=transport) as d:
        yield d
        assert d.alive(), f"daemon died:\n{d.log.read_text()}"


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    c = Cleanup()
    try:
        yield c
    finally:
        c.run_all()
