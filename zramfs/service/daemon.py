"""The daemon: mounts the tree, sets up the configured devices and their uses (swap, file
systems: zramfs.service.uses), serves until SIGTERM/SIGINT or an unmount, and undoes it all in
reverse.

trio owns the daemon. The FUSE engine's loop (zramfs.fuse._fuse) runs in a thread of its own; its
workers answer device-file I/O in C and hand every other request to the trio thread through a
`TrioBridge`, so the tree and the devices are only ever touched between two awaits there.
Commands that open device files (losetup, mkswap, swapoff...) run in worker threads, so the
trio thread stays free to answer their OPENs.

Live restart (docs/design.md, "Live restart"): the /dev/fuse descriptor and what INIT agreed
are stored with the service manager (systemd, or zramfs's own supervisor: fdstore.py) as
soon as they exist. A daemon started with them (LISTEN_FDS) adopts the mounted tree instead of
mounting it, and has the kernel resend the requests its predecessor read and left unanswered.
SIGHUP is a graceful restart: the engine stops reading requests and finishes those it has,
nothing is unmounted or undone, `_hand_over` gathers what the next daemon needs, and then
the process exits with fdstore.HANDOVER_EXIT for its supervisor to start the next one, or,
without one, executes itself anew with the same pid (systemd's `ExecReload=kill -HUP`).

Shutdown, in order: file systems unmounted and swap turned off while the devices still serve
(swapoff reads every swapped page back; one that fails is tried again while the device is
held); loop devices detached; then, while anyone else still
holds a device open (swap, a mount, a process: logged by name and pid), the daemon goes on
serving and waits for them to let go, as the kernel refuses to reset a device in use (EBUSY);
only `--force-after SECONDS` stops that wait. Then the devices are detached and drained
(requests in flight finish, new ones get EIO) and freed; the bridge refuses new control
requests; the tree is unmounted lazily; the engine's loop ends and the session is closed.

Nothing on the trio thread may wait on something that may need the tree: a path a user gives
could lie inside it, and this thread answers for it. Such work runs in worker threads; a guard
(`guard_trio_thread`) makes an open() or a command started here fail loudly instead.

Memory: the daemon gives its pools a budget, the tighter of its cgroup's limit and the RAM,
less a margin for its own working set (zramfs.service.budget); a write past it fails as one past
mem_limit does (EIO, failed_writes), so the OOM killer never has to end the daemon.

Swap safety (docs/design.md, hazard 6): the kernel swaps out through this process, so it must never wait on
reclaim of its own memory: mlockall, PR_SET_IO_FLUSHER and oom_score_adj -1000, and a keeper
that holds the locked memory across a restart (zramfs.service.reclaim).
"""
from __future__ import annotations

import contextlib
import errno
import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import trio

from zramfs.fuse import _fuse
from zramfs.service import budget, fdstore, loop, metrics, pidfile, reclaim, uses
from zramfs.zpool import _pages
from zramfs.zram import _zram
from zramfs.service.config import DeviceConfig
from zramfs.sysfs import files, interrupts
from zramfs.sysfs.control import Tree
from zramfs.sysfs.device import PAGE, SETTINGS
from zramfs.sysfs.hotplug import Devices
from zramfs.sysfs import record
from zramfs.sysfs.record import State, StateError

log = logging.getLogger(__name__)

DEFAULT_MOUNTPOINT = Path("/run/zramfs")
BUDGET_POLL = 2.0         # seconds between looks at the memory budget
HANDOVER_GRACE = 10.0     # seconds a graceful restart waits for the requests being served


@dataclass
class Options:
    mountpoint: Path = DEFAULT_MOUNTPOINT
    devices: list[DeviceConfig] = field(default_factory=list)
    mlock: str = "auto"                  # yes, no, or auto: yes when a device is swap
    force_after: float | None = None     # seconds to wait for others to close devices;
                                         # None: as long as they hold them
    metrics: str | None = None           # ADDR:PORT of the Prometheus endpoint
    fuse_transport: str = "classic"      # classic, io_uring or auto (config.FUSE_TRANSPORTS)
    inherited: dict[str, list[int]] = field(default_factory=dict)
                                         # descriptors from the service manager, by name
                                         # (fdstore.listen_fds()); serve() takes those it
                                         # adopts out, and hands the rest on untouched
    argv: list[str] = field(default_factory=list)   # the command line, for a re-exec


@dataclass
class Handover:
    """What a graceful restart leaves for the next daemon: descriptors by name, in the order
    they are to be passed (fdstore.exec_with_fds)."""
    fds: dict[str, list[int]]
    session: object = None      # kept alive to the end: an abandoned worker may still use it


class DaemonError(Exception):
    """The daemon cannot start (bad mountpoint, mount failed, set-up failed)."""


class StateRefused(DaemonError):
    """The kept state (zramfs.sysfs.record) is not one this daemon can adopt: corrupt, or of another
    version. The daemon holds it and the tree (see _hold), and exits with STATE_REFUSED_EXIT
    once told to give them up."""


STATE_REFUSED_EXIT = 65     # EX_DATAERR: the kept state was refused and then given up


class TrioBridge:
    """`bridge.<op>(*args)`, called in a FUSE worker thread, runs `handler.<op>(*args)` on the
    trio thread and waits for it (blocking a worker is fine; it waits without the GIL).

    After `close()` new calls fail at once with ESHUTDOWN and async handlers in flight are
    cancelled, so the engine's loop, which waits for its workers, can never wait on trio.
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
            return via(wrapper, fn, args, threading.get_ident(), trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled):
            raise OSError(errno.ESHUTDOWN, "zramfs is shutting down") from None

    def _run_sync(self, fn: Callable[..., Any], args: tuple, request: int) -> Any:
        if self._closed:
            raise OSError(errno.ESHUTDOWN, "zramfs is shutting down")
        return fn(*args)

    async def _run_async(self, fn: Callable[..., Any], args: tuple, request: int) -> Any:
        interrupts.REQUEST.set(request)     # this task's own context: its request's thread
        with trio.CancelScope() as scope:
            if self._closed:
                scope.cancel()
            self._scopes.add(scope)
            try:
                return await fn(*args)
            finally:
                self._scopes.discard(scope)
        raise OSError(errno.ESHUTDOWN, "zramfs is shutting down")

    def interrupt(self, request: int) -> None:
        """The engine's INTERRUPT of the WRITE served by thread `request` (any thread)."""
        try:
            trio.from_thread.run_sync(interrupts.deliver, request, trio_token=self._token)
        except trio.RunFinishedError:
            pass

    def close(self) -> None:
        """Trio thread only."""
        self._closed = True
        for scope in list(self._scopes):
            scope.cancel()


# What may not run on the trio thread: opening a file (other than the kernel's own /proc and
# /sys, and Python loading its modules) or starting a program. os.stat has no audit event.
_BLOCKING = {"open", "subprocess.Popen", "os.system", "os.posix_spawn", "os.exec", "os.fork"}
_HARMLESS = ("/proc/", "/sys/", "/dev/null")
_guarded_thread: int | None = None


def _audit(event: str, args: tuple) -> None:
    if _guarded_thread is None or event not in _BLOCKING:
        return
    if threading.get_ident() != _guarded_thread:
        return
    if event == "open":
        path = args[0]
        if not isinstance(path, (str, bytes, os.PathLike)):
            return                         # an fd already open
        path = os.fsdecode(path)
        if path.startswith(_HARMLESS) or path.endswith((".py", ".pyc", ".so")):
            return
    raise RuntimeError(f"blocking call on the trio thread: {event} {args[0]!r}; "
                       "run it in a worker thread (trio.to_thread)")


@contextlib.contextmanager
def guard_trio_thread():
    """While inside, an open() or a program started on the calling (trio) thread raises."""
    global _guarded_thread
    if _guarded_thread is None and not getattr(sys, "_zramfs_audit", False):
        sys.addaudithook(_audit)           # hooks stay for the process's life: add once
        sys._zramfs_audit = True           # type: ignore[attr-defined]
    _guarded_thread = threading.get_ident()
    try:
        yield
    finally:
        _guarded_thread = None


def set_memory_budget() -> None:
    """The pools' budget for this process: the tighter of its cgroup's limit and the RAM, less
    a margin for the daemon's own working set. Looked at again before each device is
    initialised and every few seconds, since the daemon may be moved to another cgroup."""
    b = budget.memory_budget()
    pages = max(1, b.size // PAGE)
    if pages != _pages.budget_stat()[0]:
        _pages.set_budget(pages)
        log.info("%s", b)


async def _watch_budget() -> None:
    """Keeps the budget current; says once, in the log, that writes fail for it."""
    said = False
    while True:
        set_memory_budget()
        limit, held, refused = _pages.budget_stat()
        if refused and not said:
            log.warning("memory budget reached (%d of %d pages): writes fail with EIO and count"
                        " in io_stat's failed_writes; stored data stays readable", held, limit)
            said = True
        await trio.sleep(BUDGET_POLL)


def _check_mountpoint(mountpoint: Path) -> None:
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DaemonError(f"cannot create mountpoint {mountpoint}: {e.strerror}") from None
    if not mountpoint.is_dir():
        raise DaemonError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise DaemonError(f"{mountpoint} is already a mount point")


def _inherited_fuse(opts: Options) -> tuple[int, dict] | None:
    """The FUSE connection and its INIT parameters a previous daemon stored (`fuse`,
    `fuse-init`), taken out of opts.inherited; None where there are none. A connection
    whose tree is no longer mounted (unmounted while no daemon ran) is dropped, from the
    service manager's store too."""
    fds, init_fds = opts.inherited.pop("fuse", []), opts.inherited.pop("fuse-init", [])
    try:
        if not fds:
            return None
        if len(fds) != 1 or len(init_fds) != 1:
            raise DaemonError(f"the service manager passed {len(fds)} fuse and {len(init_fds)}"
                              " fuse-init descriptors; expected one of each")
        try:
            params = fdstore.read_json(init_fds[0])
        except (OSError, ValueError) as e:
            raise DaemonError(f"fuse-init: unreadable INIT parameters: {e}") from None
        if not isinstance(params, dict):
            raise DaemonError(f"fuse-init: not INIT parameters: {params!r}")
        if not _is_zramfs_mount(opts.mountpoint):
            log.warning("a stored FUSE connection, but %s is not mounted any more: mounting "
                        "afresh", opts.mountpoint)
            fdstore.remove("fuse")
            fdstore.remove("fuse-init")
            os.close(fds.pop())
            return None
        return fds.pop(), params
    finally:
        for fd in fds + init_fds:
            os.close(fd)


def _is_zramfs_mount(mountpoint: Path) -> bool:
    """Whether a zramfs tree is mounted at `mountpoint` (the mount table escapes blanks and
    backslashes in octal)."""
    with open("/proc/self/mounts") as f:
        return any(len(fs) > 2 and files.mount_path(fs[1]) == str(mountpoint.absolute()) and
                   fs[2] == "fuse.zramfs" for fs in (line.split() for line in f))


def _open_session(opts: Options, bridge: TrioBridge, adopted: tuple[int, dict] | None,
                  transport: str) -> _fuse.Session:
    """The FUSE session: a new mount, or the previous daemon's connection adopted (always
    classic). A new classic mount's descriptor goes to the service manager's store at once:
    from here on a crash keeps the tree."""
    kw = dict(data_ops=_zram.data_ops_capsule(), attr_timeout=0.0, entry_timeout=0.0)
    if adopted is not None:
        fd, params = adopted
        try:
            return _fuse.Session.adopt(str(opts.mountpoint), fd, bridge, init=params, **kw)
        except (KeyError, ValueError) as e:
            os.close(fd)
            raise DaemonError(f"fuse-init: cannot adopt the FUSE connection: {e}") from None
    try:
        session = _fuse.Session(str(opts.mountpoint), bridge, fsname="zramfs",
                                transport=transport, **kw)
    except OSError as e:
        raise DaemonError(f"cannot mount {opts.mountpoint}: {e.strerror}") from None
    if transport == "classic":
        fdstore.store("fuse", session.fd)
    return session


async def _store_init_params(session: _fuse.Session, loop_done: trio.Event) -> None:
    """`fuse-init`, once the kernel's INIT is answered (only a new mount has one to wait
    for: an adopted session's were stored by the daemon that mounted). A loop that ends
    before INIT (a config whose set-up failed at once) ends the wait: the session is closed
    only after this task, so nothing else would."""
    params = None

    async def until_loop_done() -> None:
        await loop_done.wait()
        waiting.cancel_scope.cancel()

    async with trio.open_nursery() as waiting:
        waiting.start_soon(until_loop_done)
        params = await trio.to_thread.run_sync(session.wait_init, abandon_on_cancel=True)
        waiting.cancel_scope.cancel()
    if params is None:
        return                          # closed or ended before INIT: nothing to keep
    fdstore.store_json("fuse-init", params)
    log.debug("FUSE INIT parameters stored: %s", json.dumps(params))
def _keep_nothing(name: str, fd: int) -> None:
    """The fd store of a daemon that keeps nothing for the next (io_uring)."""


def _pick_transport(choice: str, adopting: bool) -> str:
    """pick_transport's answer, but classic for an adopted connection: a stored connection
    is always a classic one (an io_uring daemon stores none)."""
    if not adopting:
        return pick_transport(choice)
    if choice == "io_uring":
        log.warning("FUSE transport: classic for the adopted connection (live restart is "
                    "the classic transport's); a fresh mount gets io_uring")
    return "classic"


def pick_transport(choice: str) -> str:
    """The engine's transport for --fuse-transport `choice`: io_uring needs the kernel's FUSE
    over io_uring (6.14+, CONFIG_FUSE_IO_URING) and its module parameter enable_uring, which
    is switched on here if it is off (and logged: it stays on for every FUSE mount made
    after). `auto` falls back to classic where either is missing."""
    if choice == "classic":
        return "classic"
    if choice not in ("io_uring", "auto"):
        raise DaemonError(f"FUSE transport {choice!r} is not one of classic, io_uring, auto")
    state = _fuse.uring_param()
    why = None
    if state is None:
        why = (f"this kernel has no FUSE over io_uring ({_fuse.URING_PARAM} is missing: "
               "needs Linux 6.14+ with CONFIG_FUSE_IO_URING)")
    elif not state:
        try:
            Path(_fuse.URING_PARAM).write_text("Y\n")
        except OSError as e:
            why = f"cannot switch on {_fuse.URING_PARAM}: {e.strerror}"
        else:
            log.warning("switched FUSE over io_uring on: wrote Y to %s (it stays on)",
                        _fuse.URING_PARAM)
    if why is None:
        return "io_uring"
    if choice == "io_uring":
        raise DaemonError(f"FUSE transport io_uring: {why}")
    log.info("FUSE transport: classic (%s)", why)
    return "classic"


async def serve(opts: Options,
                task_status: trio.TaskStatus[Tree] = trio.TASK_STATUS_IGNORED
                ) -> Handover | None:
    """Runs the daemon until a signal or an unmount from outside; after SIGHUP, what the
    next daemon needs (see continue_in_next)."""
    mountpoint = opts.mountpoint
    if opts.metrics:
        try:
            metrics.parse_address(opts.metrics)
        except ValueError as e:
            raise DaemonError(f"metrics: {e}") from None
    adopted = _inherited_fuse(opts)
    if adopted is None:
        _check_mountpoint(mountpoint)
    transport = _pick_transport(opts.fuse_transport, adopted is not None)
    # Live restart is the classic transport's: with io_uring nothing is kept for a next
    # daemon, and a crash or restart loses the tree as before.
    next_daemon = fdstore.store if transport == "classic" else None   # who keeps for it
    keep = next_daemon or _keep_nothing
    # Locked before anything is adopted: the adopted pages are locked as they are mapped.
    swap = (any(d.fs_type == "swap" for d in opts.devices) or reclaim.KEEPER_NAME in opts.inherited
            or (adopted is not None and bool(reclaim.swap_users(mountpoint))))
    try:
        reclaim.protect(opts.mlock == "yes" or (opts.mlock == "auto" and swap), next_daemon)
    except reclaim.LockError as e:
        raise DaemonError(str(e)) from None
    set_memory_budget()
    state = State(_take_state_fds(opts), keep, fdstore.remove, SETTINGS)
    devices = Devices(mountpoint, before_init=set_memory_budget, state=state)
    tree = Tree(devices)
    bridge = TrioBridge(tree, trio.lowlevel.current_trio_token())
    session = _open_session(opts, bridge, adopted, transport)
    if not fdstore.supervised():
        pidfile.write_pid_file(mountpoint, os.getpid())
    loop_done = trio.Event()
    undo: list[tuple[str, Callable[[], None]]] = []
    handover: Handover | None = None

    # The loop's thread is never abandoned (it uses the session, which close() frees), but
    # by a graceful restart whose requests do not finish in time: the process then ends
    # (exit or exec) with the session alive, and the kernel resends them to the next one.
    loop_scope = trio.CancelScope(shield=True)

    async def run_loop() -> None:
        with loop_scope:
            rc = await trio.to_thread.run_sync(session.run, abandon_on_cancel=True)
            log.info("FUSE loop ended (%d)", rc)
            loop_done.set()

    failure: DaemonError | None = None
    graceful = False
    try:
        if state.adopting:
            try:
                with guard_trio_thread():
                    await _restore_devices(state, devices, tree)
                reclaim.end_predecessor(opts.inherited)
            except StateRefused as e:
                # The tree, its connection and the kept state stay as they are, and the
                # requests wait in the kernel, until someone says: try again (an upgraded
                # daemon), or give it all up.
                log.error("%s", e)
                if not await _hold(mountpoint, e):
                    state.give_up()
                    reclaim.end_predecessor(opts.inherited)
                    raise
                handover = _hand_over(opts, session, state)
                log.info("handed over")
                return handover
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_loop)
            if adopted is None and transport == "classic":
                nursery.start_soon(_store_init_params, session, loop_done)
            try:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                               signal.SIGHUP) as signals, \
                        guard_trio_thread():
                    try:
                        await uses.set_up(opts.mountpoint, opts.devices, devices, tree, undo)
                    except (DaemonError, uses.SetUpError) as e:
                        failure = DaemonError(str(e))   # raised below, outside the nursery
                    else:
                        names = ", ".join(d.name for d in opts.devices) or "no devices"
                        # STATFS: answered in C, so INIT is done once it returns.
                        await trio.to_thread.run_sync(os.statvfs, mountpoint)
                        _log_transport(session, transport)
                        async with trio.open_nursery() as background:
                            if opts.metrics:
                                # Not data: a port it cannot listen on is retried meanwhile.
                                await background.start(
                                    metrics.serve, opts.metrics,
                                    partial(_snapshot, devices, session))
                            log.info("serving %s (%s)", mountpoint, names)
                            fdstore.notify(f"READY=1\nSTATUS=serving {mountpoint}: {names}")
                            task_status.started(tree)
                            background.start_soon(_watch_budget)
                            if opts.mlock == "auto" and not reclaim.locked():
                                background.start_soon(reclaim.watch_swaps, mountpoint,
                                                      next_daemon)
                            for cfg in opts.devices:
                                for job in uses.maintenance(devices, cfg):
                                    background.start_soon(job)
                            graceful = await _until_stopped(signals, loop_done,
                                                            restartable=transport == "classic")
                            background.cancel_scope.cancel()
            finally:
                # Whatever ended us (a signal, an unmount, a failed set-up, a bug), undo it
                # all: the FUSE loop thread cannot be abandoned, so we must make it return.
                # A graceful restart undoes nothing: it only stops the loop.
                with trio.CancelScope(shield=True), guard_trio_thread(), \
                        trio.open_signal_receiver(signal.SIGHUP):   # too late to restart
                    if graceful:
                        finished = await _stop_serving(session, bridge, devices, loop_done,
                                                       loop_scope)
                        handover = _hand_over(opts, session, state)
                        if not finished:
                            # Now: trio.run would wait for the stuck handler's thread.
                            continue_in_next(opts, handover)
                    else:
                        await _shutdown(opts, session, bridge, devices, undo, loop_done)
    finally:
        if handover is None:
            session.close()
            # Stopped for good: no manager may hand this connection to another daemon.
            fdstore.remove("fuse")
            fdstore.remove("fuse-init")
            fdstore.remove(reclaim.KEEPER_NAME)
            reclaim.stop()
            state.stop()
            if not fdstore.supervised():
                pidfile.remove_pid_file(mountpoint, os.getpid())
    log.info("handed over" if handover is not None else "stopped")
    if failure is not None:
        raise failure
    return handover


async def _stop_serving(session: _fuse.Session, bridge: TrioBridge, devices: Devices,
                        loop_done: trio.Event, loop_scope: trio.CancelScope) -> bool:
    """A graceful restart's first half: no new request is read, a running writeback or
    recompression is cancelled (its writer gets ECANCELED), those being served finish (the
    trio thread answers theirs meanwhile), and the tree stays mounted. A request that does
    not finish within HANDOVER_GRACE (a dict= path that blocks) is left unanswered, as a crash
    leaves it: the next daemon gets it again (RESEND). Whether every request finished."""
    fdstore.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\n"
                   "STATUS=handing over to the next daemon")
    devices.cancel_tiering()
    await trio.to_thread.run_sync(session.stop)
    with trio.move_on_after(HANDOVER_GRACE):
        await loop_done.wait()
    if loop_done.is_set():
        bridge.close()
        return True
    log.warning("requests still being served after %.0f s: handing over without their "
                "answers; the kernel resends them to the next daemon", HANDOVER_GRACE)
    loop_scope.cancel()             # the loop's thread is abandoned: this process ends next
    return False


def _hand_over(opts: Options, session: _fuse.Session, state: State) -> Handover:
    """What the next daemon needs, by name: the FUSE connection, what INIT agreed, the device
    record and each device's table and pool (zramfs.sysfs.record), and every descriptor this daemon
    was given and did not adopt. A supervisor or systemd already holds the stored ones; they
    are also returned for a re-exec, which has no store."""
    params = session.init_params()
    fds: dict[str, list[int]] = {"fuse": [session.detach()]}
    if params is not None:
        fds["fuse-init"] = [record.memfd_with("fuse-init", json.dumps(params).encode())]
    for name, fd in state.current().items():
        fds[name] = [os.dup(fd)]
    fds.update(reclaim.keeper_fds())
    for name, group in opts.inherited.items():
        fds.setdefault(name, []).extend(group)
    return Handover(fds, session)


def _take_state_fds(opts: Options) -> dict[str, list[int]]:
    """The descriptors of zramfs.sysfs.record (the device record, tables and pools), taken out of
    opts.inherited."""
    return {name: opts.inherited.pop(name) for name in list(opts.inherited)
            if State.owns(name)}


def continue_in_next(opts: Options, handover: Handover) -> NoReturn:
    """After serve() returned a handover: under zramfs's supervisor, exit with
    HANDOVER_EXIT (it starts the next daemon with the stored descriptors); otherwise
    (systemd, or no manager) execute the command anew in this process, the descriptors
    passed as LISTEN_FDS, so that an upgraded install takes over with the same pid.
    Called after trio.run, where nothing else may use a descriptor while they are moved into
    place; from inside it only when a stuck request would keep trio.run from ending."""
    global _guarded_thread
    _guarded_thread = None          # the exec is the point: this process serves no more
    logging.shutdown()
    if fdstore.supervised():
        os._exit(fdstore.HANDOVER_EXIT)     # the C threads of the devices are not joined
    fdstore.exec_with_fds([sys.executable, "-m", "zramfs.cli", *opts.argv], handover.fds)


async def _until_stopped(signals, loop_done: trio.Event, restartable: bool) -> bool:
    """Until a signal or an unmount; True for SIGHUP, a graceful restart (ignored, with a
    log line, where the transport cannot hand its connection over)."""
    graceful = False

    async with trio.open_nursery() as waiters:
        async def until_signal() -> None:
            nonlocal graceful
            async for signum in signals:
                if signum == signal.SIGHUP and not restartable:
                    log.warning("SIGHUP: no graceful restart on the io_uring transport "
                                "(live restart is the classic transport's); still serving")
                    continue
                if signum == signal.SIGHUP and _handover_refused():
                    continue
                graceful = signum == signal.SIGHUP
                log.info("%s: %s", signal.Signals(signum).name,
                         "graceful restart" if graceful else "shutting down")
                break
            waiters.cancel_scope.cancel()

        async def until_unmounted() -> None:
            await loop_done.wait()
            log.info("unmounted from outside: shutting down")
            waiters.cancel_scope.cancel()

        waiters.start_soon(until_signal)
        waiters.start_soon(until_unmounted)
    return graceful


def _log_transport(session: _fuse.Session, asked: str) -> None:
    """Which transport INIT settled on (INIT is answered by the time devices are set up)."""
    st = session.stats()
    if st["transport"] == "io_uring":
        # This kernel drops a ring's entries with the process that registered them: nothing
        # a next daemon could answer on (docs/fuse-protocol.md).
        log.warning("FUSE transport: io_uring, %d queues: a crash or a restart loses the tree "
                    "(live restart is the classic transport's)", st["ring_queues"])
    elif asked == "io_uring":
        err = st["ring_error"]
        log.warning("FUSE transport: classic; io_uring was not agreed with the kernel%s",
                    f" ({os.strerror(err)})" if err else "")
    else:
        log.info("FUSE transport: classic")


def _snapshot(devices: Devices, session: _fuse.Session) -> metrics.Snapshot:
    """The numbers a scrape shows (trio thread: the devices are only read here)."""
    snap = metrics.Snapshot(requests=session.requests(), buckets=_fuse.LATENCY_BUCKETS)
    for dev in devices.by_id.values():
        snap.devices.append(metrics.DeviceStats(
            name=dev.name, disksize=dev.disksize, mm_stat=dev.mm_stat(),
            io_stat=dev.io_stat(), bd_stat=dev.bd_stat(),
            bd_blocks=dev.backing.nr_blocks if dev.backing is not None else 0,
            evicted=dev.evicted(), dedup_stat=dev.dedup_stat()))
    return snap


async def _restore_devices(state: State, devices: Devices, tree: Tree) -> None:
    """The devices the daemon before this one kept, as they were, pages and all: before the
    engine runs, so that no request (the kernel resends those left unanswered) finds a
    device not yet there."""
    try:
        for record in state.load():
            dev = devices.restore(record)
            tree.add_device(dev)
            await dev.restore(record)
        state.restored()
    except StateError as e:
        raise StateRefused(f"cannot adopt the kept state: {e}") from None


async def _hold(mountpoint: Path, refused: StateRefused) -> bool:
    """After a refused adoption: serves nothing and keeps everything (the connection, whose
    requests wait in the kernel, and the kept state) until a signal. True for SIGHUP (try
    again: a graceful restart, e.g. into a fixed or upgraded daemon), False for SIGTERM or
    SIGINT (give it all up: the tree is unmounted and the kept state let go)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        log.error("holding %s and its kept state, serving nothing: SIGHUP (zramfs restart, "
                  "systemctl reload zramfs) tries again, SIGTERM gives them up", mountpoint)
        fdstore.notify(f"READY=1\nSTATUS=holding {mountpoint}, serving nothing: {refused}; "
                       "reload to try again, stop to give it up")
        async for signum in signals:
            if signum == signal.SIGHUP and _handover_refused():
                continue
            log.info("%s: %s", signal.Signals(signum).name,
                     "trying again" if signum == signal.SIGHUP else "giving the tree up")
            return signum == signal.SIGHUP
    return False


def _handover_refused() -> bool:
    """A SIGHUP's probe (fdstore.handover_refused), before anything is stopped: where no one
    could take the descriptors over, the restart is refused with a log line and the daemon
    goes on as it was, never exiting with devices in use."""
    why = fdstore.handover_refused()
    if why is not None:
        log.warning("SIGHUP refused, going on as before: %s", why)
    return why is not None


async def _shutdown(opts: Options, session: _fuse.Session, bridge: TrioBridge,
                    devices: Devices, undo: list[tuple[str, Callable[[], None]]],
                    loop_done: trio.Event) -> None:
    fdstore.notify("STOPPING=1")
    failed = await uses.undo_all(undo)
    await uses.wait_for_holders(opts.mountpoint, opts.force_after, devices, failed)
    await devices.remove_all()
    bridge.close()
    await trio.to_thread.run_sync(session.exit)     # the engine's loop ends by itself
    await loop_done.wait()
