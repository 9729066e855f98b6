"""Hostile use of the daemon, as the kernel's zram would answer it.

1. A backing_dev path inside the daemon's own tree is refused (EINVAL), never deadlocks it.
2. Numbers too big for their attribute give EINVAL or ERANGE, never EIO or a traceback.
3. A daemon at the end of its memory cgroup fails writes with EIO and stays alive.
4. SIGTERM while swap is on one of its devices: it keeps serving until the swap is gone.
5. dev/zramN behaves as a block device, and the tree as sysfs: errnos, modes, owners.

Every call that reaches the FUSE mount runs under a bound: a request that hangs is a
failure, and the mount's FUSE connection is then aborted (umount2 MNT_FORCE, which is what
`umount -f` does, without a path walk that would itself wait on the hung daemon), so the
blocked caller comes back. Every test undoes what it did, pass or fail: swapoff, losetup -d,
cgroups emptied and removed, the daemon ended by its pid and its mount gone.
"""
from __future__ import annotations

import ctypes
import errno
import grp
import mmap
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (PAGE, PUNCH_HOLE, Cleanup, Daemon, backing_file, can_mount_fuse,
                      is_mounted, run, swap_is_on, swap_used_kib, wait_for, zramfs_daemon)
from zramfs.service.loop import loops_of

pytestmark = pytest.mark.skipif(can_mount_fuse() is not None, reason=str(can_mount_fuse()))

MiB = 1 << 20
HERE = Path(__file__).resolve().parent
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")
HANG = 15                         # seconds after which a call into the mount counts as hung
BAD_NUMBER_ERRNOS = {errno.EINVAL, errno.ERANGE}
FALLOC_FL_ZERO_RANGE = 0x10
MNT_FORCE = 1
_libc = ctypes.CDLL(None, use_errno=True)


# --- guards against a hung mount ------------------------------------------------------------


def abort_mount(mnt: Path) -> None:
    """`umount -f` as the syscall: the FUSE connection is aborted, so every request waiting
    on the daemon ends (ENOTCONN). umount(8) would first stat the mountpoint, a request to
    the daemon that hangs too. The mount itself goes with the daemon's clean-up."""
    if is_mounted(mnt):
        _libc.umount2(str(mnt).encode(), MNT_FORCE)


def guarded(d: Daemon, fn: Callable[[], Any], what: str, timeout: float = HANG) -> Any:
    """fn() in a thread; if it has not returned after `timeout` the mount is aborted and the
    test fails. Its exception, if any, is raised here."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the caller
            out["error"] = e

    t = threading.Thread(target=target, daemon=True, name=f"guarded {what}")
    t.start()
    t.join(timeout)
    if t.is_alive():
        abort_mount(d.mnt)
        t.join(30)
        raise AssertionError(f"{what}: no answer in {timeout} s (the daemon hangs); "
                             f"the mount was aborted")
    if "error" in out:
        raise out["error"]
    return out.get("value")


def errno_of(d: Daemon, fn: Callable[[], Any], what: str) -> int | None:
    """The errno fn fails with, or None if it succeeds."""
    try:
        guarded(d, fn, what)
    except OSError as e:
        return e.errno
    return None


def write_all(path: Path, text: str) -> None:
    """Writes text to an attribute as `echo -n` does: write(2) until it is all taken."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY)
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def log_since(d: Daemon, mark: int) -> str:
    return d.log.read_bytes()[mark:].decode(errors="replace")


def log_mark(d: Daemon) -> int:
    return d.log.stat().st_size


def end_child(proc: subprocess.Popen, mnt: Path | None = None) -> None:
    """Kills a child of ours by pid and reaps it; if it sits in a FUSE request that will
    not be answered, aborts the mount first so that it can die."""
    if proc.poll() is not None:
        return
    proc.kill()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        if mnt is not None:
            abort_mount(mnt)
        proc.wait(30)


def detach_ours(loop: str, d: Daemon, name: str) -> None:
    """losetup -d of the loop device we bound to dev/NAME, if it is still bound to it: by
    its path, or, once the daemon has unmounted lazily, by the path inside the detached
    mount (/dev/NAME), which the fixture's own undo no longer recognises."""
    if backing_file(loop) in (str(d.dev(name)), f"/dev/{name}"):
        run("losetup", "-d", loop, timeout=60)


def make_cgroup(cleanup: Cleanup, tag: str, limit: int) -> Path:
    """A memory cgroup of our own; its undo waits for it to be empty, then removes it."""
    cg = CGROUP_MEMORY / f"zramfs-test-{tag}-{os.getpid()}"
    cg.mkdir()

    def remove() -> None:
        if cg.exists():
            wait_for(lambda: not (cg / "cgroup.procs").read_text().strip(), 30,
                     f"{cg} to have no processes")
            cg.rmdir()

    cleanup.push(f"rmdir {cg}", remove)
    (cg / "memory.limit_in_bytes").write_text(str(limit))
    return cg


def leave_cgroup(pid: int) -> None:
    """Back to the root memory cgroup, if the process still exists."""
    try:
        (CGROUP_MEMORY / "cgroup.procs").write_text(str(pid))
    except ProcessLookupError:
        pass
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise


# --- a daemon shared by the quick tests -------------------------------------------------------


@pytest.fixture(scope="module")
def shared() -> Iterator[Daemon]:
    with zramfs_daemon() as d:
        yield d


@pytest.fixture
def dz(shared: Daemon) -> Iterator[Daemon]:
    """The shared daemon, checked after the test: alive, and no traceback in its log (past
    what the test checked itself, `log_checked_to`)."""
    mark = log_mark(shared)
    assert shared.alive(), "the shared daemon died in an earlier test"
    yield shared
    log = log_since(shared, max(mark, getattr(shared, "log_checked_to", 0)))
    assert "Traceback" not in log, f"the daemon logged a traceback:\n{log}"
    assert shared.alive(), f"the daemon died:\n{log}"


@pytest.fixture
def fresh(dz: Daemon) -> Iterator[Callable[..., str]]:
    """new(size=None, **attrs) -> a new device on the shared daemon (initialised if size is
    given, attributes stored first); each is reset and removed after the test."""
    made: list[str] = []

    def new(size: str | None = None, **attrs: str) -> str:
        name = guarded(dz, dz.hot_add, "hot_add")
        made.append(name)
        for attr, value in attrs.items():
            guarded(dz, lambda: dz.write(name, attr, value), f"{attr} {value}")
        if size is not None:
            guarded(dz, lambda: dz.write(name, "disksize", size), f"disksize {size}")
        return name

    yield new
    for name in made:
        if not dz.alive() or not dz.sys(name, "reset").exists():
            continue
        try:
            guarded(dz, lambda: dz.write(name, "reset", "1"), f"{name} reset")
        except OSError:
            pass
        guarded(dz, lambda: dz.hot_remove(name), f"{name} hot_remove")


# --- 1. backing_dev inside the tree -----------------------------------------------------------

HOSTILE_WRITE = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
try:
    os.write(fd, sys.argv[2].encode())
    print("ok", flush=True)
except OSError as e:
    print(e.errno, flush=True)
"""


@pytest.mark.parametrize("target", ["other-device", "same-device", "link-from-outside"])
def test_backing_dev_inside_the_tree_is_einval_not_a_deadlock(tmp_path: Path,
                                                              target: str) -> None:
    """`echo MNT/dev/zramA > MNT/sys/block/zramB/backing_dev` is answered promptly with
    EINVAL, the path lying inside the daemon's own tree (opening it would need the daemon
    itself); the daemon goes on serving and its log says why. Also for zramB's own file, and
    for a symlink outside the tree that leads into it."""
    with zramfs_daemon(tmp=tmp_path) as d:
        other = d.device("16M")                                   # zram0
        victim = guarded(d, d.hot_add, "hot_add")                 # zram1, not initialised
        path = {"other-device": str(d.dev(other)), "same-device": str(d.dev(victim)),
                "link-from-outside": str(tmp_path / "link")}[target]
        if target == "link-from-outside":
            os.symlink(d.dev(other), tmp_path / "link")
        mark = log_mark(d)

        out_path = tmp_path / "writer.out"
        with open(out_path, "wb") as o:
            writer = subprocess.Popen([sys.executable, "-c", HOSTILE_WRITE,
                                       str(d.sys(victim, "backing_dev")), path + "\n"],
                                      stdout=o, stderr=subprocess.STDOUT)
        d.cleanup.push("end the writer", lambda: end_child(writer, d.mnt))
        try:
            writer.wait(HANG)
        except subprocess.TimeoutExpired:
            abort_mount(d.mnt)                # the writer and the daemon come back with ENOTCONN
            end_child(writer, d.mnt)
            pytest.fail(f"writing {path} to {victim}/backing_dev hung for {HANG} s: the daemon "
                        f"deadlocked on its own tree (mount aborted); log:\n{log_since(d, mark)}")
        out = out_path.read_text().strip()
        assert out == str(errno.EINVAL), f"backing_dev {path}: {out!r}, not EINVAL"
        assert d.alive(), f"the daemon died:\n{d.log.read_text()}"
        # It still serves: another attribute reads, the refused one was not taken.
        assert guarded(d, lambda: d.read(other, "disksize"), "read disksize") == f"{16 * MiB}\n"
        assert guarded(d, lambda: d.read(victim, "backing_dev"), "read backing_dev") == "none\n"
        log = log_since(d, mark)
        assert "Traceback" not in log, log
        said = [line for line in log.splitlines()
                if victim in line and (str(d.mnt) in line or path in line)]
        assert said, f"the log does not say why backing_dev {path} was refused:\n{log}"


# --- 2. numbers too big for their field -------------------------------------------------------

HUGE = ["99999999999999999999999", "16E", "9" * 5000, "1e23"]

# Where the kernel's own answer is not a refusal: memparse reads "1e23" as 1 EiB ("1" and the
# E suffix, the rest ignored). mem_limit takes that (no real limit); disksize fails to
# allocate a slot table for it (ENOMEM). Everything else above is too big for its field.
KERNEL_TAKES = {("mem_limit", "1e23"): {None}, ("disksize", "1e23"): {errno.ENOMEM}}

# (attribute, what the device needs first, how the number is written)
NUMERIC = [
    ("disksize", "new", "{}"),
    ("mem_limit", "initialised", "{}"),
    ("writeback_limit", "initialised", "{}"),
    ("writeback_limit_enable", "initialised", "{}"),
    ("reset", "initialised", "{}"),
    ("mem_used_max", "initialised", "{}"),
    ("idle", "initialised", "{}"),
    ("hot_remove", "new", "{}"),
    ("recompress", "recompression", "type=idle max_pages={}"),
    ("recompress", "recompression", "threshold={}"),
    ("writeback", "backing", "page_index={}"),
    ("writeback", "backing", "page_indexes=0-{}"),
    ("algorithm_params", "new", "level={}"),
    ("recomp_algorithm", "new", "algo=zstd priority=1 level={}"),
]


def _short(value: str) -> str:
    return value if len(value) < 30 else f"9x{len(value)}"


@pytest.mark.parametrize("value", HUGE, ids=[_short(v) for v in HUGE])
@pytest.mark.parametrize("attr,needs,form", NUMERIC,
                         ids=[f"{a}:{f.replace('{}', 'N')}" for a, _, f in NUMERIC])
def test_numbers_too_big_are_einval_or_erange(dz: Daemon, fresh: Callable[..., str],
                                              tmp_path: Path, attr: str, needs: str,
                                              form: str, value: str) -> None:
    """A number its field cannot hold is refused as the kernel refuses it (ERANGE for a
    kstrtoull overflow, EINVAL for garbage), never EIO from an exception in the daemon."""
    if needs == "new":
        name = fresh()
    elif needs == "initialised":
        name = fresh("64M")
    elif needs == "recompression":
        name = fresh("64M", recomp_algorithm="algo=zstd priority=1")
    else:
        backing = tmp_path / "backing"
        backing.write_bytes(bytes(4 * MiB))
        name = fresh("64M", backing_dev=str(backing))
    text = form.format(value)
    path = (dz.mnt / "sys/class/zram-control/hot_remove" if attr == "hot_remove"
            else dz.sys(name, attr))
    mark = log_mark(dz)
    code = errno_of(dz, lambda: write_all(path, text), f"{attr} {_short(value)}")
    log = log_since(dz, mark)
    dz.log_checked_to = log_mark(dz)                   # type: ignore[attr-defined]
    assert code in BAD_NUMBER_ERRNOS | KERNEL_TAKES.get((attr, value), set()), (
        f"{attr} <- {form.format(_short(value))!r}: "
        f"{'accepted' if code is None else errno.errorcode.get(code, code)}, not EINVAL/ERANGE"
        + (f"; the daemon logged:\n{log[-3000:]}" if log else ""))
    assert "Traceback" not in log, f"the daemon logged a traceback:\n{log[-3000:]}"
    # The device is still there and serves.
    assert guarded(dz, lambda: dz.read(name, "initstate"), "initstate") in ("0\n", "1\n")


@pytest.mark.parametrize("value", HUGE, ids=[_short(v) for v in HUGE])
def test_disksize_after_a_huge_mem_limit(dz: Daemon, fresh: Callable[..., str],
                                         value: str) -> None:
    """A refused mem_limit leaves the limit as it was: `echo 1G > disksize` then works and
    mm_stat's mem_limit is still 0 (none)."""
    name = fresh()
    mark = log_mark(dz)
    limit = errno_of(dz, lambda: write_all(dz.sys(name, "mem_limit"), value), "mem_limit")
    code = errno_of(dz, lambda: write_all(dz.sys(name, "disksize"), "1G"), "disksize 1G")
    log = log_since(dz, mark)
    dz.log_checked_to = log_mark(dz)                   # type: ignore[attr-defined]
    assert code is None, (
        f"disksize 1G after mem_limit {_short(value)} "
        f"({'accepted' if limit is None else errno.errorcode.get(limit, limit)}): "
        f"{errno.errorcode.get(code, code)}; the daemon logged:\n{log[-3000:]}")
    assert "Traceback" not in log, f"the daemon logged a traceback:\n{log[-3000:]}"
    taken = None in KERNEL_TAKES.get(("mem_limit", value), set())
    assert limit in BAD_NUMBER_ERRNOS | ({None} if taken else set()), (
        f"mem_limit <- {_short(value)!r}: "
        f"{'accepted' if limit is None else errno.errorcode.get(limit, limit)}")
    assert guarded(dz, lambda: dz.read(name, "disksize"), "disksize") == f"{1 << 30}\n"
    mem_limit = guarded(dz, lambda: dz.mm_stat(name), "mm_stat")[3]
    want = 1 << 60 if taken else 0                       # 1 EiB, as the kernel reads 1e23
    assert mem_limit == want, f"mem_limit is {mem_limit} after {_short(value)}"


# --- 3. the daemon's own memory runs out -------------------------------------------------------

BUDGET = 192 * MiB
FILL_MIB = 512

# Writes FILL 1 MiB chunks of random data with O_DIRECT, one line each ("w i ok SHA" or
# "w i err ERRNO"), then reads back every chunk that was written ("r i ok|bad|err ERRNO").
FILLER = """
import hashlib, mmap, os, sys
path, chunks = sys.argv[1], int(sys.argv[2])
MiB = 1 << 20
buf = mmap.mmap(-1, MiB)
fd = os.open(path, os.O_RDWR | os.O_DIRECT)
written = {}
for i in range(chunks):
    data = os.urandom(MiB)
    buf[:] = data
    try:
        n = os.pwrite(fd, buf, i * MiB)
    except OSError as e:
        print("w", i, "err", e.errno, flush=True)
        continue
    written[i] = (n, hashlib.sha256(data[:n]).hexdigest())
    print("w", i, "ok" if n == MiB else "short", n, flush=True)
for i, (size, digest) in written.items():
    try:
        n = os.preadv(fd, [buf], i * MiB)
    except OSError as e:
        print("r", i, "err", e.errno, flush=True)
        continue
    ok = n == MiB and hashlib.sha256(buf[:size]).hexdigest() == digest
    print("r", i, "ok" if ok else "bad", flush=True)
os.close(fd)
print("done", flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not CGROUP_MEMORY.is_dir(), reason="no cgroup v1 memory controller")
def test_memory_exhaustion_fails_writes_with_eio_and_the_daemon_lives(tmp_path: Path) -> None:
    """The daemon in a 192 MiB memory cgroup, a 1 GiB device without mem_limit, 512 MiB of
    random data written to it with O_DIRECT in 1 MiB chunks: the writes past the budget fail
    with EIO (not ENOTCONN, a dead daemon), io_stat counts them, the daemon is still alive,
    and every chunk written before reads back identical."""
    cleanup = Cleanup()
    try:
        cg = make_cgroup(cleanup, "oom", BUDGET)
        with zramfs_daemon(tmp=tmp_path) as d:
            # Undone before the daemon is stopped: it leaves the cgroup, which can then go.
            d.cleanup.push("the daemon out of the cgroup",
                           lambda: d.alive() and leave_cgroup(d.proc.pid))
            # In before the device exists: the pool and everything else it allocates from
            # here on is charged to the cgroup.
            (cg / "cgroup.procs").write_text(str(d.proc.pid))
            assert str(d.proc.pid) in (cg / "cgroup.procs").read_text().split()
            name = guarded(d, lambda: d.device("1G"), "make a 1G device")

            out_path = tmp_path / "filler.out"
            with open(out_path, "w") as out:
                filler = subprocess.Popen([sys.executable, "-c", FILLER, str(d.dev(name)),
                                           str(FILL_MIB)], stdout=out,
                                          stderr=subprocess.STDOUT, text=True)
            d.cleanup.push("end the filler", lambda: end_child(filler, d.mnt))
            try:
                filler.wait(180)
            except subprocess.TimeoutExpired:
                abort_mount(d.mnt)
                end_child(filler, d.mnt)
                pytest.fail(f"the writes hung (mount aborted); daemon alive: {d.alive()}; "
                            f"oom_control {(cg / 'memory.oom_control').read_text()!r}; last "
                            f"output {out_path.read_text()[-500:]!r}")
            lines = [line.split() for line in out_path.read_text().splitlines()]
            writes = {int(f[1]): f[2:] for f in lines if f[0] == "w"}
            reads = {int(f[1]): f[2:] for f in lines if f[0] == "r"}
            ok = sorted(i for i, r in writes.items() if r[0] == "ok")
            short = sorted(i for i, r in writes.items() if r[0] == "short")
            errors = {r[1] for r in writes.values() if r[0] == "err"}
            oom = (cg / "memory.oom_control").read_text().replace("\n", ", ")
            state = (f"{len(ok)} chunks written, write errors "
                     f"{sorted(errno.errorcode.get(int(e), e) for e in errors)}; daemon "
                     f"{'alive' if d.alive() else f'exited {d.proc.returncode}'}; "
                     f"cgroup {oom}")

            assert d.alive(), f"the daemon died: {state}"
            assert errors == {str(errno.EIO)}, f"writes past the budget must fail EIO: {state}"
            # A 1 MiB write goes to the daemon as several requests (max_write); the kernel
            # reports the bytes of those done before the first that failed: a short write,
            # whose bytes must then read back as any others.
            assert all(int(writes[i][1]) % PAGE == 0 for i in short), state
            assert len(ok) >= 16, f"hardly anything was written before the failures: {state}"
            failed_writes = int(guarded(d, lambda: d.read(name, "io_stat"), "io_stat")
                                .split()[1])
            assert failed_writes > 0, f"io_stat counts no failed writes: {state}"
            bad = {i: reads.get(i) for i in ok + short if reads.get(i) != ["ok"]}
            assert not bad, f"chunks that were written do not read back: {bad}; {state}"
            assert "done" in out_path.read_text()
            assert d.alive(), f"the daemon died reading back: {state}"
            assert "Traceback" not in d.log.read_text()
    finally:
        cleanup.run_all()


# --- 4. SIGTERM with swap on a device ---------------------------------------------------------

HOG_MIB = 160                 # memhog's memory; its cgroup holds HOG_LIMIT of it
HOG_LIMIT = 64 * MiB
SWAPPED = 70 * MiB            # out on the device when the daemon gets SIGTERM
WATCH = 7                     # seconds the test watches the daemon not exit after SIGTERM


def stopped_in_swap(d: Daemon, cg: Path, loop: str, tmp_path: Path
                    ) -> tuple[subprocess.Popen, Path]:
    """memhog in memory cgroup `cg` (made to swap readily), stopped (SIGSTOP) once SWAPPED of
    it is out on `loop`, so that it still needs its swapped pages after the daemon has had
    SIGTERM; ended at clean-up. The process and its output file."""
    if (cg / "memory.swappiness").exists():
        (cg / "memory.swappiness").write_text("100")
    hog_out = tmp_path / "hog.out"
    with open(hog_out, "wb") as o:
        hog = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$0" "$@"',
             sys.executable, str(HERE / "memhog.py"), str(HOG_MIB)],
            stdout=o, stderr=subprocess.STDOUT, cwd=tmp_path)
    d.cleanup.push(f"end memhog {hog.pid}",
                   lambda: hog.poll() is None and (os.kill(hog.pid, signal.SIGCONT),
                                                   end_child(hog)))
    wait_for(lambda: hog.poll() is not None or swap_used_kib(loop) * 1024 >= SWAPPED,
             120, f"{SWAPPED >> 20} MiB of memhog in swap")
    assert hog.poll() is None, f"memhog ended early: {hog_out.read_text()!r}"
    os.kill(hog.pid, signal.SIGSTOP)
    return hog, hog_out


@pytest.mark.slow
@pytest.mark.skipif(not CGROUP_MEMORY.is_dir(), reason="no cgroup v1 memory controller")
def test_sigterm_with_swap_in_use_waits_for_swapoff(tmp_path: Path) -> None:
    """SIGTERM while ~70 MiB of a process is swapped out to the device: the process runs to
    its end with its data intact, the daemon does not exit (or drop the device) while the
    swap is on, and once the test has run swapoff and losetup -d it exits by itself."""
    with zramfs_daemon(tmp=tmp_path) as d:
        name = guarded(d, lambda: d.device("512M"), "make a 512M device")
        loop = d.losetup(name)
        d.cleanup.push(f"losetup -d {loop}", lambda: detach_ours(loop, d, name))
        run("mkswap", loop, timeout=60)
        run("swapon", "-p", "32767", loop, timeout=60)
        d.cleanup.push(f"swapoff {loop}",
                       lambda: swap_is_on(loop) and run("swapoff", loop, timeout=120))
        cg = make_cgroup(d.cleanup, "hog", HOG_LIMIT)
        hog, hog_out = stopped_in_swap(d, cg, loop, tmp_path)
        swapped = swap_used_kib(loop)

        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(WATCH)
        except subprocess.TimeoutExpired:
            pass
        exited_under_swap = d.proc.poll()

        os.kill(hog.pid, signal.SIGCONT)
        try:
            hog.wait(180)
        except subprocess.TimeoutExpired:
            end_child(hog)
        hog_text = hog_out.read_text(errors="replace")
        still_swap = swap_is_on(loop)
        state = (f"{swapped} KiB swapped out at SIGTERM; daemon "
                 + ("alive" if exited_under_swap is None
                    else f"exited {exited_under_swap} while swap was on")
                 + f"; memhog exited {hog.returncode}: {hog_text.strip()!r}")
        assert hog.returncode == 0 and f"verified {HOG_MIB * MiB // PAGE} pages" in hog_text, (
            f"the swapped-out process lost its data: {state}")
        assert exited_under_swap is None and d.alive(), (
            f"the daemon exited while swap was on its device: {state}\n{d.log.read_text()}")
        assert still_swap

        run("swapoff", loop, timeout=120)
        run("losetup", "-d", loop, timeout=60)
        try:
            code = d.proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail("the daemon did not exit by itself after swapoff and losetup -d:\n"
                        + d.log.read_text()[-3000:])
        assert code == 0, d.log.read_text()
        assert not is_mounted(d.mnt)


@pytest.mark.slow
def test_a_swapoff_that_fails_at_shutdown_is_tried_again(tmp_path: Path) -> None:
    """The config's swap holds ~70 MiB of a process whose memory cgroup has no room to take
    them back and no OOM killer: the daemon's swapoff at SIGTERM fails (ENOMEM), and the
    daemon goes on serving and tries again; once the cgroup's limit is raised, a later try
    turns the swap off, the daemon exits 0, and the process finds all its pages. Before, the
    swapoff was tried once: the daemon waited for a holder that nobody would ever release."""
    conf = tmp_path / "zramfs.conf"
    conf.write_text("[zram0]\nzram-size = 512\nswap-priority = 32767\n")
    with zramfs_daemon("--config", str(conf), tmp=tmp_path) as d:
        [loop] = loops_of(d.dev("zram0"))                    # the config's swap
        cg = make_cgroup(d.cleanup, "swapoff", HOG_LIMIT)
        (cg / "memory.oom_control").write_text("1")          # no OOM kill: swapoff fails
        d.cleanup.push("the cgroup's limit raised",
                       lambda: (cg / "memory.limit_in_bytes").write_text(str(1 << 30)))
        hog, hog_out = stopped_in_swap(d, cg, loop, tmp_path)

        d.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "trying again every" in d.log.read_text() or not d.alive(), 120,
                 "the daemon's swapoff to fail")
        assert d.alive() and swap_is_on(loop), d.log.read_text()[-3000:]
        time.sleep(3)                                         # a try that fails again
        assert d.alive() and swap_is_on(loop), d.log.read_text()[-3000:]

        (cg / "memory.limit_in_bytes").write_text(str(1 << 30))
        try:
            code = d.proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail("the daemon did not turn its swap off once it could:\n"
                        + d.log.read_text()[-3000:])
        assert code == 0 and not swap_is_on(loop), d.log.read_text()[-3000:]
        assert "(tried again)" in d.log.read_text()
        os.kill(hog.pid, signal.SIGCONT)
        hog.wait(180)
        text = hog_out.read_text(errors="replace")
        assert hog.returncode == 0 and f"verified {HOG_MIB * MiB // PAGE} pages" in text, text


# --- 5. block-device and sysfs conformance ----------------------------------------------------


def aligned(size: int) -> mmap.mmap:
    """A page-aligned buffer, as O_DIRECT needs."""
    return mmap.mmap(-1, max(size, PAGE))


def open_dev(d: Daemon, name: str, flags: int) -> int:
    return guarded(d, lambda: os.open(d.dev(name), flags), f"open {name}")


UNALIGNED = [(100, 4096), (0, 1000), (4096, 4100), (512 + 7, 512)]


@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("off,length", UNALIGNED, ids=[f"{o}+{n}" for o, n in UNALIGNED])
def test_unaligned_o_direct_is_einval(dz: Daemon, fresh: Callable[..., str], op: str,
                                      off: int, length: int) -> None:
    """O_DIRECT I/O whose offset or length is not a multiple of 512 is refused (EINVAL) and
    changes nothing, as on a block device."""
    name = fresh("16M")
    before = os.urandom(4 * PAGE)
    fd = open_dev(dz, name, os.O_RDWR | os.O_DIRECT)
    try:
        buf = aligned(4 * PAGE)
        buf[:] = before
        assert guarded(dz, lambda: os.pwrite(fd, buf, 0), "aligned write") == 4 * PAGE
        view = memoryview(buf)[:length]
        if op == "read":
            code = errno_of(dz, lambda: os.preadv(fd, [view], off), f"read {length}@{off}")
        else:
            code = errno_of(dz, lambda: os.pwrite(fd, view, off), f"write {length}@{off}")
        view.release()
        assert code == errno.EINVAL, (
            f"O_DIRECT {op} of {length} bytes at {off}: "
            f"{'done' if code is None else errno.errorcode.get(code, code)}, not EINVAL")
        buf[:] = bytes(4 * PAGE)
        guarded(dz, lambda: os.preadv(fd, [buf], 0), "aligned read")
        assert bytes(buf) == before, "a refused unaligned write changed the device"
    finally:
        os.close(fd)


@pytest.mark.parametrize("off,length", [(100, 4096), (0, 1000), (4096, 513)],
                         ids=["off100", "len1000", "len513"])
def test_unaligned_discard_is_einval(dz: Daemon, fresh: Callable[..., str], off: int,
                                     length: int) -> None:
    name = fresh("16M")
    data = os.urandom(4 * PAGE)
    guarded(dz, lambda: dz.dev(name).write_bytes(data), "write")
    fd = open_dev(dz, name, os.O_RDWR)
    try:
        code = _fallocate_errno(dz, fd, PUNCH_HOLE, off, length)
    finally:
        os.close(fd)
    assert code == errno.EINVAL, (
        f"PUNCH_HOLE|KEEP_SIZE {length}@{off}: "
        f"{'done' if code is None else errno.errorcode.get(code, code)}, not EINVAL")
    assert guarded(dz, lambda: dz.dev(name).read_bytes()[:4 * PAGE], "read") == data


def _fallocate_errno(d: Daemon, fd: int, mode: int, off: int, length: int) -> int | None:
    def call() -> int | None:
        if _libc.fallocate(fd, mode, ctypes.c_long(off), ctypes.c_long(length)) != 0:
            return ctypes.get_errno()
        return None
    return guarded(d, call, f"fallocate {mode:#x}")


@pytest.mark.parametrize("size", ["disksize", "zero", "bigger"])
def test_ftruncate_is_einval(dz: Daemon, fresh: Callable[..., str], size: str) -> None:
    """A block device cannot be truncated: ftruncate fails EINVAL and the size stays."""
    name = fresh("16M")
    length = {"disksize": 16 * MiB, "zero": 0, "bigger": 32 * MiB}[size]
    fd = open_dev(dz, name, os.O_RDWR)
    try:
        code = errno_of(dz, lambda: os.ftruncate(fd, length), f"ftruncate {length}")
    finally:
        os.close(fd)
    assert code == errno.EINVAL, (
        f"ftruncate({length}): {'done' if code is None else errno.errorcode.get(code, code)}")
    assert os.stat(dz.dev(name)).st_size == 16 * MiB


def test_zero_range_without_keep_size_zeroes(dz: Daemon, fresh: Callable[..., str]) -> None:
    """FALLOC_FL_ZERO_RANGE without KEEP_SIZE on an aligned range inside the device (what
    `fallocate -z` sends) succeeds and zeroes exactly that range."""
    name = fresh("16M")
    data = os.urandom(16 * PAGE)
    guarded(dz, lambda: dz.dev(name).write_bytes(data), "write")
    fd = open_dev(dz, name, os.O_RDWR)
    try:
        code = _fallocate_errno(dz, fd, FALLOC_FL_ZERO_RANGE, 4 * PAGE, 8 * PAGE)
    finally:
        os.close(fd)
    assert code is None, f"ZERO_RANGE 8 pages at 4: {errno.errorcode.get(code, code)}"
    got = guarded(dz, lambda: dz.dev(name).read_bytes()[:16 * PAGE], "read")
    assert got == data[:4 * PAGE] + bytes(8 * PAGE) + data[12 * PAGE:]
    assert os.stat(dz.dev(name)).st_size == 16 * MiB


def test_uninitialised_device_reads_eof_and_writes_enospc(dz: Daemon,
                                                          fresh: Callable[..., str]) -> None:
    """A device with no disksize is a block device of size 0: reads are at its end (0
    bytes), writes are past it (ENOSPC)."""
    name = fresh()
    assert os.stat(dz.dev(name)).st_size == 0
    fd = open_dev(dz, name, os.O_RDWR)
    try:
        try:
            got: bytes | str = guarded(dz, lambda: os.pread(fd, PAGE, 0), "read")
        except OSError as e:
            got = f"{errno.errorcode.get(e.errno, e.errno)}"
        code = errno_of(dz, lambda: os.pwrite(fd, b"z" * PAGE, 0), "write")
    finally:
        os.close(fd)
    assert got == b"", f"read of an uninitialised device: {got!r}, not EOF"
    assert code == errno.ENOSPC, (
        f"write to an uninitialised device: "
        f"{'done' if code is None else errno.errorcode.get(code, code)}, not ENOSPC")


TREE_OPS: dict[str, Callable[[Path, str], None]] = {
    "mkdir dev/x": lambda m, n: os.mkdir(m / "dev" / "x"),
    "mkdir sys/block/N/x": lambda m, n: os.mkdir(m / "sys/block" / n / "x"),
    "rename dev/N": lambda m, n: os.rename(m / "dev" / n, m / "dev" / "moved"),
    "rename sys/block/N/disksize": lambda m, n: os.rename(m / "sys/block" / n / "disksize",
                                                          m / "sys/block" / n / "size"),
    "unlink dev/N": lambda m, n: os.unlink(m / "dev" / n),
    "unlink sys/block/N/mm_stat": lambda m, n: os.unlink(m / "sys/block" / n / "mm_stat"),
    "symlink dev/x": lambda m, n: os.symlink(n, m / "dev" / "x"),
    "symlink sys/block/x": lambda m, n: os.symlink(n, m / "sys/block" / "x"),
}


@pytest.mark.parametrize("op", list(TREE_OPS))
def test_tree_cannot_be_changed_eperm(dz: Daemon, fresh: Callable[..., str], op: str) -> None:
    name = fresh("8M")
    code = errno_of(dz, lambda: TREE_OPS[op](dz.mnt, name), op)
    assert code == errno.EPERM, (
        f"{op}: {'done' if code is None else errno.errorcode.get(code, code)}, not EPERM")
    assert dz.dev(name).exists() and dz.sys(name, "disksize").exists()


ATTR_OPS: dict[str, Callable[[Path], None]] = {
    "chmod": lambda p: os.chmod(p, 0o600),
    "chown": lambda p: os.chown(p, 1, 1),
    "chgrp": lambda p: os.chown(p, -1, 1),
    "utime": lambda p: os.utime(p, (0, 0)),
    "touch": lambda p: os.utime(p),
}


@pytest.mark.parametrize("which", ["device", "attribute", "hot_add"])
@pytest.mark.parametrize("op", list(ATTR_OPS))
def test_metadata_cannot_be_changed_eperm(dz: Daemon, fresh: Callable[..., str], op: str,
                                          which: str) -> None:
    name = fresh("8M")
    path = {"device": dz.dev(name), "attribute": dz.sys(name, "disksize"),
            "hot_add": dz.mnt / "sys/class/zram-control/hot_add"}[which]
    before = os.stat(path)
    code = errno_of(dz, lambda: ATTR_OPS[op](path), f"{op} {path.name}")
    after = os.stat(path)
    assert code == errno.EPERM, (
        f"{op} on {which} {path.name}: "
        f"{'done' if code is None else errno.errorcode.get(code, code)}, not EPERM")
    assert (after.st_mode, after.st_uid, after.st_gid) == \
        (before.st_mode, before.st_uid, before.st_gid)


def test_hot_add_is_0400(dz: Daemon) -> None:
    """Reading hot_add makes a device: only root may read it, as in the kernel."""
    mode = stat.S_IMODE(os.stat(dz.mnt / "sys/class/zram-control/hot_add").st_mode)
    assert mode == 0o400, f"hot_add has mode {mode:o}"


def test_device_file_is_root_disk_0660(dz: Daemon, fresh: Callable[..., str]) -> None:
    """dev/zramN as udev makes /dev/zramN: root:disk, 0660."""
    name = fresh()
    st = os.stat(dz.dev(name))
    disk = grp.getgrnam("disk").gr_gid
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, disk, 0o660), (
        f"{name}: uid {st.st_uid} gid {st.st_gid} mode {stat.S_IMODE(st.st_mode):o}; "
        f"want 0 {disk} 660")


@pytest.mark.skipif(tuple(map(int, os.uname().release.split(".")[:2])) < (6, 6),
                    reason="shared mmap of a direct-I/O FUSE file needs "
                           "FUSE_DIRECT_IO_ALLOW_MMAP, kernel 6.6+")
def test_mmap_shared_of_the_device(dz: Daemon, fresh: Callable[..., str]) -> None:
    """A block device can be mapped MAP_SHARED: stores through the map reach the device,
    and the map sees what was written through the file."""
    name = fresh("16M")
    data = os.urandom(2 * PAGE)
    fd = open_dev(dz, name, os.O_RDWR)
    try:
        m = guarded(dz, lambda: mmap.mmap(fd, 4 * PAGE, mmap.MAP_SHARED,
                                          mmap.PROT_READ | mmap.PROT_WRITE), "mmap")
        try:
            m[PAGE:3 * PAGE] = data
            guarded(dz, m.flush, "msync")
            got = guarded(dz, lambda: os.pread(fd, 2 * PAGE, PAGE), "pread")
            assert got == data
            later = os.urandom(PAGE)
            guarded(dz, lambda: os.pwrite(fd, later, 3 * PAGE), "pwrite")
        finally:
            m.close()
        m = guarded(dz, lambda: mmap.mmap(fd, 4 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ), "mmap")
        try:
            assert m[3 * PAGE:4 * PAGE] == later and m[PAGE:3 * PAGE] == data
        finally:
            m.close()
    finally:
        os.close(fd)


def test_guard_refuses_blocking_calls_on_the_trio_thread(tmp_path: Path) -> None:
    """The guard the daemon serves under: on the trio thread, opening a file or starting a
    program raises at once (a path could lie in the tree this thread answers for); in a
    worker thread, and after the guard, the same calls work. /proc and /sys stay readable."""
    import trio

    from zramfs.service.daemon import guard_trio_thread

    target = tmp_path / "file"

    async def main() -> None:
        with guard_trio_thread():
            with pytest.raises(RuntimeError, match="blocking call on the trio thread"):
                open(target, "w")
            with pytest.raises(RuntimeError, match="blocking call on the trio thread"):
                subprocess.run(["true"])
            assert Path("/proc/self/status").read_text()
            await trio.to_thread.run_sync(target.write_text, "from a worker thread")
        target.write_text("after the guard")

    trio.run(main)
    assert target.read_text() == "after the guard"
