"""Live restart under load, as the issue's acceptance asks: the daemon killed (SIGKILL) or
upgraded (SIGHUP) while fio verifies its writes, while a process in a small memory cgroup
lives on swap over it, and while files are copied onto ext4 over it. The test is the service
manager (tests/manager.py): it keeps what the daemon stores and starts the next daemon with
it. Every restart's pause (the signal until the next daemon says "serving") is printed; no
test asserts a timing but a liveness bound.

Everything goes through a loop device over a device file, as a user puts swap, a file system
or fio's block-device workloads on zramfs (the kernel's zram is a block device; zramfs's
devices become one through loop). It also puts the block layer between the I/O and the
daemon: requests split to the loop device's limits, and a queue that waits in FUSE across
the restart.

The last test restarts a daemon in a memory cgroup that could not hold two copies of its pools,
with swap on its own device: adoption in place copies nothing, and locks the kept pages again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import (PAGE, Cleanup, Daemon, requires_fuse, run, start_daemon,
                      swap_used_kib, wait_for, zramfs_daemon)
from manager import Call, Manager, servings, stop
from memhog import page
from test_system import (CGROUP_MEMORY, HERE, HOG_LIMIT, MiB, end_process, memory_cgroup,
                         memory_cgroup_of, remove_cgroup, sha256, start_in_cgroup,
                         swapoff_if_on, umount_if_mounted)

pytestmark = [requires_fuse, pytest.mark.slow]

SERVE_BOUND = 60        # seconds from a signal to the next daemon serving: liveness, not speed


# --- the manager's side of a restart -------------------------------------------------------


def idle(mgr: Manager, seconds: float) -> None:
    """Sleeps `seconds`, taking the daemon's messages meanwhile (its sd_notify blocks on a
    full socket)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        mgr.pump(min(0.05, max(0.001, deadline - time.monotonic())))


def until(mgr: Manager, cond: Callable[[], bool], what: str, timeout: float) -> None:
    """Pumps the manager until `cond` holds; finer grained than Manager.wait, whose first
    receive waits 0.1 s, so a measured pause is not rounded up to it."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        mgr.pump(0.01)


def restart(d: Daemon, mgr: Manager, loop: str, how: signal.Signals, *args: str,
            bound: float = SERVE_BOUND) -> tuple[float, int]:
    """Ends the serving daemon with `how` and waits for the next one to serve. The pause in
    seconds, from the signal to the next daemon's "serving", and the requests that were in
    flight on `loop` (the loop device over the daemon's device) at the signal, both printed.
    SIGKILL is a crash: the test, as systemd's Restart=on-failure, starts the next daemon
    with what the dead one stored (`args` are its arguments). SIGHUP is an upgrade: a daemon
    without a supervisor executes itself anew, the same pid. A daemon that does not come to
    serve within `bound` seconds is killed, and the connection aborted if it cannot die (see
    abort)."""
    before = servings(d)
    busy = in_flight(loop)
    start = time.monotonic()
    d.proc.send_signal(how)
    if how == signal.SIGKILL:
        until(mgr, lambda: d.proc.poll() is not None, "the killed daemon to end", 30)
        start_next(d, mgr, *args)
    next_serves(d, mgr, before, bound, how.name)
    pause = time.monotonic() - start
    print(f"{how.name} with {busy} requests in flight on {loop}: the next daemon served "
          f"after {pause:.2f} s")
    return pause, busy


def start_next(d: Daemon, mgr: Manager, *args: str) -> None:
    """As systemd's Restart=on-failure after a crash: the next daemon (with `args`), given
    what the dead one stored."""
    mgr.pump(0.01)              # what it stored before it died is queued: take it all
    d.proc = start_daemon(d.mnt, d.log, *args, env=mgr.env(), listen_fds=list(mgr.store.items()))


def next_serves(d: Daemon, mgr: Manager, before: int, bound: float, after: str) -> None:
    """Until the next daemon serves (the log's "serving" lines past `before`). One that does
    not within `bound` seconds is killed, and the connection aborted if it cannot die (see
    abort), so that the clean-up is not left waiting on the tree."""
    try:
        until(mgr, lambda: servings(d) > before or not d.alive(), "the next daemon to serve",
              bound)
    except AssertionError:
        d.proc.kill()
        try:
            d.proc.wait(10)
        except subprocess.TimeoutExpired:       # a thread of it waits in the kernel
            abort(d, mgr)
            d.proc.wait(30)
        raise AssertionError(f"no daemon serves {bound} s after {after}:\n"
                             f"{tail(d.log)}") from None
    assert d.alive(), f"the daemon after {after} exited {d.proc.returncode}:\n{tail(d.log)}"


def in_flight(loop: str) -> int:
    """Requests the block layer has sent to the loop device and not seen completed."""
    return sum(map(int, Path(f"/sys/block/{Path(loop).name}/inflight").read_text().split()))


def when_busy(mgr: Manager, loop: str, timeout: float = 10) -> None:
    """Until the loop device has requests in flight (or `timeout` passes: the signal comes
    then anyway, and restart() reports none in flight), so that a restart lands in I/O."""
    deadline = time.monotonic() + timeout
    pumped = 0.0
    while in_flight(loop) == 0 and time.monotonic() < deadline:
        if time.monotonic() - pumped > 0.05:
            mgr.pump(0.001)
            pumped = time.monotonic()
        time.sleep(0.001)


@contextlib.contextmanager
def abort_if_down(d: Daemon, mgr: Manager) -> Iterator[None]:
    """If the test fails, what tells why is printed (the daemon's log, the kernel's I/O
    errors, the devices' io_stat), and if no daemon answers then, the connection is aborted
    (see abort)."""
    try:
        yield
    except BaseException:
        print(f"the daemon's log, to the end:\n{tail(d.log, 200)}")
        kernel = run("dmesg", check=False).stdout.splitlines()
        print("the kernel's last I/O errors:\n" + "\n".join(
            line for line in kernel[-200:] if "error" in line.lower()))
        call = Call(lambda: {name: d.read(name, "io_stat").split()
                             for name in os.listdir(d.mnt / "sys/block")})
        try:
            print(f"io_stat: {call.result(5)}")
        except AssertionError:
            print("io_stat: no answer: the FUSE connection is aborted")
            abort(d, mgr)
        except OSError as e:
            print(f"io_stat: {e}")          # the connection is gone already
        raise


def abort(d: Daemon, mgr: Manager) -> None:
    """Ends the tree's FUSE connection: the manager lets go of what it keeps, and umount -f
    aborts the connection (fs/fuse's umount_begin), which a daemon thread stuck in the
    kernel may still hold open. Every request waiting in the kernel fails, so the clean-up
    can take swap, mounts and loop devices down instead of waiting for a daemon that never
    answers."""
    mgr.close()
    run("umount", "-f", str(d.mnt), check=False, timeout=60)


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def summary(capsys: pytest.CaptureFixture, what: str, pauses: list[float]) -> None:
    """One line past pytest's capture, so a run without -s shows the pauses too."""
    with capsys.disabled():
        print(f"\n{what}: {len(pauses)} restarts, pause min/median/max "
              f"{min(pauses):.2f}/{statistics.median(pauses):.2f}/{max(pauses):.2f} s; all: "
              + " ".join(f"{p:.2f}" for p in pauses))


# --- fio --------------------------------------------------------------------------------------

FIO_KILLS = 10
FIO_JOB_MIB = 128          # each of the two jobs' region of the device


def start_fio(loop: str, out: Path, seed: int) -> subprocess.Popen:
    """Two jobs, each writing its own region of the loop device at random in blocks of 4 KiB
    to 256 KiB (direct I/O, libaio), then reading every block back and checking its crc32c;
    the first bad block ends fio with an error. `seed` makes each run's data its own, so a
    write lost in a restart cannot pass for the same block of the run before. The report
    goes to `out`, fio's messages to `out`.log."""
    cmd = ["fio", "--name=restart", f"--filename={loop}", "--rw=randwrite",
           "--bsrange=4k-256k", "--numjobs=2", f"--size={FIO_JOB_MIB}M",
           f"--offset_increment={FIO_JOB_MIB}M", "--ioengine=libaio", "--iodepth=8",
           "--direct=1", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
           "--verify_state_save=0", f"--randseed={seed}", "--output-format=json",
           f"--output={out}"]
    with open(out.with_suffix(".log"), "wb") as messages:
        return subprocess.Popen(cmd, stdout=messages, stderr=subprocess.STDOUT, cwd=out.parent)


def check_fio(proc: subprocess.Popen, out: Path) -> None:
    """fio exited 0, and each job wrote its whole region and read all of it back verified:
    no I/O error (fio stops at the first, continue_on_error being off) and no bad block."""
    proc.wait()
    messages = out.with_suffix(".log").read_text(errors="replace")
    text = out.read_text()
    assert proc.returncode == 0, f"fio exited {proc.returncode}:\n{messages}\n{text}"
    report = json.loads(text[text.index("{"):])      # after fio's warnings, if any
    assert len(report["jobs"]) == 2, report["jobs"]
    for job in report["jobs"]:
        w, r = job["write"], job["read"]
        assert job["error"] == 0, (job["error"], messages)
        assert w["io_bytes"] == r["io_bytes"] == FIO_JOB_MIB * MiB, (w["io_bytes"],
                                                                     r["io_bytes"], messages)
        assert w["short_ios"] == w["drop_ios"] == r["short_ios"] == r["drop_ios"] == 0, job


def test_fio_verifies_across_ten_kills(tmp_path: Path, cleanup: Cleanup,
                                       capsys: pytest.CaptureFixture) -> None:
    """fio's verified random writes on a loop device over a zramfs device while the daemon is
    killed 10 times at random moments, each time the next daemon started with what it kept:
    every fio run ends with no I/O error and every block read back as written. fio runs
    again as long as kills are left, so each kill lands in its I/O."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    print(f"random seed {seed}")
    mgr = Manager(cleanup)
    with zramfs_daemon(env=mgr.env(), tmp=tmp_path) as d, abort_if_down(d, mgr):
        name = d.device(f"{2 * FIO_JOB_MIB + 64}M", "lz4")
        loop = d.losetup(name)
        work = tmp_path / "fio"
        work.mkdir()
        runs = 0

        def next_fio() -> tuple[subprocess.Popen, Path]:
            nonlocal runs
            runs += 1
            out = work / f"run{runs}.json"
            proc = start_fio(loop, out, rng.getrandbits(32))
            d.cleanup.push(f"kill fio {proc.pid}", lambda: end_process(proc))
            return proc, out

        fio, out = next_fio()
        pauses: list[float] = []
        busy = 0                                # kills with requests in flight
        while len(pauses) < FIO_KILLS:
            idle(mgr, rng.uniform(0.2, 1.5))
            if fio.poll() is not None:          # done before the kills: check it, and again
                check_fio(fio, out)
                fio, out = next_fio()
                continue
            when_busy(mgr, loop)
            pause, requests = restart(d, mgr, loop, signal.SIGKILL, "--fuse-transport",
                                      "classic")
            pauses.append(pause)
            busy += requests > 0
        until(mgr, lambda: fio.poll() is not None, "the last fio run to end", 600)
        check_fio(fio, out)
        # Not a timing: a run where no kill found a request in flight tested little.
        assert busy > 0, "no kill found I/O in flight on the loop device"
        summary(capsys, f"fio ({runs} runs; {busy} kills with I/O in flight)", pauses)

        failed_reads, failed_writes = [int(x) for x in d.read(name, "io_stat").split()[:2]]
        assert (failed_reads, failed_writes) == (0, 0)
        run("losetup", "-d", loop, timeout=60)
        stop(d, mgr)


# --- swap in a memory cgroup ------------------------------------------------------------------

SWAP_HOG_MIB = 384         # what the process holds: most of it out on swap, under HOG_LIMIT
HOG_SECONDS = 300          # liveness bound for the process, not a timing
SWAP_PRIORITY = 32767      # the highest: the process's pages come to our swap

# memhog's pages, filled, checked once under the cgroup's limit (most of them come back from
# swap and others go out), then, after a line on stdin (the test turns the swap off
# meanwhile), checked again: then nothing is on swap and every page is in memory.
HOLDER = """
import mmap, sys
sys.path.insert(0, sys.argv[1])
from memhog import PAGE, page
pages = int(sys.argv[2]) * (1 << 20) // PAGE
mem = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
def check(when):
    for i in range(pages):
        if mem[i * PAGE:(i + 1) * PAGE] != page(i):
            sys.exit(f"page {i} does not read back as written {when}")
    print(f"verified {pages} pages {when}", flush=True)
for i in range(pages):
    mem[i * PAGE:(i + 1) * PAGE] = page(i)
print(f"wrote {pages} pages", flush=True)
check("under the limit")
sys.stdin.readline()
check("after swapoff")
"""


def vm_swap_kib(pid: int) -> int:
    """How much of the process is out on swap (any swap device), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSwap:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmSwap for {pid}")


def top_swaps_besides(dev: str) -> list[str]:
    """Other swap devices at the highest priority (another test's, on this shared machine):
    the kernel takes turns between them and ours, so some of our process's pages go there,
    and some of its process's come here."""
    return [f[0] for f in (line.split() for line in
                           Path("/proc/swaps").read_text().splitlines()[1:])
            if f[0] != dev and int(f[4]) == SWAP_PRIORITY]


def majflt(pid: int) -> int:
    """The process's major faults: pages it has read back in from swap, so far."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[9])


def bytes_read(d: Daemon, name: str) -> int:
    """What the device has read since this daemon started: `stat`'s read sectors (the
    block layer's counters start anew with each daemon)."""
    return int(d.read(name, "stat").split()[2]) * 512


def test_swap_in_a_memory_cgroup_lives_through_a_kill_and_an_upgrade(
        tmp_path: Path, cleanup: Cleanup, capsys: pytest.CaptureFixture) -> None:
    """A process in a 64 MiB memory cgroup holds 384 MiB, so most of it is on swap over a
    zramfs device; the daemon is killed while the process pushes its pages out and upgraded
    (SIGHUP) while it reads them back in. The process checks every page, and then swapoff,
    with the cgroup's limit raised, reads every page still on swap back through the last
    daemon, some of them written through the first; the process finds them all as written."""
    mgr = Manager(cleanup)
    args = ("--fuse-transport", "classic", "--mlock", "yes")    # as with a swap device
    with zramfs_daemon(*args[2:], env=mgr.env(), tmp=tmp_path) as d, abort_if_down(d, mgr):
        name = d.device("1G", "lz4")
        loop = d.losetup(name)
        run("mkswap", loop, timeout=60)
        wait_for(lambda: not top_swaps_besides(loop), 60,
                 f"another swap at priority {SWAP_PRIORITY} to go")
        run("swapon", "-p", str(SWAP_PRIORITY), loop, timeout=60)
        d.cleanup.push(f"swapoff {loop}", lambda: swapoff_if_on(loop))

        cgroup = memory_cgroup(d.cleanup, "zramfs-test-restart")
        out, err = tmp_path / "hog.out", tmp_path / "hog.err"
        hog = start_in_cgroup(d.cleanup, cgroup,
                              [sys.executable, "-c", HOLDER, str(HERE), str(SWAP_HOG_MIB)],
                              tmp_path, stdin=subprocess.PIPE)

        def outside() -> None:
            assert memory_cgroup_of(d.proc.pid) != "/" + cgroup.name, "the daemon is in it"

        def hog_says(line: str) -> bool:
            if hog.poll() is not None:
                raise AssertionError(f"the holder exited {hog.returncode}: {err.read_text()}"
                                     f" {out.read_text()}")
            return line in out.read_text()

        max_swap_kib = max_out_kib = 0          # on our swap; of the process, on any
        shared: set[str] = set()                # other swaps the kernel took turns with

        def swapped(kib: int) -> bool:
            """Whether the process has had `kib` out on swap; notes the maxima meanwhile."""
            nonlocal max_swap_kib, max_out_kib
            hog_says("")
            max_swap_kib = max(max_swap_kib, swap_used_kib(loop))
            max_out_kib = max(max_out_kib, vm_swap_kib(hog.pid))
            shared.update(top_swaps_besides(loop))
            return max_out_kib >= kib

        outside()
        pauses = []
        # A crash while pages go out: the process waits in reclaim for the swap writes.
        until(mgr, lambda: swapped(128 * 1024), "128 MiB on swap", HOG_SECONDS)
        when_busy(mgr, loop)
        pauses.append(restart(d, mgr, loop, signal.SIGKILL, *args)[0])
        outside()
        # An upgrade while they come back: the process waits in its page faults.
        until(mgr, lambda: swapped(0) and hog_says("wrote "), "the pages written",
              HOG_SECONDS)
        faults = majflt(hog.pid)
        until(mgr, lambda: swapped(0) and majflt(hog.pid) > faults + 8192,
              "32 MiB read back from swap", HOG_SECONDS)
        when_busy(mgr, loop)
        pauses.append(restart(d, mgr, loop, signal.SIGHUP)[0])
        outside()
        until(mgr, lambda: swapped(0) and hog_says("under the limit"), "the pages checked",
              HOG_SECONDS)

        out_kib, on_swap = vm_swap_kib(hog.pid), swap_used_kib(loop)
        shared.update(top_swaps_besides(loop))
        print(f"the process had at most {max_out_kib // 1024} MiB out on swap, "
              f"{out_kib // 1024} MiB at swapoff; our swap held at most "
              f"{max_swap_kib // 1024} MiB; swaps at the same priority meanwhile: {shared}")
        assert max_out_kib * 1024 > SWAP_HOG_MIB * MiB - 2 * HOG_LIMIT, (
            f"at most {max_out_kib} KiB out on swap: the limit did not push the process out")
        oom = (cgroup / "memory.oom_control").read_text()
        assert "oom_kill 0" in oom.splitlines(), f"the cgroup's OOM killer fired: {oom!r}"

        # swapoff reads every page on swap back, through the upgraded daemon, into a cgroup
        # that now has room for them.
        (cgroup / "memory.limit_in_bytes").write_text(str(2 * SWAP_HOG_MIB * MiB))
        before = bytes_read(d, name)
        run("swapoff", loop, timeout=HOG_SECONDS)
        read_back = bytes_read(d, name) - before
        print(f"swapoff read {read_back // MiB} MiB through the daemon")
        # At most HOG_LIMIT of the process was in memory: the rest comes from our device,
        # unless the kernel took turns with another test's swap (then some came from there).
        least = 1 if shared else SWAP_HOG_MIB * MiB - 2 * HOG_LIMIT
        assert read_back >= least, (read_back, shared)
        hog.stdin.write(b"\n")
        hog.stdin.close()
        assert hog.wait(HOG_SECONDS) == 0, f"{err.read_text()} {out.read_text()}"
        assert f"verified {SWAP_HOG_MIB * MiB // 4096} pages after swapoff" in out.read_text()
        summary(capsys, f"swap (the process at most {max_out_kib // 1024} MiB out, our swap "
                        f"at most {max_swap_kib // 1024} MiB, {on_swap // 1024} MiB at swapoff,"
                        f" which read {read_back // MiB} MiB back); SIGKILL, SIGHUP", pauses)

        run("losetup", "-d", loop, timeout=60)
        remove_cgroup(cgroup)
        stop(d, mgr)


# --- ext4 -------------------------------------------------------------------------------------

EXT4_RESTARTS = (signal.SIGKILL, signal.SIGHUP) * 3
TREE_DIRS, TREE_FILES, FILE_MAX = 16, 32, 256 * 1024      # ~64 MiB a copy


def generate_tree(root: Path, rng: random.Random) -> dict[Path, str]:
    """Files of 0 to 256 KiB, half random bytes and half lines drawn from a few hundred (lz4
    keeps a quarter or so), in directories; their sha256 by relative path."""
    lines = [os.urandom(24).hex().encode() + b"\n" * 16 for _ in range(256)]
    sums: dict[Path, str] = {}
    for i in range(TREE_DIRS):
        (root / f"d{i:02}").mkdir(parents=True)
        for j in range(TREE_FILES):
            rel = Path(f"d{i:02}/f{j:02}")
            size = rng.randrange(FILE_MAX)
            data = (os.urandom(size) if j % 2 else
                    b"".join(rng.choices(lines, k=size // 64 + 1))[:size])
            (root / rel).write_bytes(data)
            sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def start_copy(src: Path, dst: Path, log: Path) -> subprocess.Popen:
    """cp -a of `src`'s files into `dst`, one at a time, each followed by a sync of the file
    system (as a mail server or rsync --fsync writes): the pages go to the device while the
    copy runs, not all at umount. Its messages go to `log`."""
    dst.mkdir()
    with open(log, "wb") as messages:
        return subprocess.Popen(
            ["sh", "-c", 'cd "$0" && for d in *; do mkdir "$1/$d" && for f in "$d"/*; do '
             'cp -a "$f" "$1/$f" && sync -f "$1" || exit 1; done || exit 1; done',
             str(src), str(dst)], stdout=messages, stderr=subprocess.STDOUT)


def finished_copy(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait() == 0, f"the copy failed ({proc.returncode}): {log.read_text()}"


def test_ext4_copy_lives_through_kills_and_upgrades(tmp_path: Path, cleanup: Cleanup,
                                                    capsys: pytest.CaptureFixture) -> None:
    """Files copied onto ext4 on a loop device over a zramfs device while the daemon is
    killed and upgraded in turn, three times each, at random moments: the copy ends well,
    the file system is clean (fsck -n -f after umount), and after a new mount every file
    has the checksum of its source. The tree is copied again, into a directory of its own,
    as long as restarts are left, so each lands in the copy's writes."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    print(f"random seed {seed}")
    src = tmp_path / "src"
    sums = generate_tree(src, rng)
    mgr = Manager(cleanup)
    args = ("--fuse-transport", "classic")
    with zramfs_daemon(env=mgr.env(), tmp=tmp_path) as d, abort_if_down(d, mgr):
        name = d.device("2G", "lz4")
        loop = d.losetup(name)
        run("mkfs.ext4", "-q", loop, timeout=120)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        run("mount", loop, str(mnt), timeout=60)
        d.cleanup.push(f"umount {mnt}", lambda: umount_if_mounted(mnt))

        rounds = 0

        def next_copy() -> tuple[subprocess.Popen, Path]:
            nonlocal rounds
            rounds += 1
            log = tmp_path / f"copy{rounds}.log"
            proc = start_copy(src, mnt / f"copy{rounds}", log)
            d.cleanup.push(f"kill the copy {proc.pid}", lambda: end_process(proc))
            return proc, log

        copy, log = next_copy()
        pauses: list[float] = []
        busy = 0                                # restarts with requests in flight
        for how in EXT4_RESTARTS:
            idle(mgr, rng.uniform(0.2, 2.0))
            while copy.poll() is not None:          # done: check it, and copy again
                finished_copy(copy, log)
                copy, log = next_copy()
                idle(mgr, rng.uniform(0.1, 1.0))
            when_busy(mgr, loop)
            pause, requests = restart(d, mgr, loop, how, *args)
            pauses.append(pause)
            busy += requests > 0
        until(mgr, lambda: copy.poll() is not None, "the copy to end", 300)
        finished_copy(copy, log)
        assert busy > 0, "no restart found I/O in flight on the loop device"

        run("umount", str(mnt), timeout=60)
        run("blockdev", "--flushbufs", loop, timeout=60)   # fsck reads the device
        fsck = run("fsck.ext4", "-n", "-f", loop, check=False, timeout=120)
        assert fsck.returncode == 0, f"fsck.ext4 -n -f: {fsck.returncode}\n{fsck.stdout}"
        run("mount", loop, str(mnt), timeout=60)
        for n in range(1, rounds + 1):
            copy_root = mnt / f"copy{n}"
            found = {p.relative_to(copy_root) for p in copy_root.rglob("*") if p.is_file()}
            assert found == set(sums), f"copy {n}: {sorted(found ^ set(sums))[:10]}"
            for rel, digest in sums.items():
                assert sha256(copy_root / rel) == digest, f"copy {n}: {rel} differs"
        summary(capsys, f"ext4 ({rounds} copies of {len(sums)} files; {busy} restarts with "
                        "I/O in flight); "
                        + ", ".join(h.name for h in EXT4_RESTARTS), pauses)

        run("umount", str(mnt), timeout=60)
        run("losetup", "-d", loop, timeout=60)
        stop(d, mgr)


# --- a tight cgroup --------------------------------------------------------------------------

DAEMON_LIMIT = 256 * MiB   # the daemon's memory cgroup: room for its pools once, not twice
FILL_MIB = 480             # memhog's pages written to the device: a pool of about 150 MiB


def pool_locked(pid: int) -> int:
    """Bytes of the process's pool memfds that are mapped in it and locked (smaps "Locked":
    resident pages of mlocked mappings; VmLck counts whole mappings, resident or not)."""
    total, in_pool = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if not line[0].isupper():                     # a mapping's first line: its range
            in_pool = "memfd:zramfs-pool:" in line
        elif in_pool and line.startswith("Locked:"):
            total += int(line.split()[1]) * 1024
    return total


def test_a_graceful_restart_in_a_tight_cgroup_with_swap_on_its_own_device(
        tmp_path: Path, cleanup: Cleanup) -> None:
    """The daemon (mlockall) in a 256 MiB memory cgroup (its pools' budget 192 MiB), about
    150 MiB in the pool of one device, swap on a loop device over another: a graceful restart
    comes to serve with its pages intact and locked again. When a restarted daemon copied the
    kept pools, adopting needed two copies in the cgroup, and reclaim wrote kept pages (locked
    by no process after the exec) to that swap, which waited for the very daemon that was
    reading them: a deadlock, bounded here by `restart`'s bound and undone by `abort`."""
    mgr = Manager(cleanup)
    args = ("--fuse-transport", "classic", "--mlock", "yes")
    with zramfs_daemon(*args[2:], env=mgr.env(), tmp=tmp_path) as d, abort_if_down(d, mgr):
        cgroup = memory_cgroup(d.cleanup, "zramfs-test-restart-daemon", DAEMON_LIMIT)
        # The daemon and the keeper its successor starts in the cgroup (zramfs.service.reclaim).
        d.cleanup.push("the daemon and its keeper back to the root cgroup",
                       lambda: [(CGROUP_MEMORY / "cgroup.procs").write_text(pid) for pid in
                                (cgroup / "cgroup.procs").read_text().split()])
        (cgroup / "cgroup.procs").write_text(str(d.proc.pid))   # before the pool exists
        name = d.device("1G", "lz4")
        fd = os.open(d.dev(name), os.O_RDWR)
        d.cleanup.push(f"close {name}", lambda: os.close(fd))
        pages = FILL_MIB * MiB // PAGE
        for first in range(0, pages, 256):
            os.pwrite(fd, b"".join(page(i) for i in range(first, first + 256)), first * PAGE)
        loop = d.losetup(d.device("256M", "lz4"))
        run("mkswap", loop, timeout=60)
        run("swapon", "-p", str(SWAP_PRIORITY), loop, timeout=60)
        d.cleanup.push(f"swapoff {loop}", lambda: swapoff_if_on(loop))
        print(f"pool {d.mm_stat(name)[2] // MiB} MiB, the daemon's cgroup "
              f"{int((cgroup / 'memory.usage_in_bytes').read_text()) // MiB} MiB")

        used = d.mm_stat(name)[2]
        restart(d, mgr, loop, signal.SIGHUP, bound=20)
        locked = pool_locked(d.proc.pid)
        print(f"after the restart: {locked // MiB} MiB locked, the daemon's cgroup "
              f"{int((cgroup / 'memory.usage_in_bytes').read_text()) // MiB} MiB")
        assert locked >= used, f"{locked // MiB} MiB locked of a pool of {used // MiB} MiB"
        for i in range(0, pages, pages // 64):
            assert os.pread(fd, PAGE, i * PAGE) == page(i), f"page {i}"

