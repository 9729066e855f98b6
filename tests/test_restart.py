"""Live restart: the tree's FUSE connection outlives the daemon (docs/design.md, "Live
restart"). The tests play the service manager as systemd does (a NOTIFY_SOCKET receiving
FDSTORE descriptors; the next daemon started with LISTEN_FDS), and run `zramfs daemon`'s
own supervisor as `make run` does.

What survives so far: the mount, its inode numbers, device files opened before the restart,
and the requests in flight (FUSE_NOTIFY_RESEND). The devices come back as the config makes
them, empty, until their memory is adopted too.
"""
from __future__ import annotations

import array
import errno
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import (PAGE, ZRAMFS, Cleanup, Daemon, is_mounted, requires_fuse, run,
                      start_daemon, wait_for, zramfs_daemon)

FUSE_HAS_RESEND = 1 << 39

pytestmark = requires_fuse


class Manager:
    """The service manager's side of sd_notify(3), as systemd plays it for a unit: a
    NOTIFY_SOCKET (abstract) whose FDSTORE=1 descriptors it keeps by FDNAME, one entry a
    name, and FDSTOREREMOVE=1."""

    def __init__(self, cleanup: Cleanup) -> None:
        name = f"zramfs-test-manager-{os.getpid()}-{os.urandom(4).hex()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind("\0" + name)
        self.address = "@" + name
        self.store: dict[str, int] = {}
        self.messages: list[str] = []
        cleanup.push("the manager's descriptors closed", self.close)

    def env(self) -> dict[str, str]:
        return dict(os.environ, NOTIFY_SOCKET=self.address)

    def pump(self, timeout: float = 0.1) -> None:
        """Takes the messages that come within `timeout`."""
        self.sock.settimeout(timeout)
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4),
                                                    socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                return
            fds = array.array("i")
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            text = data.decode()
            self.messages.append(text)
            fields = dict(line.partition("=")[::2] for line in text.splitlines())
            if fields.get("FDSTOREREMOVE") == "1" and fields["FDNAME"] in self.store:
                os.close(self.store.pop(fields["FDNAME"]))
            if fields.get("FDSTORE") == "1":
                assert len(fds) == 1, text
                if fields["FDNAME"] in self.store:
                    os.close(self.store.pop(fields["FDNAME"]))
                self.store[fields["FDNAME"]] = fds.pop()
            for fd in fds:
                os.close(fd)
            self.sock.settimeout(0.01)

    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.messages}")
            self.pump()

    def said(self, line: str) -> bool:
        return any(line in m.splitlines() for m in self.messages)

    def close(self) -> None:
        for fd in self.store.values():
            os.close(fd)
        self.store.clear()
        self.sock.close()


class Call:
    """fn() in a thread of its own: a request that may wait in the kernel."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self._out: list = []
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self._out.append((True, fn()))
        except BaseException as e:
            self._out.append((False, e))

    @property
    def done(self) -> bool:
        return bool(self._out)

    def result(self, timeout: float) -> object:
        self._thread.join(timeout)
        if not self._out:
            raise AssertionError("the call is still waiting")
        ok, value = self._out[0]
        if not ok:
            raise value
        return value


def waiting_in(pid: int, wchan: str) -> bool:
    """Whether a thread of `pid` sleeps in kernel function `wchan`."""
    try:
        return any(Path(f"/proc/{pid}/task/{t}/wchan").read_text() == wchan
                   for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return False


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def servings(d: Daemon) -> int:
    """How many daemons have come to serve the tree (the daemon's own log line)."""
    return d.log.read_text().count("INFO: serving ")


def test_a_daemon_killed_hands_the_tree_to_the_next_through_the_fd_store(
        tmp_path: Path, cleanup: Cleanup) -> None:
    mgr = Manager(cleanup)
    with zramfs_daemon("--default-device", env=mgr.env(), tmp=tmp_path) as d:
        mgr.wait(lambda: {"fuse", "fuse-init"} <= mgr.store.keys() and mgr.said("READY=1"),
                 "the connection stored and READY")
        init = json.loads(os.pread(mgr.store["fuse-init"], 4096, 0))
        assert init["major"] == 7 and init["max_write"] >= 4096, init
        if not init["offered"] & FUSE_HAS_RESEND:
            pytest.skip("the kernel has no FUSE_NOTIFY_RESEND (Linux 6.9+)")
        attr_ino = os.stat(d.sys("zram0", "disksize")).st_ino
        dev = os.open(d.dev("zram0"), os.O_RDWR)
        d.cleanup.push("close zram0", lambda: os.close(dev))
        os.pwrite(dev, b"\xa5" * PAGE, 0)

        # A request the daemon has read and cannot answer yet: a dictionary on a FIFO, whose
        # open waits for a writer.
        name = d.hot_add()
        d.write(name, "comp_algorithm", "zstd")
        fifo = tmp_path / "dict.fifo"
        os.mkfifo(fifo)
        in_flight = Call(lambda: d.write(name, "algorithm_params", f"dict={fifo}"))
        wait_for(lambda: waiting_in(d.proc.pid, "wait_for_partner"), 30,
                 "the daemon to wait on the FIFO")

        d.proc.kill()
        d.proc.wait(10)
        assert is_mounted(d.mnt)
        # Requests made while no daemon runs wait in the kernel.
        read_late = Call(lambda: os.pread(dev, PAGE, 0))
        attr_late = Call(lambda: d.read("zram0", "disksize"))
        time.sleep(0.5)
        assert not (in_flight.done or read_late.done or attr_late.done)

        d.proc = start_daemon(d.mnt, d.log, "--default-device", env=mgr.env(),
                              listen_fds=list(mgr.store.items()))
        wait_for(lambda: servings(d) == 2 or not d.alive(), 60, "the next daemon to serve")
        assert d.alive(), d.log.read_text()
        assert "adopted the FUSE connection" in d.log.read_text()
        assert read_late.result(10) == bytes(PAGE)      # empty until memory is adopted
        assert int(attr_late.result(10)) > 0
        # The write the killed daemon had read was resent, with bit 63 in its unique, and
        # answered by the new daemon, which never opened that handle: EBADF, not a hang.
        with pytest.raises(OSError) as e:
            in_flight.result(10)
        assert e.value.errno == errno.EBADF
        assert os.listdir(d.mnt / "dev") == ["zram0"]
        assert os.stat(d.sys("zram0", "disksize")).st_ino == attr_ino
        os.pwrite(dev, b"\x5a" * PAGE, PAGE)
        assert os.pread(dev, PAGE, PAGE) == b"\x5a" * PAGE

        # A normal stop: unmounted, and nothing left in the store for another daemon.
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(60) == 0, d.log.read_text()
        assert not is_mounted(d.mnt)
        mgr.wait(lambda: not mgr.store, "FDSTOREREMOVE of fuse and fuse-init")


def test_the_supervisor_restarts_the_daemon_and_keeps_the_tree(tmp_path: Path) -> None:
    """`zramfs daemon` as `make run` starts it: SIGKILL of the serving child, SIGHUP to the
    supervisor, `zramfs restart`, each time the tree serves on; SIGTERM stops everything."""
    seen: set[int] = set()
    with zramfs_daemon("--default-device", tmp=tmp_path, supervised=True) as d:
        sup = d.proc

        def serving_child(count: int) -> int:
            wait_for(lambda: servings(d) >= count and len(children(sup.pid)) == 1, 60,
                     f"daemon {count} to serve")
            pid, = children(sup.pid)
            seen.add(pid)
            return pid

        first = serving_child(1)
        dev = os.open(d.dev("zram0"), os.O_RDWR)
        d.cleanup.push("close zram0", lambda: os.close(dev))

        os.kill(first, signal.SIGKILL)
        second = serving_child(2)
        assert second != first
        assert "daemon killed by SIGKILL; restarting it with fuse, fuse-init (restart 1)" \
            in d.log.read_text()
        assert os.pread(dev, PAGE, 0) == bytes(PAGE)
        assert os.listdir(d.mnt / "dev") == ["zram0"]

        sup.send_signal(signal.SIGHUP)
        third = serving_child(3)
        assert third != second and not alive(second)
        log = d.log.read_text()
        assert "SIGHUP: graceful restart" in log and "daemon handed over" in log
        assert int(d.read("zram0", "disksize")) > 0

        out = run(*ZRAMFS, "restart", "--mountpoint", str(d.mnt))
        assert f"pid {sup.pid}" in out.stdout
        fourth = serving_child(4)
        assert fourth != third
        assert os.pread(dev, PAGE, 0) == bytes(PAGE)

        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0, d.log.read_text()
        assert not is_mounted(d.mnt)
        out = run(*ZRAMFS, "restart", "--mountpoint", str(d.mnt), check=False)
        assert out.returncode == 1 and "no running daemon" in out.stderr
    assert not any(alive(pid) for pid in seen)


def test_sighup_without_a_supervisor_executes_the_daemon_anew(tmp_path: Path) -> None:
    """As under systemd (ExecReload=kill -HUP $MAINPID): the same pid serves on."""
    with zramfs_daemon("--default-device", tmp=tmp_path) as d:
        dev = os.open(d.dev("zram0"), os.O_RDWR)
        d.cleanup.push("close zram0", lambda: os.close(dev))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: servings(d) == 2 or not d.alive(), 60, "the daemon to serve again")
        assert d.alive()
        log = d.log.read_text()
        assert "handed over" in log and "adopted the FUSE connection" in log
        assert os.pread(dev, PAGE, 0) == bytes(PAGE)
