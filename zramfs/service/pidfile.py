"""The pid file `zramfs restart` reads to find whom to send SIGHUP: the supervisor's pid, or
the daemon's own where it has no supervisor (under systemd there is none: systemctl reload).

    write_pid_file(Path("/run/zramfs"), os.getpid())
    read_pid_file(Path("/run/zramfs"))     # None once stale

The trio thread and the supervisor's loop call these; each is a few small file operations.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

PID_DIR = Path("/run/zramfs-pid")


def pid_file(mountpoint: Path) -> Path:
    """Where the pid to send SIGHUP to for a graceful restart of the daemon serving
    `mountpoint` is kept: the supervisor's, or the daemon's own where it has none. The name
    is the mountpoint escaped as systemd-escape --path does."""
    path = str(mountpoint).strip("/") or "-"
    name = "".join(c if c.isalnum() or c in "_." else "-" if c == "/" else f"\\x{ord(c):02x}"
                   for c in path)
    return PID_DIR / f"{name}.pid"


def write_pid_file(mountpoint: Path, pid: int) -> None:
    path = pid_file(mountpoint)
    try:
        path.parent.mkdir(mode=0o755, exist_ok=True)
        tmp = path.with_name(path.name + ".new")
        tmp.write_text(f"{pid}\n")
        tmp.replace(path)
    except OSError as e:
        log.warning("cannot write %s: %s (zramfs restart will not find this daemon)",
                    path, e.strerror)


def remove_pid_file(mountpoint: Path, pid: int) -> None:
    """Removes the pid file if it still names `pid` (a newer daemon may have written it)."""
    if read_pid_file(mountpoint, check=False) == pid:
        pid_file(mountpoint).unlink(missing_ok=True)


def read_pid_file(mountpoint: Path, check: bool = True) -> int | None:
    """The pid in `mountpoint`'s pid file; None if there is none or (with `check`) it is
    stale: the file of a daemon killed before it could remove it, whose pid now names no
    zramfs process, or one started after the file was written (a reused pid)."""
    path = pid_file(mountpoint)
    try:
        pid = int(path.read_text())
        if check:
            if b"zramfs" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return None
            ticks = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
            boot = next(int(line.split()[1]) for line in open("/proc/stat")
                        if line.startswith("btime "))
            if boot + ticks / os.sysconf("SC_CLK_TCK") > path.stat().st_mtime + 1:
                return None
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return pid
