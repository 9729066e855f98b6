"""The keeper (keeper.h): a process sharing the daemon's memory, so that what the daemon
locked stays locked across its death until a successor has taken it over."""

cdef extern from "service/keeper.h":
    int keeper_start(long grace)


def start(long grace) -> int:
    """Starts a keeper for this process; its pid. OSError where it cannot (ENOSYS on an
    architecture without it)."""
    cdef int rc = keeper_start(grace)
    if rc < 0:
        raise OSError(-rc, "cannot start the memory keeper")
    return rc
