"""The service manager's part in live restart, played by the tests as systemd plays it
(sd_notify FDSTORE, LISTEN_FDS), and what tests of restarts share: a call that may wait in
the kernel, a request the daemon cannot answer yet, the serving daemons counted in the log."""
from __future__ import annotations

import array
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT, Cleanup, Daemon, is_mounted, stop_daemon, wait_for

FUSE_HAS_RESEND = 1 << 39


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


def stop(d: Daemon, mgr: Manager) -> None:
    """A normal stop of the last daemon: SIGTERM, the manager pumped meanwhile; exit 0, the
    tree unmounted, and nothing left in the store (FDSTOREREMOVE of everything kept)."""
    d.proc.send_signal(signal.SIGTERM)
    mgr.wait(lambda: d.proc.poll() is not None, "the daemon to stop", 60)
    assert d.proc.returncode == 0, d.log.read_text()
    assert not is_mounted(d.mnt)
    mgr.wait(lambda: not mgr.store, "FDSTOREREMOVE of everything kept")


def waiting_in(pid: int, wchan: str) -> bool:
    """Whether a thread of `pid` sleeps in kernel function `wchan`."""
    try:
        return any(Path(f"/proc/{pid}/task/{t}/wchan").read_text() == wchan
                   for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return False


def unanswering_file(cleanup: Cleanup, tmp_path: Path) -> Path:
    """A regular file whose every use (stat, open, read) waits: the test FUSE server's `stats`
    (tests/fuse_server.py), the server stopped (SIGSTOP) until clean-up, which lets it go on
    and stops it."""
    mnt = tmp_path / "unanswering"
    mnt.mkdir()
    with open(tmp_path / "unanswering.log", "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests/fuse_server.py"), str(mnt),
                                 "classic"], stdout=subprocess.PIPE, stderr=err, text=True)

    def end() -> None:
        proc.send_signal(signal.SIGCONT)
        stop_daemon(proc, mnt)

    cleanup.push("the unanswering FUSE server stopped", end)
    with proc.stdout:
        assert proc.stdout.readline().strip() == "READY", (tmp_path / "unanswering.log").read_text()
    (mnt / "stats").read_bytes()          # INIT answered: later requests wait on the server
    proc.send_signal(signal.SIGSTOP)
    return mnt / "stats"


def stuck_request(d: Daemon, tmp_path: Path) -> tuple[str, Call]:
    """A request the daemon has read and cannot answer yet: a zstd dictionary of a new device
    on a file system that does not answer (unanswering_file), which its worker waits on. The
    device's name and the waiting call."""
    name = d.hot_add()
    d.write(name, "comp_algorithm", "zstd")
    path = unanswering_file(d.cleanup, tmp_path)
    call = Call(lambda: d.write(name, "algorithm_params", f"dict={path}"))
    wait_for(lambda: waiting_in(d.proc.pid, "request_wait_answer"), 30,
             "the daemon to wait on the unanswering file system")
    return name, call


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
