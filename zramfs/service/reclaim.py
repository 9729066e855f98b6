"""Hazard 6 (docs/design.md): the kernel swaps out through this daemon, so the daemon must
never wait on reclaim of its own memory, neither while it serves nor across a live restart.

- `protect`, once, before any thread starts: oom_score_adj -1000, PR_SET_IO_FLUSHER (per
  thread, inherited by new ones), and the memory lock where asked for.
- `lock`: mlockall (ONFAULT: reserved arenas cost nothing until used) and a keeper
  (zramfs.service._keeper): a process sharing this address space, its pidfd stored with the service
  manager as "keeper", so that a SIGKILL'd daemon's locked pages stay locked until the
  successor has them (`end_predecessor`). Without it, reclaim could put a kept page on a
  swap device that only the successor can serve, and the successor's adoption would wait on
  it for good.
- `watch_swaps`: with --mlock auto, the lock comes as soon as a device of this daemon is
  swap, however that swap was set up (the config, `zramfs swapon`, or by hand): /proc/swaps
  is polled for changes, so the lock follows a swapon within a wake-up.

Runs on the trio thread (watch_swaps waits in a worker thread); the keeper's pidfd is this
module's only state.
"""
from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
from collections.abc import Callable
from pathlib import Path

import trio

from zramfs.service import _keeper, loop

log = logging.getLogger(__name__)

PR_SET_IO_FLUSHER = 57
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
KEEPER_NAME = "keeper"          # its pidfd's name in the service manager's store
KEEPER_GRACE = 120              # seconds a keeper waits for a successor after the daemon's end
SWAPS = Path("/proc/swaps")
SWAPS_POLL = 2.0                # seconds a wait for a change of /proc/swaps lasts at most

_libc = ctypes.CDLL(None, use_errno=True)
_locked = False
_keeper_pid: int | None = None
_keeper_fd: int | None = None


class LockError(Exception):
    """The memory lock was asked for and could not be had."""


def locked() -> bool:
    return _locked


def protect(mlock: bool, keep: Callable[[str, int], object] | None) -> None:
    """Called before any thread starts: PR_SET_IO_FLUSHER is per thread. `keep` stores a
    descriptor with the service manager; None where nothing is kept for a next daemon (then
    there is no keeper either)."""
    try:
        Path("/proc/self/oom_score_adj").write_text("-1000")
    except OSError as e:
        log.warning("cannot set oom_score_adj: %s", e.strerror)
    if _libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        log.warning("cannot set PR_SET_IO_FLUSHER: %s", os.strerror(ctypes.get_errno()))
    if mlock:
        lock(keep)


def lock(keep: Callable[[str, int], object] | None) -> None:
    """Locks this process's memory, now and for good, and starts its keeper (once) where
    there will be a next daemon to end it (`keep`)."""
    global _locked, _keeper_pid, _keeper_fd
    if _locked:
        return
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        raise LockError(f"mlockall: {os.strerror(ctypes.get_errno())}")
    _locked = True
    log.info("memory locked (mlockall)")
    if keep is None:
        return
    try:
        _keeper_pid = _keeper.start(KEEPER_GRACE)
        _keeper_fd = os.pidfd_open(_keeper_pid)
    except OSError as e:
        log.warning("no memory keeper (%s): a killed daemon's pages are unlocked until its "
                    "successor maps them", e.strerror)
        return
    keep(KEEPER_NAME, _keeper_fd)
    log.debug("memory keeper %d started", _keeper_pid)


def keeper_fds() -> dict[str, list[int]]:
    """This daemon's keeper for a handover by exec (which has no store): the successor ends
    it once it has adopted the pages."""
    return {KEEPER_NAME: [os.dup(_keeper_fd)]} if _keeper_fd is not None else {}


def end_predecessor(inherited: dict[str, list[int]]) -> None:
    """The daemon before this one kept its memory through its keeper: once this one has
    mapped (and, locked, pinned) the pages it adopted, that memory may go."""
    for fd in inherited.pop(KEEPER_NAME, []):
        _end(fd)


def stop() -> None:
    """A stop for good: this daemon's keeper goes with it."""
    global _keeper_fd, _keeper_pid
    if _keeper_fd is not None:
        _end(_keeper_fd)
        _keeper_fd = _keeper_pid = None


def _end(pidfd: int) -> None:
    """SIGKILL to a keeper, waited for where it is our child (after an exec, or our own),
    so its share of the memory is gone when this returns."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    except (ChildProcessError, ProcessLookupError):
        pass                                # not ours to wait for, or gone already
    except OSError as e:
        log.warning("cannot end a memory keeper: %s", e.strerror)
    finally:
        os.close(pidfd)


def swap_users(mountpoint: Path) -> list[str]:
    """Active swaps that are loop devices over this tree's device files."""
    dev_dir = f"{mountpoint}/dev/"
    out = []
    for name in loop.swaps():
        if not name.startswith("/dev/loop"):
            continue
        try:
            back = Path(f"/sys/block/{name[5:]}/loop/backing_file").read_text().strip()
        except OSError:
            continue
        if back.startswith(dev_dir):
            out.append(name)
    return out


def _next_swap_users(mountpoint: Path, timeout: float) -> list[str]:
    """swap_users, after /proc/swaps changed or `timeout` seconds (in a worker thread). The
    kernel marks a change by POLLPRI against what the file was when opened: opened first, so
    that a swapon between the look and the wait is not missed."""
    with open(SWAPS, "rb") as f:
        users = swap_users(mountpoint)
        if not users:
            p = select.poll()
            p.register(f, select.POLLPRI)
            p.poll(timeout * 1000)
            users = swap_users(mountpoint)
    return users


async def watch_swaps(mountpoint: Path, keep: Callable[[str, int], object] | None) -> None:
    """--mlock auto: the lock as soon as a device of this tree is swap."""
    while not _locked:
        users = await trio.to_thread.run_sync(_next_swap_users, mountpoint, SWAPS_POLL,
                                              abandon_on_cancel=True)
        if users:
            log.info("%s: swap on this daemon's devices; locking its memory", ", ".join(users))
            try:
                lock(keep)
            except LockError as e:
                log.error("%s: the daemon's memory may be swapped onto its own device", e)
            return
