"""Device files in use: bound to loop devices with direct I/O, with swap or a file system on
them. Used by the daemon (config set-up and tear-down) and by `zramfs swapon/swapoff`.

Direct I/O matters twice: the kernel keeps no page-cache copy of the compressed device, and
the loop driver passes discard on as fallocate punch-hole, so freed blocks free memory.
These call util-linux and e2fsprogs; each failure is a `UseError` with the tool's own words.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path


class UseError(Exception):
    """A command setting up or tearing down a use of a device failed."""


def _run(*cmd: str, timeout: float = 600) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UseError(f"{cmd[0]}: not installed") from None
    except subprocess.TimeoutExpired:
        raise UseError(f"{' '.join(cmd)}: no answer in {timeout:.0f} s") from None
    if out.returncode != 0:
        why = (out.stderr or out.stdout).strip().splitlines()
        raise UseError(f"{' '.join(cmd)}: {why[-1] if why else f'exit {out.returncode}'}")
    return out.stdout


def loops_of(path: Path) -> list[str]:
    """Loop devices bound to `path`."""
    found = []
    for back in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if back.read_text().strip() == str(path):
                found.append(f"/dev/{back.parent.parent.name}")
        except OSError:
            continue
    return sorted(found)


def bind(path: Path) -> str:
    return _run("losetup", "--direct-io=on", "--find", "--show", str(path)).strip()


def unbind(loop: str) -> None:
    _run("losetup", "--detach", loop)


def swaps() -> dict[str, int]:
    """Active swap devices and their priorities."""
    lines = Path("/proc/swaps").read_text().splitlines()[1:]
    return {f[0]: int(f[4]) for f in (line.split() for line in lines)}


def mounts() -> dict[str, str]:
    """Block device -> where it is mounted (the first mount)."""
    found: dict[str, str] = {}
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, where = line.split()[:2]
        found.setdefault(dev, where.replace("\\040", " "))
    return found


def use_of(path: Path) -> str:
    """What a device file serves, as zramctl's MOUNTPOINT column: [SWAP], a mount point, or
    the empty string."""
    active_swaps, active_mounts = swaps(), mounts()
    for loop in loops_of(path):
        if loop in active_swaps:
            return "[SWAP]"
        if loop in active_mounts:
            return active_mounts[loop]
    return ""


def swapon(loop: str, priority: int, options: str = "discard") -> None:
    _run("mkswap", "--quiet", loop)
    flags = []
    rest = []
    for opt in filter(None, (o.strip() for o in options.split(","))):
        if opt == "discard" or opt.startswith("discard="):
            flags.append("--" + opt)
        else:
            rest.append(opt)
    if rest:
        flags += ["--options", ",".join(rest)]
    _run("swapon", *flags, "--priority", str(priority), loop)


def swapoff(loop: str) -> None:
    # Every swapped page is read back through the device: the daemon must still be serving.
    _run("swapoff", loop, timeout=3600)


def mkfs_and_mount(loop: str, fs_type: str, mount_point: Path, options: str) -> None:
    quiet = ["-q"] if fs_type.startswith("ext") else []
    _run(f"mkfs.{fs_type}", *quiet, loop)
    try:
        os.makedirs(mount_point, exist_ok=True)
    except OSError as e:
        raise UseError(f"cannot make mount point {mount_point}: {e.strerror}") from None
    _run("mount", "-t", fs_type, *(["-o", options] if options else []), loop, str(mount_point))


def umount(mount_point: Path) -> None:
    _run("umount", str(mount_point))


def holders(path: Path) -> list[str]:
    """Who holds a device file open: loop devices and processes, for a log line."""
    found = [f"{loop} ({use_of(path) or 'bound'})" for loop in loops_of(path)]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == str(path):
                    comm = (proc / "comm").read_text().strip()
                    found.append(f"pid {proc.name} ({comm})")
                    break
        except OSError:
            continue
    return found
