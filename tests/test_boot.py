"""A real boot: systemd as PID 1 in a container (systemd-nspawn) over an overlay of this
machine's root, zramfs installed in it by `make install`, an /etc/zramfs.conf with a swap
device and an ext4 device, the unit enabled. Every check asks the container's own service
manager; the host is left as it was, pass or fail.

How the container is made, and what this machine (Debian 12, systemd 252, Linux 6.18, cgroup
v1 with systemd's named hierarchy beside the unified one, systemd not PID 1) showed by trying:

- nspawn refuses `--directory=/` ("Spawning container on root directory is not supported"),
  so the root is an overlayfs with `/` as its lower layer and its upper and work directories
  on a tmpfs of the test's own: what the container writes (the install, its journal) never
  reaches the host's disk and goes with one umount. Only the root file system is in the lower
  layer, not those mounted under it, so the checkout is bound in (read-only) for `make
  install`, run in a one-shot nspawn (no `--boot`) before the boot.
- There is no host service manager or machined to register with: `--register=no --keep-unit`.
  nspawn then makes `payload` and `supervisor` cgroups beside its own, in the named systemd
  hierarchy and in the unified one; even a one-shot nspawn (no `--boot`) leaves them there. So
  every nspawn starts in cgroups of the test's own, where the container's processes are found
  (and, on failure, killed) and which are removed after.
- nspawn keeps `locks` and `propagate` under /run/systemd/nspawn: a tmpfs mounted there for the
  run (the directory made if missing, and removed after) keeps the host's /run as it was.
- The container's /dev is nspawn's own, without /dev/fuse or loop devices: /dev/fuse,
  /dev/loop-control and every /dev/loopN there is are bound in (`--bind`). There are no device
  cgroup rules without a host service manager, so nothing else is needed. (A /dev/loopN node
  made in the container would create that loop device in the kernel when opened, so none is
  made: a `losetup --find` that has to create a new device fails in the container.)
- nspawn withholds CAP_IPC_LOCK; without it the daemon's mlockall (on by default when a device
  is swap) fails ("mlockall: Operation not permitted") and the unit never starts, so
  `--capability=CAP_IPC_LOCK`, as a real boot has it. This host's own bounding set lacks
  CAP_SYS_RESOURCE, so the container cannot have it: oom_score_adj -1000, PR_SET_IO_FLUSHER
  and LimitMEMLOCK=infinity fail, and the daemon says so in its log and serves.
- swapon and swapoff are outside nspawn's default system call filter:
  `--system-call-filter=@swap`.
- Swap is the kernel's, not the container's: the container's swap is in the host's /proc/swaps
  and takes the host's pages too; other tests' swap areas (of higher priority) take the pages
  meant for it, so the test waits until its own is the only one. systemd makes no swap units
  in a container, so at poweroff it is the daemon's own swapoff on SIGTERM that turns the swap
  off. The ext4 mount is a mount unit systemd makes from the mount table, with no order
  against zramfs.service: at poweroff systemd unmounts it while it stops the daemon, and the
  daemon finds it gone ("umount ... not mounted", logged as an ERROR).
- A swap area left on when the container dies (the daemon SIGKILLed while its swapoff had
  failed) stays in the host's kernel on a loop device whose FUSE connection is dead: every
  page sent there fails to write ("Write-error on swap-device"), and processes that swap then
  meet their memory cgroup's OOM killer. /proc/swaps names it "/" (the container's path to it
  is gone), so the clean-up asks each loop device left on the tree to swapoff.
- `nsenter --target <the container's PID 1> --all` runs systemctl, journalctl, dd and fio in
  the container: in its namespaces, but in the host's cgroups. No process started so may be
  alive at poweroff: systemd-shutdown SIGSTOPs every process before it signals them, nsenter
  (outside the container) sees its child stop and stops itself, nobody continues it, and the
  child, killed, stays a zombie the shutdown waits for (90 s and more). The process that lives
  in the swap therefore runs on the host, in a v1 memory cgroup too small for it: swap is the
  kernel's, and so it outlives the container and is checked after the poweroff's swapoff.
- nspawn gives the container no environment: pip there needs this machine's PIP_* settings
  (`--setenv`), or it waits ~50 s on an index it cannot reach.
- journald keeps its journal on disk when /var/log/journal exists: made in the upper layer, the
  journal outlives the container and is read after the poweroff (`journalctl --directory`).
- The container boots a target of the test's own, sysinit.target and nothing after it, rather
  than the host's default target: zramfs.service is wanted by swap.target and local-fs.target,
  both in sysinit, and the host's other services (a database, timers, gettys) stay off.

A run takes 12-15 s on this 2-core machine (the boot itself 0.4 s, `make install` 4 s), plus
~40 s when the wheel (`make dist`, built on the host and installed inside) is older than the
sources.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Cleanup, backing_file, run, sigterm_as_interrupt

MiB = 1 << 20
PAGE = 4096
CHECKOUT = Path(__file__).resolve().parent.parent
HERE = CHECKOUT / "tests"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV = {"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
NSPAWN_RUN = Path("/run/systemd/nspawn")
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")

TARGET = "zramfs-boot-test.target"
SWAP_PRIORITY = 42
EXT4 = "/mnt/zramfs-boot"               # where the ext4 device is mounted, in the container
CONFIG = f"""\
# The swap and the file system of tests/test_boot.py.
[zram0]
zram-size = 256
compression-algorithm = lz4
swap-priority = {SWAP_PRIORITY}

[zram1]
zram-size = 256
fs-type = ext4
mount-point = {EXT4}
options = discard
"""
HELD_MIB = 192                          # what the process living in swap holds
HELD_LIMIT = 64 * MiB                   # its memory cgroup's limit: most of it is in swap
KNOWN_MIB = 32                          # the file on the ext4 device whose sha256 is known
FIO = ["fio", "--name=reload", f"--directory={EXT4}", "--size=64M", "--bs=4k",
       "--rw=randwrite", "--ioengine=libaio", "--direct=1", "--iodepth=16",
       "--verify=crc32c", "--do_verify=1", "--verify_backlog=512", "--verify_fatal=1",
       "--verify_state_save=0", "--loops=5", "--unlink=1"]


def cannot_boot() -> str | None:
    """Why this machine cannot boot the container, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux"),
                          ("fio", "fio"), ("mkfs.ext4", "e2fsprogs"), ("make", "make")):
        if shutil.which(tool) is None:
            return f"no {tool} (Debian package {package})"
    if not Path("/lib/systemd/systemd").exists():
        return "no systemd to boot (/lib/systemd/systemd)"
    for node in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(node):
            return f"no {node}"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "no overlayfs in this kernel"
    if not (CGROUP_MEMORY / "memory.limit_in_bytes").exists():
        return "no cgroup v1 memory controller (for the process made to live in swap)"
    if not nspawn_hierarchies():
        return "neither systemd's named cgroup hierarchy nor cgroup2 is mounted"
    return None


# --- the host's side: cgroups, mounts, loop devices, FUSE connections -------------------------


def nspawn_hierarchies() -> list[Path]:
    """This process's cgroup in each hierarchy nspawn makes its cgroups in: systemd's named v1
    hierarchy and the unified one, where they are mounted."""
    own = dict(line.split(":", 2)[1:] for line in
               Path("/proc/self/cgroup").read_text().splitlines())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fstype, _, options = right.split()[:3]
        if fstype == "cgroup2":
            key = ""
        elif fstype == "cgroup" and "name=systemd" in options.split(","):
            key = "name=systemd"
        else:
            continue
        if key in own:
            found.append(Path(left.split()[4]) / own[key].lstrip("/"))
    return found


def in_cgroups(cgroups: list[Path], argv: list[str]) -> list[str]:
    """`argv`, started in `cgroups` (a shell puts itself there, then becomes it)."""
    return ["sh", "-c", 'while [ "$1" != -- ]; do echo $$ > "$1/cgroup.procs"; shift; done; '
            'shift; exec "$@"', "sh", *map(str, cgroups), "--", *argv]


def cgroup_pids(top: Path) -> set[int]:
    return {int(pid) for procs in top.rglob("cgroup.procs") for pid in procs.read_text().split()}


def remove_cgroup(top: Path) -> None:
    """`top` and the cgroups under it, deepest first (they must be empty)."""
    if top.exists():
        for d in sorted((p for p in top.rglob("*") if p.is_dir()),
                        key=lambda p: len(p.parts), reverse=True):
            d.rmdir()
        top.rmdir()


def mount_targets() -> set[str]:
    return {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}


def umount_if_mounted(path: Path) -> None:
    if str(path) in mount_targets():
        run("umount", str(path), timeout=60)


# A loop device's backing file in the container's tree, as the container sees it; and as the
# host sees it once the container's mount namespace is gone: relative to the tree.
TREE_FILE = re.compile(r"(/run/zramfs)?/dev/zram\d+")
DETACHED_TREE_FILE = re.compile(r"/dev/zram\d+")


def loops_backed_by(dev: tuple[int, int]) -> list[str]:
    """Loop devices whose backing file is on the file system of device `dev` (major, minor)."""
    out = run("losetup", "--list", "--json", "--output", "NAME,BACK-MAJ:MIN", timeout=30).stdout
    loops = json.loads(out)["loopdevices"] if out.strip() else []
    return sorted(lo["name"] for lo in loops
                  if (lo["back-maj:min"] or "").strip() == f"{dev[0]}:{dev[1]}")


def fusectl(conn: int, script: str) -> bool:
    """`script` run by sh with $C the fusectl directory of FUSE connection `conn`, fusectl
    mounted in a mount namespace of its own (the host has it nowhere). True if it succeeded."""
    script = f"mount -t fusectl fusectl /sys/fs/fuse/connections && {script}"
    return run("unshare", "--mount", "--propagation=private", "env",
               f"C=/sys/fs/fuse/connections/{conn}", "sh", "-c", script,
               check=False, timeout=30).returncode == 0


def mounted_devices() -> set[str]:
    """MAJ:MIN of every mount in every mount namespace of the host's processes."""
    seen, devs = set(), set()
    for ns in Path("/proc").glob("[0-9]*/ns/mnt"):
        try:
            key = os.readlink(ns)
            if key in seen:
                continue
            seen.add(key)
            text = (ns.parent.parent / "mountinfo").read_text()
        except OSError:
            continue
        devs.update(line.split()[2] for line in text.splitlines())
    return devs


pytestmark = [pytest.mark.slow, pytest.mark.skipif(cannot_boot() is not None,
                                                   reason=str(cannot_boot()))]


# --- the container -----------------------------------------------------------------------------


class Container:
    """systemd booted by systemd-nspawn over an overlay of /, and taken apart again."""

    def __init__(self, cleanup: Cleanup) -> None:
        self.cleanup = cleanup
        self.base = Path(tempfile.mkdtemp(prefix="zramfs-boot-"))
        cleanup.push(f"rm -r {self.base}", lambda: shutil.rmtree(self.base))
        self.layer, self.root = self.base / "layer", self.base / "root"
        self.console = self.base / "console.log"
        self.cgroups: list[Path] = []
        self.nspawn: subprocess.Popen | None = None
        self.leader = 0
        self.tree_dev: tuple[int, int] | None = None     # the FUSE tree's device, once known
        self.loops: list[str] = []                        # the loop devices bound to it

    # set-up

    def make_root(self) -> None:
        """The overlay of / (upper and work directories on a tmpfs), the tmpfs on
        /run/systemd/nspawn, and the cgroups nspawn will run in."""
        self.layer.mkdir()
        self.root.mkdir()
        run("mount", "-t", "tmpfs", "-o", "mode=0755", "zramfs-boot", str(self.layer))
        self.cleanup.push(f"umount {self.layer}", lambda: umount_if_mounted(self.layer))
        (self.layer / "upper").mkdir()
        (self.layer / "work").mkdir()
        run("mount", "-t", "overlay", "zramfs-boot", "-o",
            f"lowerdir=/,upperdir={self.layer}/upper,workdir={self.layer}/work", str(self.root))
        self.cleanup.push(f"umount {self.root}", lambda: umount_if_mounted(self.root))

        made = next((p for p in reversed([NSPAWN_RUN, *NSPAWN_RUN.parents]) if not p.exists()),
                    None)
        NSPAWN_RUN.mkdir(parents=True, exist_ok=True)
        if made is not None:
            self.cleanup.push(f"rmdir {made}", lambda: [d.rmdir() for d in
                                                         [NSPAWN_RUN, *NSPAWN_RUN.parents]
                                                         if d.is_relative_to(made)])
        run("mount", "-t", "tmpfs", "-o", "mode=0755", "zramfs-boot-nspawn", str(NSPAWN_RUN))
        self.cleanup.push(f"umount {NSPAWN_RUN}", lambda: umount_if_mounted(NSPAWN_RUN))

        for hierarchy in nspawn_hierarchies():
            cgroup = hierarchy / f"zramfs-boot-{os.getpid()}"
            cgroup.mkdir()
            self.cleanup.push(f"rmdir {cgroup}", lambda cgroup=cgroup: remove_cgroup(cgroup))
            self.cgroups.append(cgroup)

    def configure(self) -> None:
        """What the container boots with, written through the overlay into its upper layer:
        the config, a persistent journal, and the boot target."""
        etc = self.root / "etc"
        (etc / "zramfs.conf").write_text(CONFIG)
        (self.root / "var/log/journal").mkdir(parents=True, exist_ok=True)
        (etc / "systemd/system" / TARGET).write_text(
            "[Unit]\nDescription=The boot of tests/test_boot.py: sysinit and nothing more\n"
            "Requires=sysinit.target\nAfter=sysinit.target\nAllowIsolate=yes\n")

    def install(self) -> str:
        """`make install` and `systemctl enable` in the container, before it boots (a one-shot
        nspawn), with the wheel built on the host. Their output."""
        pip = [f"--setenv={k}={v}" for k, v in os.environ.items() if k.startswith("PIP_")]
        script = f"make -C {CHECKOUT} -o dist install && systemctl enable zramfs.service"
        r = run(*in_cgroups(self.cgroups, self._nspawn(f"--bind-ro={CHECKOUT}", *pip,
                                                        "--", "sh", "-c", script)),
                check=False, timeout=600, env=ENV)
        assert r.returncode == 0, f"make install in the container failed:\n{r.stdout}{r.stderr}"
        return r.stdout + r.stderr

    def _nspawn(self, *args: str) -> list[str]:
        return ["systemd-nspawn", f"--directory={self.root}", "--quiet", "--register=no",
                "--keep-unit", *args]

    # the boot

    def boot(self, timeout: float = 120) -> float:
        """Boots systemd; returns once it says the boot is done. Seconds it took."""
        loops = sorted(str(p) for p in Path("/dev").glob("loop[0-9]*"))
        argv = self._nspawn("--boot", "--console=read-only", "--bind=/dev/fuse",
                            "--bind=/dev/loop-control", *(f"--bind={lo}" for lo in loops),
                            "--system-call-filter=@swap", "--capability=CAP_IPC_LOCK",
                            "--", f"systemd.unit={TARGET}")
        started = time.monotonic()
        with open(self.console, "wb") as console:
            self.nspawn = subprocess.Popen(in_cgroups(self.cgroups, argv), stdin=subprocess.DEVNULL,
                                           stdout=console, stderr=subprocess.STDOUT, env=ENV)
        self.cleanup.push("the container stopped and its traces on the host undone", self.end)
        until(lambda: self._find_leader() or self._exited(), 30, "the container's PID 1")
        deadline = started + timeout
        while True:
            try:
                r = self.run("systemctl", "is-system-running", "--wait", check=False,
                             timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"no boot in {timeout} s:\n{self.diagnosis()}") from None
            if r.stdout.strip() in ("running", "degraded"):
                break
            self._exited()
            assert time.monotonic() < deadline, f"no boot in {timeout} s: {r.stdout}{r.stderr}"
            time.sleep(0.2)
        took = time.monotonic() - started
        failed = self.run("systemctl", "list-units", "--failed", "--plain", "--no-legend").stdout
        assert r.stdout.strip() == "running", f"the boot is {r.stdout.strip()}: {failed}"
        return took

    def _exited(self) -> bool:
        """False while nspawn runs; a failure with its console once it has exited."""
        code = self.nspawn.poll()
        assert code is None, f"nspawn exited {code}:\n{self.console.read_text(errors='replace')}"
        return False

    def _find_leader(self) -> bool:
        """The container's PID 1, among the processes of nspawn's cgroups."""
        for pid in sorted(self.pids()):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M)
            if nspid and len(nspid[1].split()) > 1 and nspid[1].split()[-1] == "1":
                self.leader = pid
                return True
        return False

    def pids(self) -> set[int]:
        return set().union(*(cgroup_pids(c) for c in self.cgroups))

    # inside

    def find_tree(self) -> list[str]:
        """The tree's FUSE device and the loop devices bound to its device files."""
        st = int(self.run("stat", "--format=%d", "/run/zramfs/dev/zram0").stdout)
        self.tree_dev = (os.major(st), os.minor(st))
        self.loops = loops_backed_by(self.tree_dev)
        return self.loops

    def nsenter(self, *argv: str) -> list[str]:
        return ["nsenter", f"--target={self.leader}", "--all", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(self.nsenter(*argv), capture_output=True, timeout=timeout, env=ENV,
                           text=kw.pop("text", True), **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} in the container exited {r.returncode}: "
                                 f"{r.stdout!r} {r.stderr!r}")
        return r

    def show(self, unit: str = "zramfs.service") -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", "ActiveState", "-p", "SubState",
                       "-p", "MainPID", "-p", "NRestarts", "-p", "NFileDescriptorStore",
                       "-p", "Result").stdout
        return dict(line.split("=", 1) for line in out.splitlines())

    def swaps(self) -> dict[str, tuple[int, int]]:
        """/proc/swaps as the container reads it: device -> (used KiB, priority)."""
        lines = self.run("cat", "/proc/swaps").stdout.splitlines()[1:]
        return {f[0]: (int(f[3]), int(f[4])) for f in (line.split() for line in lines)}

    def sha256(self, path: str) -> str:
        """The file's sha256, read with O_DIRECT: from the device, not the page cache."""
        r = self.run("sh", "-c", f"dd if={path} iflag=direct bs=1M status=none | sha256sum")
        return r.stdout.split()[0]

    def journal(self, *args: str) -> str:
        """The container's journal, with monotonic times: asked of it while it runs, read from
        its files in the upper layer after."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            return self.run("journalctl", "--no-pager", "-o", "short-monotonic", *args).stdout
        machine = (self.root / "etc/machine-id").read_text().strip()
        return run("journalctl", "--no-pager", "-o", "short-monotonic",
                   f"--directory={self.root}/var/log/journal/{machine}", *args,
                   timeout=60, env=ENV).stdout

    def diagnosis(self) -> str:
        """What the container is doing: its processes and where they wait, its journal's last
        lines, its console's."""
        parts = []
        if self.nspawn is not None and self.nspawn.poll() is None:
            for argv in (["ps", "-eo", "pid,stat,wchan:32,args"],
                         ["journalctl", "--no-pager", "-o", "short-monotonic", "-n", "80"]):
                r = self.run(*argv, check=False, timeout=30)
                parts.append(f"$ {' '.join(argv)}\n{r.stdout}{r.stderr}")
        parts.append("console:\n" + "\n".join(self.console.read_text(errors="replace")
                                               .splitlines()[-40:]))
        return "\n".join(parts)

    # the end

    def left_loops(self) -> list[str]:
        """Loop devices still bound to the container's tree: of those it used, the ones whose
        backing file is still a device of a tree (as the container sees it, or, its mount
        namespace gone, relative to the tree); if it never got as far, any of the latter."""
        def back(loop: str) -> str:
            try:
                return backing_file(loop) or ""
            except OSError:
                return ""
        if self.loops:
            return [lo for lo in self.loops if TREE_FILE.fullmatch(back(lo))]
        return sorted(lo for lo in (f"/dev/{p.name}" for p in Path("/sys/block").glob("loop*"))
                      if DETACHED_TREE_FILE.fullmatch(back(lo)))

    def end(self) -> None:
        """Pass or fail: the container is stopped (SIGTERM to nspawn powers it off; then
        SIGKILL to every process left in its cgroups, and an abort of its tree's FUSE
        connection if they are stuck on it). What it left behind is undone (swapoff,
        losetup -d) and is a failure, with the daemon's journal."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.nspawn.wait(60)
        for _ in range(2):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if self.nspawn is not None and self.nspawn.poll() is None:
                self.nspawn.kill()
            try:
                until(lambda: not self.pids(), 15, "the container's processes to end")
                break
            except AssertionError:
                # Held in the kernel by a tree whose daemon is gone (I/O waits for good).
                if self.tree_dev is not None:
                    fusectl(self.tree_dev[1], 'echo 1 > "$C/abort"')
        if self.nspawn is not None:
            self.nspawn.wait(30)
        problems = []
        left = self.left_loops()
        if left:
            # /proc/swaps names a swap area by the path it was turned on with, which the host
            # cannot resolve once the container is gone ("/"): each is asked to swapoff.
            swaps = [lo for lo in left
                     if run("swapoff", lo, check=False, timeout=120).returncode == 0]
            for loop in left:
                run("losetup", "--detach", loop, check=False, timeout=60)
            problems.append(f"loop devices left bound to the container's tree: {left} (swap "
                            f"on {swaps or 'none'}; still bound after swapoff and losetup -d: "
                            f"{self.left_loops() or 'none'}); the daemon's journal:\n"
                            f"{self.daemon_log()}")
        if self.pids():
            problems.append(f"processes of the container still there: {sorted(self.pids())}")
        assert not problems, "\n".join(problems)

    def daemon_log(self, lines: int = 60) -> str:
        try:
            return self.journal("-u", "zramfs.service", "-n", str(lines))
        except Exception as e:  # a diagnosis: never in the way of the clean-up
            return f"(no journal: {e!r})"


# --- a process living in swap ---------------------------------------------------------------


class Held:
    """tests/swapheld.py in a memory cgroup too small for it, so that it lives in the swap, the
    container's (the only one, or the one of the highest priority). It runs on the host: swap
    is the kernel's, and so it outlives the container and its pages are checked after the
    poweroff's swapoff brought them back."""

    def __init__(self, box: Container, cleanup: Cleanup) -> None:
        self.cgroup = CGROUP_MEMORY / f"zramfs-boot-{os.getpid()}"
        self.cgroup.mkdir()
        cleanup.push(f"rmdir {self.cgroup}", self._remove_cgroup)
        (self.cgroup / "memory.limit_in_bytes").write_text(str(HELD_LIMIT))
        (self.cgroup / "memory.swappiness").write_text("100")
        self.err = box.base / "swapheld.err"
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                in_cgroups([self.cgroup], [sys.executable, str(HERE / "swapheld.py"),
                                           str(HELD_MIB)]),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
        cleanup.push("swapheld.py ended", self.end)

    def line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        said = self.proc.stdout.readline().strip() if ready else ""
        assert said, (f"swapheld.py said nothing in {timeout} s (exit {self.proc.poll()}, "
                      f"stderr {self.err.read_text()!r}; its cgroup's OOM killer fired "
                      f"{self.oom_kills()} times)")
        return said

    def oom_kills(self) -> int:
        oom = (self.cgroup / "memory.oom_control").read_text()
        return int(re.search(r"^oom_kill (\d+)$", oom, re.M)[1])

    def ask(self) -> None:
        self.proc.stdin.write("check\n")
        self.proc.stdin.flush()

    def swapped_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmSwap:\s+(\d+) kB", status, re.M)[1])

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.proc.stdin.close()
        self.proc.stdout.close()

    def _remove_cgroup(self) -> None:
        until(lambda: not (self.cgroup / "cgroup.procs").read_text().strip(), 30,
                 f"{self.cgroup} to empty")
        self.cgroup.rmdir()


# --- the wheel ------------------------------------------------------------------------------


def wheel() -> Path:
    """The wheel `make install` installs in the container: dist/'s if it is newer than every
    source it is built from, else built anew (`make dist`) on the host."""
    sources = [CHECKOUT / "pyproject.toml", CHECKOUT / "setup.py",
               *(p for p in (CHECKOUT / "zramfs").iterdir()
                 if p.suffix in (".py", ".pyx", ".pxi", ".pxd", ".h"))]
    newest = max(p.stat().st_mtime for p in sources)
    built = sorted((CHECKOUT / "dist").glob("zramfs-*.whl"))
    if len(built) != 1 or built[0].stat().st_mtime < newest:
        r = run("make", "-C", str(CHECKOUT), "dist", check=False, timeout=1200)
        assert r.returncode == 0, f"make dist failed:\n{r.stdout}{r.stderr}"
        built = sorted((CHECKOUT / "dist").glob("zramfs-*.whl"))
    assert len(built) == 1, built
    return built[0]


# --- the test ---------------------------------------------------------------------------------


def stamp(journal: str, pattern: str, last: bool = False) -> float | None:
    """The monotonic time of the first (or last) journal line `pattern` is found in."""
    times = [float(line[1:line.index("]")]) for line in journal.splitlines()
             if line.startswith("[") and re.search(pattern, line)]
    return (times[-1] if last else times[0]) if times else None


def until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls `cond` every 0.1 s until it holds; the seconds that took."""
    started = time.monotonic()
    while not cond():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def booted(cleanup: Cleanup, figures: list[str]) -> Container:
    """The container, zramfs installed by `make install`, the config written, booted."""
    wheel()
    box = Container(cleanup)
    box.make_root()
    box.configure()
    t = time.monotonic()
    box.install()
    figures.append(f"make install in the container: {time.monotonic() - t:.1f} s")
    figures.append(f"boot: {box.boot():.1f} s")
    return box


def check_started(box: Container, figures: list[str]) -> str:
    """1. The unit is active after the boot, its fd store in use, with the swap (and its
    priority) and the ext4 mount of the config. The swap's loop device."""
    unit = box.show()
    assert (unit["ActiveState"], unit["SubState"]) == ("active", "running"), unit
    assert box.run("systemctl", "is-enabled", "zramfs.service").stdout.strip() == "enabled"
    assert int(unit["NFileDescriptorStore"]) > 0, unit
    loops = box.find_tree()
    assert len(loops) == 2, f"loop devices on the tree: {loops}"
    swaps = box.swaps()
    swap = next((d for d in loops if d in swaps), None)
    assert swap is not None, f"no swap on {loops}: {swaps}"
    assert swaps[swap][1] == SWAP_PRIORITY, swaps
    ext4 = next(d for d in loops if d != swap)
    fs = box.run("findmnt", "--noheadings", "--output", "SOURCE,FSTYPE", EXT4).stdout.split()
    assert fs == [ext4, "ext4"], fs
    figures.append(f"after boot: {unit['ActiveState']}/{unit['SubState']}, pid "
                   f"{unit['MainPID']}, {unit['NFileDescriptorStore']} fds stored; swap on "
                   f"{swap} priority {swaps[swap][1]}, ext4 on {ext4} at {EXT4}")
    return swap


def living_in_swap(box: Container, cleanup: Cleanup, swap: str, figures: list[str]) -> Held:
    """swapheld.py, with most of its pages in the container's swap."""
    # Swap areas are the kernel's: while another is on (other tests make some, of higher
    # priority), the pages could go there rather than to the container's.
    until(lambda: list(box.swaps()) == [swap], 120,
          f"swap areas other than {swap} to go (other tests make some)")
    held = Held(box, cleanup)
    assert held.line(300).startswith("filled "), held.err.read_text()
    in_swap, used = held.swapped_kib(), box.swaps()[swap][0]
    assert in_swap > HELD_MIB * 1024 // 2, f"only {in_swap} KiB of swapheld.py in swap"
    assert used >= in_swap * 9 // 10, (f"swapheld.py has {in_swap} KiB in swap, {swap} holds "
                                       f"{used} KiB: other swap areas took it? {box.swaps()}")
    figures.append(f"swapheld.py: {in_swap // 1024} MiB of {HELD_MIB} in swap on {swap} "
                   f"({used // 1024} MiB used there)")
    return held


def check_sigkill(box: Container, held: Held, known: str, swap: str,
                  figures: list[str]) -> str:
    """2. `systemctl kill -s SIGKILL` of the daemon alone, while swapheld.py reads its pages
    back: systemd restarts it (a new pid, NRestarts one more), the new daemon adopts the tree
    and the devices from the fd store, and nothing is lost. The new pid."""
    before = box.show()
    held.ask()                       # its swap-ins run into the kill and the restart
    box.run("systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", "zramfs.service")

    def serving_anew() -> bool:
        unit = box.show()
        return (unit["MainPID"] not in ("0", before["MainPID"])
                and (unit["ActiveState"], unit["SubState"]) == ("active", "running"))

    restarted = until(serving_anew, 60, "systemd to restart the daemon")
    answer = held.line(300)
    after = box.show()
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, (before, after)
    assert answer == f"ok {HELD_MIB * MiB // PAGE}", answer
    assert box.sha256(f"{EXT4}/known") == known
    assert box.swaps()[swap][1] == SWAP_PRIORITY
    log = box.journal("-u", "zramfs.service", f"_PID={after['MainPID']}")
    assert "adopted the FUSE connection" in log, log
    adopted = re.findall(r"zram[01]: adopted \d+ pages[^\n]*", log)
    assert len(adopted) == 2, log
    # The killed daemon's memory keeper (zramfs.service.reclaim) outlived it (KillMode=process), held
    # its locked pages through the gap, and the new daemon ended it once it had adopted them.
    unit_log = box.journal("-u", "zramfs.service")
    left = re.findall(r"Found left-over process (\d+) \(", unit_log)
    assert left, f"no keeper outlived the kill:\n{unit_log[-3000:]}"
    until(lambda: box.run("test", "-e", f"/proc/{left[-1]}", check=False).returncode != 0, 30,
          "the new daemon to end the old keeper")
    figures.append(f"SIGKILL of pid {before['MainPID']}: restarted as pid {after['MainPID']} "
                   f"in {restarted:.2f} s, NRestarts {before['NRestarts']} -> "
                   f"{after['NRestarts']}; {'; '.join(adopted)}; swapheld.py {answer}, "
                   f"the known file's sha256 matches")
    return after["MainPID"]


def check_reload(box: Container, held: Held, known: str, pid: str, cleanup: Cleanup,
                 figures: list[str]) -> None:
    """3. `systemctl reload` while fio writes and verifies on the ext4 mount: 0 verify errors,
    the unit active throughout, the same pid (the daemon executes itself anew)."""
    def stored() -> int:       # zram1's orig_data_size
        return int(box.run("cat", "/run/zramfs/sys/block/zram1/mm_stat").stdout.split()[0])

    def daemon_log() -> str:
        return box.journal("-u", "zramfs.service", f"_PID={pid}")

    before = box.show()
    first, served = stored(), daemon_log().count("INFO: serving /run/zramfs")
    started = time.monotonic()
    fio = subprocess.Popen(box.nsenter(*FIO), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=ENV)
    cleanup.push("fio ended", lambda: (fio.poll() is None and fio.kill(), fio.communicate()))
    until(lambda: stored() > first + 8 * MiB or fio.poll() is not None, 60, "fio to write")
    box.run("systemctl", "reload", "zramfs.service", timeout=120)
    until(lambda: daemon_log().count("INFO: serving /run/zramfs") > served, 60,
          "the reloaded daemon to serve")
    assert fio.poll() is None, "fio ended before the reload did: make it longer"
    out, _ = fio.communicate(timeout=600)
    took = time.monotonic() - started
    assert fio.returncode == 0, f"fio exited {fio.returncode}:\n{out}"
    assert not re.search(r"verify.*(bad|fail|mismatch)|bad magic|crc32c.*wanted", out, re.I), out
    assert re.search(r"\berr= *0\b", out), out
    unit = box.show()
    assert (unit["ActiveState"], unit["SubState"]) == ("active", "running"), unit
    assert unit["MainPID"] == pid, "the reload is an exec in place"
    assert unit["NRestarts"] == before["NRestarts"], (before, unit)
    log = daemon_log()
    assert "SIGHUP: graceful restart" in log and "handed over" in log, log
    pause = (stamp(log, "INFO: serving /run/zramfs", last=True)
             - stamp(log, "SIGHUP: graceful restart", last=True))
    held.ask()
    answer = held.line(300)
    assert answer == f"ok {HELD_MIB * MiB // PAGE}", answer
    assert box.sha256(f"{EXT4}/known") == known
    ios = re.search(r"issued rwts: total=(\d+),(\d+)", out)
    figures.append(f"reload under fio ({took:.1f} s): SIGHUP to serving again {pause:.2f} s "
                   f"(journal), same pid {pid}; fio {ios[2] if ios else '?'} writes, "
                   f"{ios[1] if ios else '?'} verify reads, err=0; swapheld.py {answer}")


def check_poweroff(box: Container, held: Held, swap: str, figures: list[str]) -> None:
    """4. `systemctl poweroff` with the swap in use: the container exits; its journal has the
    swap off and the file system unmounted before the daemon stopped; what lived in the swap
    came back whole; nothing of the container is left on the host (process, loop device, FUSE
    connection)."""
    # Room for swapheld.py's pages, which the swapoff brings back (else the swapoff fails with
    # ENOMEM and the daemon waits for a holder that never lets go).
    (held.cgroup / "memory.limit_in_bytes").write_text(str(4 * HELD_MIB * MiB))
    in_swap = box.swaps()[swap][0]
    box.run("systemctl", "poweroff", check=False)
    t = time.monotonic()
    try:
        code = box.nspawn.wait(120)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no poweroff in 120 s:\n{box.diagnosis()}") from None
    assert code == 0, box.console.read_text()
    figures.append(f"poweroff with {in_swap // 1024} MiB in swap: the container exited in "
                   f"{time.monotonic() - t:.1f} s")
    journal = box.journal()
    shutting = stamp(journal, r"zramfs: INFO: SIGTERM: shutting down")
    swapoff = stamp(journal, rf"zramfs: INFO: swapoff {swap}$")
    unmounted = stamp(journal, rf"systemd\[1\]: Unmounted \S+ - {EXT4}\.$|"
                               rf"zramfs: INFO: umount {EXT4}$")
    stopped = stamp(journal, r"zramfs: INFO: stopped$", last=True)
    gone = stamp(journal, r"zramfs\.service: Deactivated successfully", last=True)
    assert None not in (shutting, swapoff, unmounted, stopped, gone), journal
    assert swapoff < stopped < gone and unmounted < stopped, journal
    figures.append(f"journal (monotonic s): daemon SIGTERM {shutting:.3f}, ext4 unmounted "
                   f"{unmounted:.3f}, swapoff {swapoff:.3f}, daemon stopped {stopped:.3f}, "
                   f"unit deactivated {gone:.3f}")

    # No loop device is left on the tree (a swap area would hold one), and what lived in the
    # swap came back whole.
    assert box.left_loops() == [], "loop devices left on the container's tree"
    held.ask()
    answer = held.line(300)
    assert answer == f"ok {HELD_MIB * MiB // PAGE}", answer
    assert held.swapped_kib() == 0
    figures.append(f"after the poweroff: swapheld.py {answer}, 0 kB in swap")
    assert not box.pids(), box.pids()
    assert not Path(f"/proc/{box.leader}").exists()
    conn = box.tree_dev[1]
    if fusectl(conn, 'test -e "$C"'):      # ...or its number taken by another test's mount
        assert f"0:{conn}" in mounted_devices(), f"FUSE connection {conn} left behind"


def test_boot_kill_reload_poweroff() -> None:
    """The unit starts at boot with its swap (and priority) and its ext4 mount; a SIGKILL of the
    daemon alone is restarted by systemd from its fd store, with nothing lost under a process
    living in swap and a file of known checksum; a reload under fio --verify loses nothing; a
    poweroff takes the swap off and the file system down before the daemon stops, and leaves
    nothing of the container on the host."""
    started = time.monotonic()
    figures: list[str] = []
    cleanup = Cleanup()
    with sigterm_as_interrupt():
        try:
            box = booted(cleanup, figures)
            swap = check_started(box, figures)
            data = os.urandom(KNOWN_MIB * MiB)
            box.run("dd", f"of={EXT4}/known", "bs=1M", "oflag=direct", "status=none",
                    input=data, text=False)
            known = hashlib.sha256(data).hexdigest()
            assert box.sha256(f"{EXT4}/known") == known
            held = living_in_swap(box, cleanup, swap, figures)
            pid = check_sigkill(box, held, known, swap, figures)
            check_reload(box, held, known, pid, cleanup, figures)
            check_poweroff(box, held, swap, figures)
        finally:
            cleanup.run_all()
    # The test's own traces are gone too: overlay, tmpfs, temporary directory, cgroups.
    mounts = mount_targets()
    assert str(box.root) not in mounts and str(NSPAWN_RUN) not in mounts
    assert not box.base.exists()
    assert not any(c.exists() for c in box.cgroups)
    figures.append(f"whole test: {time.monotonic() - started:.0f} s")
    print("\n".join(figures))
