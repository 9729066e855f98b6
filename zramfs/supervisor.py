"""`zramfs daemon` without systemd: a small parent that plays systemd's part for the daemon,
so that a crash or an upgrade of the daemon loses neither the mount nor the requests waiting
on it (docs/design.md, "Live restart").

    python -m zramfs.supervisor --pid-file FILE -- COMMAND...

It makes a notify socket (NOTIFY_SOCKET, abstract, for the child only: the sender's uid must
be ours), starts COMMAND (the serving daemon) and then, as systemd does for a unit:
- keeps the descriptors the child stores (FDSTORE=1 + FDNAME=, one name's entry replaced by
  a new one; FDSTOREREMOVE=1) and passes them to the next child as LISTEN_FDS (at 3, 4...),
  LISTEN_FDNAMES and LISTEN_PID, the child's own pid: `/bin/sh -c 'LISTEN_PID=$$ exec "$@"'`
  sets it, as the shell's pid is the one the daemon keeps through exec;
- writes READY and STATUS lines to its log, and its own pid to the pid file once a child is
  READY=1: a child that never serves (a second daemon refused on a mountpoint in use) leaves
  the file, which names the first daemon's, untouched;
- restarts the child at once when it dies of a signal or exits non-zero while a FUSE
  connection is stored (a crash: the next daemon adopts the connection and has the kernel
  resend what was lost), and when it exits with fdstore.HANDOVER_EXIT (a graceful restart);
  a child that fails before it has stored a connection (a bad config) ends the supervisor
  with its status; exit 0 (a normal stop) ends it with 0;
- forwards SIGTERM and SIGINT (stop) and SIGHUP (graceful restart) to the child, once the
  child has said READY=1 (before, its handlers are not set up yet).
The child runs in a process group of its own, so a terminal's Ctrl-C reaches it once,
through here.

It imports nothing of the data path and holds no state but descriptors, so it never needs
upgrading: an upgrade is a graceful restart of the child (`zramfs restart`, or SIGHUP here).
Its pid is in the pid file (zramfs.service.pidfile), which `zramfs restart` reads.
"""
from __future__ import annotations

import argparse
import array
import fcntl
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from zramfs.service import fdstore
from zramfs.service.pidfile import remove_pid_file, write_pid_file

log = logging.getLogger("zramfs.supervisor")

SHIM = 'LISTEN_PID=$$ exec "$@"'         # sh -c SHIM NAME COMMAND...: LISTEN_PID is the daemon's
CRASH_WINDOW = 10.0                      # seconds; more than CRASH_BURST restarts in it ...
CRASH_BURST = 5
CRASH_PAUSE = 1.0                        # ... and each next one waits this long
MAX_DATAGRAM = 4096
MAX_FDS = 64                             # a message's descriptors, at most


class Supervisor:
    def __init__(self, command: list[str], mountpoint: Path | None) -> None:
        self.command = command
        self.mountpoint = mountpoint
        self.store: dict[str, list[int]] = {}
        self.child: int | None = None
        self.ready = False
        self.stopping = False           # the child said STOPPING=1
        self.pending: int | None = None  # a signal to forward once the child is READY
        self.restarts = 0
        self.recent: list[float] = []   # times of the latest restarts
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC |
                                  socket.SOCK_NONBLOCK)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(f"\0zramfs-supervisor-{os.getpid()}-{os.urandom(4).hex()}")
        self.address = "@" + self.sock.getsockname()[1:].decode()

    # --- the notify socket ----------------------------------------------------------------

    def receive(self) -> None:
        """Every datagram waiting, as systemd's manager takes them."""
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(
                    MAX_DATAGRAM, socket.CMSG_SPACE(MAX_FDS * 4) +
                    socket.CMSG_SPACE(struct.calcsize("3i")), socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            fds: list[int] = []
            uid = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                    fds.extend(a)
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    _, uid, _ = struct.unpack("3i", payload[:12])
            if uid != os.getuid():
                log.warning("notify message from uid %s ignored", uid)
                fds = self._close(fds)
            else:
                fds = self._message(data.decode(errors="replace"), fds)
            self._close(fds)

    def _message(self, text: str, fds: list[int]) -> list[int]:
        """Acts on one message; the descriptors it did not keep."""
        fields = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTOREREMOVE") == "1":
            self._close(self.store.pop(name, []))
        if fields.get("FDSTORE") == "1" and fds and ":" not in name:
            self._close(self.store.pop(name, []))
            self.store[name] = fds
            fds = []
        if fields.get("READY") == "1":
            self.ready = True
            if self.mountpoint is not None:
                write_pid_file(self.mountpoint, os.getpid())
        if fields.get("STOPPING") == "1":
            self.stopping = True
        if "STATUS" in fields and fields.get("READY") == "1":
            log.info("daemon %s ready: %s", self.child, fields["STATUS"])
        elif "STATUS" in fields:
            log.info("daemon %s: %s", self.child, fields["STATUS"])
        if self.ready and self.pending is not None and not self.stopping:
            self._forward(self.pending)
        return fds

    @staticmethod
    def _close(fds: list[int]) -> list[int]:
        for fd in fds:
            os.close(fd)
        return []

    # --- the child ------------------------------------------------------------------------

    def start(self) -> None:
        """The daemon, with the stored descriptors at 3, 4, ... (no preexec_fn: posix_spawn's
        dup2 actions, from copies above the targets, so that none is overwritten)."""
        names, fds = fdstore.flatten(self.store)
        env = dict(os.environ, NOTIFY_SOCKET=self.address,
                   **{fdstore.SUPERVISOR_ENV: str(os.getpid())})
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(var, None)
        if fds:
            env.update(fdstore.listen_env(names, None))
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, fdstore.LISTEN_FDS_START + len(fds))
                for fd in fds]
        try:
            actions = [(os.POSIX_SPAWN_DUP2, fd, fdstore.LISTEN_FDS_START + i)
                       for i, fd in enumerate(high)]
            self.child = os.posix_spawn("/bin/sh", ["sh", "-c", SHIM, "zramfs", *self.command],
                                        env, file_actions=actions, setpgroup=0)
        finally:
            self._close(high)
        self.ready = self.stopping = False

    def _forward(self, signum: int) -> None:
        self.pending = None
        if self.child is not None:
            os.kill(self.child, signum)

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP and self.stopping:
            return                      # stopping anyway: nothing to restart
        if self.ready and not self.stopping:
            self._forward(signum)
        elif signum != signal.SIGHUP or self.pending is None:
            self.pending = signum       # a stop wins over a restart

    def on_exit(self, status: int) -> int | None:
        """The child ended; the supervisor's exit status, or None when it was started anew."""
        code = os.waitstatus_to_exitcode(status)
        self.child = None
        if code == 0:
            return 0
        if code != fdstore.HANDOVER_EXIT and "fuse" not in self.store:
            return code if code > 0 else 128 - code   # failed before it served: no restart
        if code != fdstore.HANDOVER_EXIT:
            now = time.monotonic()
            self.recent = [t for t in self.recent if now - t < CRASH_WINDOW] + [now]
            self.restarts += 1
            if len(self.recent) > CRASH_BURST:
                time.sleep(CRASH_PAUSE)
            why = (f"killed by {signal.Signals(-code).name}" if code < 0
                   else f"exited with status {code}")
            log.warning("daemon %s; restarting it with %s (restart %d)", why,
                        ", ".join(self.store) or "nothing stored", self.restarts)
        else:
            log.info("daemon handed over; starting the next one with %s",
                     ", ".join(self.store))
        self.start()
        return None

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)     # the wakeup fd says which
        try:
            self.start()
            poll = select.poll()
            poll.register(self.sock, select.POLLIN)
            poll.register(rfd, select.POLLIN)
            while True:
                poll.poll()
                try:
                    signums = os.read(rfd, 256)
                except BlockingIOError:
                    signums = b""
                # Messages first: a child's last FDSTOREREMOVE comes before its exit.
                self.receive()
                for signum in signums:
                    if signum != signal.SIGCHLD:
                        self.on_signal(signum)
                while self.child is not None:
                    pid, status = os.waitpid(self.child, os.WNOHANG)
                    if pid == 0:
                        break
                    code = self.on_exit(status)
                    if code is not None:
                        return code
        finally:
            if self.mountpoint is not None:
                remove_pid_file(self.mountpoint, os.getpid())
            for fds in self.store.values():
                self._close(fds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zramfs.supervisor")
    ap.add_argument("--mountpoint", type=Path, help="the daemon's, for the pid file")
    ap.add_argument("--log-level", default="info")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="zramfs: supervisor: %(message)s")
    return Supervisor(command, args.mountpoint).run()


if __name__ == "__main__":
    sys.exit(main())
