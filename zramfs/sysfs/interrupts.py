"""Which attribute store a signalled writer stops (a FUSE INTERRUPT): a long one registers what
stops it under the request it serves, and the daemon delivers the kernel's INTERRUPT there.
A request is named by the ident of the FUSE thread serving it, which the daemon's bridge sets
in REQUEST for the store's trio task.

    with interrupts.stoppable(dev.cancel_tiering):   # in a store that may run long
        await job()
    interrupts.deliver(thread)                       # trio thread: that writer was signalled
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

REQUEST: contextvars.ContextVar[int | None] = contextvars.ContextVar("zramfs_request",
                                                                     default=None)
_stoppers: dict[int, Callable[[], None]] = {}


@contextlib.contextmanager
def stoppable(stop: Callable[[], None]) -> Iterator[None]:
    """While the body runs, an INTERRUPT of the current request calls `stop()`."""
    request = REQUEST.get()
    if request is None:                 # not a request (a periodic job): nothing to interrupt
        yield
        return
    _stoppers[request] = stop
    try:
        yield
    finally:
        _stoppers.pop(request, None)


def deliver(request: int) -> None:
    """The writer of `request` was signalled: what stops its store, if it registered one."""
    stop = _stoppers.get(request)
    if stop is not None:
        stop()
