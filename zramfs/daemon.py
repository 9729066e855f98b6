"""The daemon: mounts the tree, serves it until SIGTERM/SIGINT or an unmount, tears down.

trio owns the daemon. libfuse's multi-threaded loop runs in a thread of its own; its workers
answer device-file I/O in C and hand every other request to the trio thread through a
`TrioBridge`, so the tree and the devices are only ever touched between two awaits there.

Shutdown, in order: the devices are detached and drained (requests in flight finish, new ones
get EIO) and freed; the bridge refuses new control requests; the tree is unmounted (lazily, so
a file still held open, e.g. by a loop device, does not keep us alive); libfuse's loop is
woken and the session closed.
"""
from __future__ import annotations

import errno
import inspect
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from zramfs import _fuse, _meta
from zramfs.control import Tree
from zramfs.device import Devices

log = logging.getLogger(__name__)

DEFAULT_MOUNTPOINT = Path("/run/zramfs")
WAKE_AFTER = 0.5          # seconds to let libfuse's loop end by itself before waking it


@dataclass
class DeviceSpec:
    """A device to set up at start: disksize in bytes, and its algorithm."""
    disksize: int
    algorithm: str = "lz4"


class DaemonError(Exception):
    """The daemon cannot start (bad mountpoint, mount failed)."""


class TrioBridge:
    """`bridge.<op>(*args)`, called in a libfuse worker, runs `handler.<op>(*args)` on the
    trio thread and waits for it (blocking a worker is fine; it waits without the GIL).

    After `close()` new calls fail at once with ESHUTDOWN and async handlers in flight are
    cancelled, so libfuse's loop, which waits for its workers, can never wait on trio.
    """

    def __init__(self, handler: object, token: trio.lowlevel.TrioToken) -> None:
        self._handler = handler
        self._token = token
        self._closed = False
        self._scopes: set[trio.CancelScope] = set()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = getattr(self._handler, name)          # AttributeError: the op is ENOSYS
        if inspect.iscoroutinefunction(fn):
            def call(*args: Any) -> Any:
                return self._call(trio.from_thread.run, self._run_async, fn, args)
        else:
            def call(*args: Any) -> Any:
                return self._call(trio.from_thread.run_sync, self._run_sync, fn, args)
        self.__dict__[name] = call
        return call

    def _call(self, via: Callable[..., Any], wrapper: Callable[..., Any],
              fn: Callable[..., Any], args: tuple) -> Any:
        if self._closed:
            raise OSError(errno.ESHUTDOWN, "zramfs is shutting down")
        try:
            return via(wrapper, fn, args, trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled):
            raise OSError(errno.ESHUTDOWN, "zramfs is shutting down") from None

    def _run_sync(self, fn: Callable[..., Any], args: tuple) -> Any:
        if self._closed:
            raise OSError(errno.ESHUTDOWN, "zramfs is shutting down")
        return fn(*args)

    async def _run_async(self, fn: Callable[..., Any], args: tuple) -> Any:
        with trio.CancelScope() as scope:
            if self._closed:
                scope.cancel()
            self._scopes.add(scope)
            try:
                return await fn(*args)
            finally:
                self._scopes.discard(scope)
        raise OSError(errno.ESHUTDOWN, "zramfs is shutting down")

    def close(self) -> None:
        """Trio thread only."""
        self._closed = True
        for scope in list(self._scopes):
            scope.cancel()


def notify_systemd(state: str) -> None:
    """sd_notify(3) without libsystemd: a datagram to $NOTIFY_SOCKET, if we have one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), path)
    except OSError as e:
        log.warning("cannot notify systemd: %s", e)


def _check_mountpoint(mountpoint: Path) -> None:
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DaemonError(f"cannot create mountpoint {mountpoint}: {e.strerror}") from None
    if not mountpoint.is_dir():
        raise DaemonError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise DaemonError(f"{mountpoint} is already a mount point")


def _wake(mountpoint: Path) -> int | None:
    """An O_PATH descriptor on the mounted root, to wake libfuse's loop after unmount."""
    try:
        return os.open(mountpoint, os.O_PATH | os.O_DIRECTORY)
    except OSError:
        return None


def _poke(fd: int) -> None:
    # A GETATTR that a worker receives, sees the exit flag and stops on; it is answered
    # (ECONNABORTED) once the session is closed.
    try:
        os.fstat(fd)
    except OSError:
        pass


async def serve(mountpoint: Path, specs: list[DeviceSpec],
                task_status: trio.TaskStatus[Tree] = trio.TASK_STATUS_IGNORED) -> None:
    """Runs the daemon until cancelled, a signal, or an unmount from outside."""
    _check_mountpoint(mountpoint)
    devices = Devices()
    for spec in specs:
        dev = devices.add()
        await dev.store("comp_algorithm", spec.algorithm)
        await dev.store("disksize", str(spec.disksize))
    tree = Tree(devices)
    bridge = TrioBridge(tree, trio.lowlevel.current_trio_token())
    try:
        session = _fuse.Session(str(mountpoint), bridge, data=_meta, fsname="zramfs",
                                attr_timeout=0.0, entry_timeout=0.0)
    except OSError as e:
        raise DaemonError(f"cannot mount {mountpoint}: {e.strerror}") from None
    loop_done = trio.Event()

    async def run_loop() -> None:
        rc = await trio.to_thread.run_sync(session.run)
        log.info("FUSE loop ended (%d)", rc)
        loop_done.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_loop)
            log.info("serving %s with %d device(s)", mountpoint, len(specs))
            notify_systemd("READY=1\nSTATUS=serving " + str(mountpoint))
            task_status.started(tree)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as waiters:
                    async def until_signal() -> None:
                        async for signum in signals:
                            log.info("%s: shutting down", signal.Signals(signum).name)
                            break
                        waiters.cancel_scope.cancel()

                    async def until_unmounted() -> None:
                        await loop_done.wait()
                        waiters.cancel_scope.cancel()

                    waiters.start_soon(until_signal)
                    waiters.start_soon(until_unmounted)
            with trio.CancelScope(shield=True):
                await _shutdown(mountpoint, session, bridge, devices, loop_done)
    finally:
        session.close()
    log.info("stopped")


async def _shutdown(mountpoint: Path, session: _fuse.Session, bridge: TrioBridge,
                    devices: Devices, loop_done: trio.Event) -> None:
    notify_systemd("STOPPING=1")
    await devices.remove_all()
    fd = None if loop_done.is_set() else await trio.to_thread.run_sync(_wake, mountpoint)
    bridge.close()
    await trio.to_thread.run_sync(session.exit)
    with trio.move_on_after(WAKE_AFTER):
        await loop_done.wait()
    if not loop_done.is_set() and fd is not None:
        threading.Thread(target=_poke, args=(fd,), daemon=True).start()
    await loop_done.wait()
    if fd is not None:
        session.close()       # answers the poke, so the descriptor can go
        os.close(fd)
