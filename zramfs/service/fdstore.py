"""The service manager's protocol, in one place: sd_notify(3) messages over $NOTIFY_SOCKET
(READY=1, STATUS=, STOPPING=1, RELOADING=1), its file descriptor store (FDSTORE=1 and
FDSTOREREMOVE=1 with FDNAME=), and sd_listen_fds(3)'s LISTEN_FDS / LISTEN_FDNAMES /
LISTEN_PID, by which a manager hands the stored descriptors to the next daemon.

The manager is systemd under the unit (`FileDescriptorStoreMax=`), or `zramfs daemon`'s own
supervisor (zramfs/supervisor.py) where there is no systemd; both speak this protocol, so the
daemon does not care which. What a live restart keeps (docs/design.md, "Live restart"):

    fuse        the /dev/fuse descriptor of the mounted tree: the connection lives while
                anyone holds it, so requests wait for the next daemon instead of failing
    fuse-init   a memfd with what INIT agreed (JSON), which the kernel never sends again

Light on purpose: the supervisor imports it, and must never load the data path.
No libsystemd: each message is one datagram, as sd_notify sends it.
"""
from __future__ import annotations

import array
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from typing import NoReturn

from zramfs.sysfs import record

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3           # SD_LISTEN_FDS_START: the first passed descriptor
SUPERVISOR_ENV = "ZRAMFS_SUPERVISOR"   # set (to its pid) by zramfs's supervisor for its child
HANDOVER_EXIT = 75             # a supervised daemon's exit status after a graceful handover
                               # (EX_TEMPFAIL): "start the next one with the stored fds"


def supervised() -> bool:
    """Whether zramfs's own supervisor, not systemd, started this process."""
    return SUPERVISOR_ENV in os.environ


def _address(path: str) -> str | bytes:
    """$NOTIFY_SOCKET as sendmsg takes it: '@name' is the abstract socket '\\0name'."""
    return "\0" + path[1:] if path.startswith("@") else path


def notify(state: str, fds: Iterable[int] = ()) -> bool:
    """sd_notify(3)/sd_pid_notify_with_fds(3): one datagram of `state` lines (with `fds` over
    SCM_RIGHTS) to $NOTIFY_SOCKET. False where there is no manager or it cannot be reached
    (a warning then: the daemon goes on, only the manager's view suffers)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    fds = list(fds)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendmsg([state.encode()], anc, 0, _address(path))
    except OSError as e:
        log.warning("cannot notify the service manager (%s): %s", path, e.strerror)
        return False
    return True


def handover_refused() -> str | None:
    """Why a graceful restart could not hand over now, or None where it can: asked before
    anything is stopped, since a daemon that ends with nobody to take its descriptors loses
    every device. Under zramfs's supervisor the supervisor must still be this process's
    parent (it starts the next daemon; killed, it leaves us to init) and answer on its
    notify socket; otherwise the daemon executes itself anew, passing its descriptors itself
    (no store needed), so the program must still be there to execute."""
    if supervised():
        pid = os.environ[SUPERVISOR_ENV]
        if not pid.isdigit() or os.getppid() != int(pid):
            return f"the supervisor (pid {pid}) is gone: nobody would start the next daemon"
        if not notify("STATUS=graceful restart: handing over"):
            return "the supervisor does not answer on its notify socket"
        return None
    if not os.access(sys.executable, os.X_OK):
        return f"{sys.executable} cannot be executed: the next daemon could not start"
    return None


def _check_name(name: str) -> None:
    # LISTEN_FDNAMES is colon-separated; systemd takes printable ASCII up to 255 bytes.
    if not name or len(name) > 255 or ":" in name or not name.isascii() or \
            not name.isprintable():
        raise ValueError(f"not a file descriptor name: {name!r}")


def store(name: str, fd: int) -> bool:
    """FDSTORE=1: the manager keeps a duplicate of `fd` under `name` across our death and
    hands it to the next daemon. The caller keeps its own `fd`."""
    _check_name(name)
    return notify(f"FDSTORE=1\nFDNAME={name}", [fd])


def remove(name: str) -> bool:
    """FDSTOREREMOVE=1: the manager closes and forgets what it keeps under `name`."""
    _check_name(name)
    return notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def store_json(name: str, value: object) -> bool:
    """`value` as JSON in a memfd, stored under `name` (replacing what the name held)."""
    fd = record.memfd_with(name, json.dumps(value).encode())
    try:
        remove(name)
        return store(name, fd)
    finally:
        os.close(fd)


def read_json(fd: int) -> object:
    """What store_json put in a memfd (from its start, whatever the file offset)."""
    size = os.fstat(fd).st_size
    return json.loads(os.pread(fd, size, 0))


def listen_fds(unset_environment: bool = True) -> dict[str, list[int]]:
    """sd_listen_fds_with_names(3): the descriptors the manager passed, by name ("unknown"
    where it gave none), each made close-on-exec. Nothing unless LISTEN_PID is this process
    (the variables may have been inherited by a child they were not meant for). As systemd's,
    it unsets the variables so that our own children do not take them."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES")
    if unset_environment:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    if not pid or not count or not pid.isdigit() or int(pid) != os.getpid():
        return {}
    if not count.isdigit():
        log.warning("LISTEN_FDS=%r is not a count: ignored", count)
        return {}
    n = int(count)
    labels = names.split(":") if names else []
    if len(labels) != n:
        labels = ["unknown"] * n
    out: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out.setdefault(label, []).append(fd)
    return out


def listen_env(names: list[str], pid: int | None) -> dict[str, str]:
    """The variables that pass `names`' descriptors (at 3, 4, ...) to process `pid`."""
    for name in names:
        _check_name(name)
    env = {"LISTEN_FDS": str(len(names)), "LISTEN_FDNAMES": ":".join(names)}
    if pid is not None:
        env["LISTEN_PID"] = str(pid)
    return env


def flatten(named: Mapping[str, list[int]]) -> tuple[list[str], list[int]]:
    """Names and descriptors in LISTEN_FDS order."""
    names, fds = [], []
    for name, group in named.items():
        for fd in group:
            names.append(name)
            fds.append(fd)
    return names, fds


def exec_with_fds(argv: list[str], named: Mapping[str, list[int]]) -> NoReturn:
    """execv(argv) in this process (the same pid, so systemd's MainPID stays), passing
    `named` as LISTEN_FDS with LISTEN_PID = our own pid: what a graceful restart does where
    no supervisor starts the next daemon for us."""
    names, fds = flatten(named)
    # Out of the way first, then to 3, 4, ...: a target may be another's source.
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, LISTEN_FDS_START + len(fds)) for fd in fds]
    for i, fd in enumerate(moved):
        os.dup2(fd, LISTEN_FDS_START + i, inheritable=True)
        os.close(fd)
    os.environ.update(listen_env(names, os.getpid()))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)

