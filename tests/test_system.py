"""The daemon used as people use zram: a file system on it, swap on it, fio on it, and a daemon
killed under a bound loop device. Everything goes through a real loop device (direct I/O) and
the real FUSE mount; every test undoes what it did (umount, swapoff, losetup -d, cgroup rmdir,
its processes ended by pid) pass or fail.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import (Cleanup, Daemon, is_mounted, requires_fuse, run, swap_is_on,
                      swap_used_kib, wait_for, zramfs_daemon)

MiB = 1 << 20
HERE = Path(__file__).resolve().parent

# mm_stat fields
ORIG_DATA_SIZE, COMPR_DATA_SIZE, MEM_USED_TOTAL = 0, 1, 2

# ~200 MB of real files: text, HTML, Python, ELF binaries (git-core has hard links too).
TREE_SOURCES = [Path("/usr/share/doc"), Path("/usr/lib/python3.11"), Path("/usr/lib/git-core")]

CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")
HOG_MIB = 320                      # what the child allocates, and touches, and checks
HOG_LIMIT = 64 * MiB               # its cgroup's memory.limit_in_bytes
HOG_TIMEOUT = 300                  # seconds; an exceeded bound is a failure, not a timing


# --- helpers ---------------------------------------------------------------------------------


def poll(value: Callable[[], int], done: Callable[[int], bool], timeout: float,
         interval: float = 0.25) -> int:
    """Reads `value` until `done` holds or the time is up; returns the last reading."""
    deadline = time.monotonic() + timeout
    v = value()
    while not done(v) and time.monotonic() < deadline:
        time.sleep(interval)
        v = value()
    return v


def umount_if_mounted(path: Path) -> None:
    if is_mounted(path):
        run("umount", str(path), timeout=60)


def loops_on(path: Path) -> list[str]:
    """Loop devices bound to files under path."""
    out = run("losetup", "-l", "-n", "-O", "NAME,BACK-FILE", timeout=30).stdout
    return [f[0] for f in (line.split(None, 1) for line in out.splitlines())
            if len(f) == 2 and f[1].strip().startswith(str(path) + "/")]


def discard_max_bytes(loop: str) -> int:
    return int(Path(f"/sys/block/{Path(loop).name}/queue/discard_max_bytes").read_text())


def drop_caches() -> None:
    run("sync")
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def manifest(root: Path) -> dict[Path, str]:
    """Every regular file and symlink under root (relative path -> 'file' or the link)."""
    out: dict[Path, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        for name in filenames + [n for n in dirnames if (d / n).is_symlink()]:
            p = d / name
            rel = p.relative_to(root)
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = "file"
    return out


def swapoff_if_on(dev: str) -> None:
    if swap_is_on(dev):
        run("swapoff", dev, timeout=120)


def end_process(proc: subprocess.Popen) -> None:
    """Kills a child we started, by its pid, and reaps it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)


def remove_cgroup(path: Path) -> None:
    if path.exists():
        wait_for(lambda: not (path / "cgroup.procs").read_text().strip(), 30,
                 f"{path} to have no processes")
        path.rmdir()


def memory_cgroup(cleanup: Cleanup, name: str, limit: int = HOG_LIMIT) -> Path:
    """A new memory cgroup of `limit` bytes that swaps readily, removed at cleanup."""
    cgroup = CGROUP_MEMORY / f"{name}-{os.getpid()}"
    cgroup.mkdir()
    cleanup.push(f"rmdir {cgroup}", lambda: remove_cgroup(cgroup))
    (cgroup / "memory.limit_in_bytes").write_text(str(limit))
    if (cgroup / "memory.swappiness").exists():
        (cgroup / "memory.swappiness").write_text("100")
    return cgroup


def start_in_cgroup(cleanup: Cleanup, cgroup: Path, argv: list[str], tmp_path: Path,
                    **popen: object) -> subprocess.Popen:
    """`argv` in `cgroup` (a shell puts itself, nothing else, there and becomes it), its
    output in tmp_path's hog.out and hog.err, ended at cleanup; waits until it has joined."""
    with open(tmp_path / "hog.out", "wb") as o, open(tmp_path / "hog.err", "wb") as e:
        proc = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$0" "$@"', *argv],
            stdout=o, stderr=e, cwd=tmp_path, **popen)
    cleanup.push(f"kill {proc.pid}", lambda: (end_process(proc),
                                              proc.stdin and proc.stdin.close()))
    wait_for(lambda: proc.poll() is not None or str(proc.pid) in
             (cgroup / "cgroup.procs").read_text().split(), 10, f"{proc.pid} to join {cgroup}")
    return proc


def memory_cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    raise AssertionError(f"process {pid} has no memory cgroup")


# --- ext4 --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ext4_tree_reads_back_and_fstrim_gives_memory_back(daemon: Daemon, tmp_path: Path) -> None:
    """ext4 on the device holds a ~200 MB tree of real files byte for byte (read back from the
    device after the page cache is dropped), and deleting it then fstrim gives the device's
    memory back: discard reaches the device as FALLOCATE and frees the pages."""
    name = daemon.device("1G", "lz4")
    loop = daemon.losetup(name)
    assert discard_max_bytes(loop) > 0, "the loop device offers no discard"
    run("mkfs.ext4", "-q", loop, timeout=120)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", loop, str(mnt), timeout=60)
    daemon.cleanup.push(f"umount {mnt}", lambda: umount_if_mounted(mnt))

    tree = mnt / "tree"
    tree.mkdir()
    expected: dict[Path, dict[Path, str]] = {src: manifest(src) for src in TREE_SOURCES}
    for src in TREE_SOURCES:
        run("cp", "-a", str(src), str(tree / src.name), timeout=300)
    drop_caches()

    files = 0
    for src, entries in expected.items():
        for rel, kind in entries.items():
            copy = tree / src.name / rel
            if kind == "file":
                assert copy.is_file() and not copy.is_symlink(), f"{copy} missing"
                assert sha256(copy) == sha256(src / rel), f"{copy} differs from {src / rel}"
                files += 1
            else:
                assert copy.is_symlink() and "link:" + os.readlink(copy) == kind, copy
    assert files > 1000, f"only {files} files checked"

    full = daemon.mm_stat(name)
    assert full[ORIG_DATA_SIZE] > 150 * MiB, f"the tree is not on the device: {full}"

    shutil.rmtree(tree)
    run("sync")
    trim = run("fstrim", "-v", str(mnt), timeout=120)
    # What fstrim leaves is ext4's own metadata (journal, inode tables, directories).
    trimmed = daemon.mm_stat(name)
    assert trimmed[MEM_USED_TOTAL] < full[MEM_USED_TOTAL] / 10, (
        f"memory not given back after fstrim ({trim.stdout.strip()}): "
        f"mm_stat with the tree {full}, after {trimmed}")
    assert trimmed[ORIG_DATA_SIZE] < full[ORIG_DATA_SIZE] / 10, (
        f"pages not freed after fstrim: mm_stat with the tree {full}, after {trimmed}")

    umount_if_mounted(mnt)
    run("losetup", "-d", loop, timeout=60)
    wait_for(lambda: not loops_on(daemon.mnt), 10, f"{loop} to detach")


# --- swap --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_swap_in_memory_cgroup_round_trips_and_discards(daemon: Daemon, tmp_path: Path) -> None:
    """A process in a 64 MiB memory cgroup allocates 320 MiB, so most of it is swapped out to
    the device and back in; it reads every page back as written, the device held its pages
    meanwhile, and once it exits swapon --discard frees the device's memory again."""
    name = daemon.device("1G", "lz4")
    loop = daemon.losetup(name)
    assert discard_max_bytes(loop) > 0, "the loop device offers no discard"
    run("mkswap", loop, timeout=60)
    run("swapon", "--discard", "-p", "32767", loop, timeout=60)
    daemon.cleanup.push(f"swapoff {loop}", lambda: swapoff_if_on(loop))
    others = [line.split() for line in Path("/proc/swaps").read_text().splitlines()[1:]
              if line.split()[0] != loop]
    assert all(int(f[4]) < 32767 for f in others), f"another swap outranks ours: {others}"

    cgroup = memory_cgroup(daemon.cleanup, "zramfs-test")
    out, err = tmp_path / "hog.out", tmp_path / "hog.err"
    hog = start_in_cgroup(daemon.cleanup, cgroup,
                          [sys.executable, str(HERE / "memhog.py"), str(HOG_MIB)], tmp_path)
    assert memory_cgroup_of(daemon.proc.pid) != "/" + cgroup.name, "the daemon is in the cgroup"

    max_stored = max_swap_kib = 0
    deadline = time.monotonic() + HOG_TIMEOUT
    while hog.poll() is None and time.monotonic() < deadline:
        max_stored = max(max_stored, daemon.mm_stat(name)[ORIG_DATA_SIZE])
        max_swap_kib = max(max_swap_kib, swap_used_kib(loop))
        time.sleep(0.1)
    if hog.poll() is None:
        end_process(hog)
        pytest.fail(f"memhog did not finish within {HOG_TIMEOUT} s; mm_stat "
                    f"{daemon.mm_stat(name)}; {err.read_text()}")
    oom = (cgroup / "memory.oom_control").read_text()
    assert hog.returncode == 0, (f"memhog exited {hog.returncode}: {err.read_text()!r} "
                                 f"{out.read_text()!r}; oom_control {oom!r}")
    assert re.search(r"^oom_kill 0$", oom, re.M), f"the cgroup's OOM killer fired: {oom!r}"
    assert f"verified {HOG_MIB * MiB // 4096} pages" in out.read_text()

    # At least what does not fit under the limit went out to the device.
    must_swap = HOG_MIB * MiB - HOG_LIMIT
    assert max_stored >= must_swap * 3 // 4, (
        f"the device held at most {max_stored} bytes while memhog ran")
    assert max_swap_kib * 1024 >= must_swap * 3 // 4, f"swap used at most {max_swap_kib} KiB"

    # The child is gone: its swap slots are freed and discarded, so the pages are freed.
    stored = poll(lambda: daemon.mm_stat(name)[ORIG_DATA_SIZE], lambda v: v < 4 * MiB, 20)
    assert stored < 4 * MiB, (f"after memhog exited the device still holds {stored} bytes "
                              f"(swap used {swap_used_kib(loop)} KiB); mm_stat "
                              f"{daemon.mm_stat(name)}")

    swapoff_if_on(loop)
    run("losetup", "-d", loop, timeout=60)
    wait_for(lambda: not loops_on(daemon.mnt), 10, f"{loop} to detach")
    remove_cgroup(cgroup)


# --- kill -9 -----------------------------------------------------------------------------------


@requires_fuse
def test_sigkill_under_bound_loop_device_fails_io_and_cleans_up(
        tmp_path: Path, transport: str) -> None:
    """Killing the daemon with SIGKILL while a loop device is bound to one of its device files
    makes I/O on the loop device fail at once instead of hanging, and the loop device and the
    mount can still be taken down."""
    with zramfs_daemon(tmp=tmp_path, transport=transport) as d:
        name = d.device("64M", "lz4")
        loop = d.losetup(name)
        # It works before the kill.
        run("dd", "if=/dev/urandom", f"of={loop}", "bs=4k", "count=64", "oflag=direct",
            timeout=30)
        run("dd", f"if={loop}", "of=/dev/null", "bs=4k", "count=64", "iflag=direct",
            timeout=30)

        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(30)
        assert d.proc.returncode == -signal.SIGKILL

        for args in (["dd", f"if={loop}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"],
                     ["dd", "if=/dev/zero", f"of={loop}", "bs=4k", "count=1", "oflag=direct"]):
            r = run("timeout", "20", *args, check=False, timeout=60)
            assert r.returncode not in (0, 124, 137), (
                f"{' '.join(args)} after the kill: exit {r.returncode} {r.stderr!r}")

        run("losetup", "-d", loop, timeout=30)
        run("fusermount3", "-u", "-z", str(d.mnt), timeout=30)
        wait_for(lambda: not loops_on(d.mnt), 10, f"{loop} to detach")
        assert not is_mounted(d.mnt)
    assert not loops_on(d.mnt), f"{loop} is still bound after clean-up"


# --- fio ---------------------------------------------------------------------------------------


def fio_verified(work: Path, jobs: int, *args: str) -> str:
    """fio with `args`, run in the empty directory `work`: it must exit 0 with `jobs` jobs
    each without error, no verify failure, and no file left in `work`. Its output."""
    r = run("fio", *args, check=False, cwd=work, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"fio exited {r.returncode}:\n{out}"
    assert not re.search(r"verify.*(bad|fail|mismatch)|bad magic|crc32c.*wanted", out, re.I), out
    assert len(re.findall(r"\berr= *0\b", out)) == jobs, out
    assert list(work.iterdir()) == [], "fio left files behind"
    return out


@pytest.mark.slow
def test_fio_verify_through_loop_device(daemon: Daemon, tmp_path: Path) -> None:
    """fio writes 256 MiB at random in 4 KiB blocks (depth 16, libaio, O_DIRECT) and 256 MiB
    sequentially in 1 MiB blocks through the loop device, and reads every block back with a
    crc32c it checks; the device then holds exactly the pages written."""
    name = daemon.device("1G", "lz4")
    loop = daemon.losetup(name)
    work = tmp_path / "fio"
    work.mkdir()
    common = [f"--filename={loop}", "--ioengine=libaio", "--direct=1", "--verify=crc32c",
              "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--size=256M"]
    out = fio_verified(work, 2, *common,
                       "--name=rand4k", "--rw=randwrite", "--bs=4k", "--iodepth=16",
                       "--offset=0",
                       "--name=seq1m", "--stonewall", "--rw=write", "--bs=1M", "--iodepth=4",
                       "--offset=256M")
    # The verify phase read every block back: 64 Ki reads of 4 KiB, 256 of 1 MiB.
    issued = re.findall(r"issued rwts: total=(\d+),(\d+)", out)
    assert issued == [("65536", "65536"), ("256", "256")], out

    mm = daemon.mm_stat(name)
    assert mm[ORIG_DATA_SIZE] == 512 * MiB, f"mm_stat {mm}: not the 512 MiB fio wrote"
    failed_reads, failed_writes = [int(x) for x in daemon.read(name, "io_stat").split()[:2]]
    assert (failed_reads, failed_writes) == (0, 0)


@pytest.mark.slow
def test_fio_verify_on_a_dedup_device(daemon: Daemon, tmp_path: Path) -> None:
    """Dedup on, through the loop device: fio fills 64 MiB with one 12-byte pattern (every
    4 KiB block a twin of the others), overwrites it at random with unique blocks (crc32c
    verified, so shared objects lose references under reads), then writes the pattern again
    in 1 MiB blocks (three distinct pages: the pattern's three phases). Every phase
    reads every block back and checks it."""
    name = daemon.hot_add()
    daemon.write(name, "dedup", "1")
    daemon.write(name, "disksize", "256M")
    loop = daemon.losetup(name)
    work = tmp_path / "fio"
    work.mkdir()
    pattern = "--verify_pattern=0x7a72616d2d6465647570212a"        # "zram-dedup!*"
    common = [f"--filename={loop}", "--ioengine=libaio", "--direct=1", "--do_verify=1",
              "--verify_fatal=1", "--verify_state_save=0", "--size=64M", "--offset=0"]
    out = fio_verified(work, 3, *common,
                       "--name=twins", "--rw=randwrite", "--bs=4k", "--iodepth=16",
                       "--verify=pattern", pattern,
                       "--name=unique", "--stonewall", "--rw=randwrite", "--bs=4k",
                       "--iodepth=16", "--verify=crc32c", "--dedupe_percentage=50",
                       "--name=twins-again", "--stonewall", "--rw=write", "--bs=1M",
                       "--iodepth=4", "--verify=pattern", pattern)
    issued = re.findall(r"issued rwts: total=(\d+),(\d+)", out)
    assert issued == [("16384", "16384"), ("16384", "16384"), ("64", "64")], out

    mm = daemon.mm_stat(name)
    dup, saved, entries = map(int, daemon.read(name, "dedup_stat").split())
    assert mm[ORIG_DATA_SIZE] == 64 * MiB
    # Three distinct pages; writers storing one of them at the same moment may each miss
    # the other's object, and keep both (correct, only less dense).
    assert dup + entries == 16384 and 3 <= entries <= 8, (dup, saved, entries)
    assert mm[COMPR_DATA_SIZE] < 1000 and mm[MEM_USED_TOTAL] <= 64 * 4096
    failed_reads, failed_writes = [int(x) for x in daemon.read(name, "io_stat").split()[:2]]
    assert (failed_reads, failed_writes) == (0, 0)
