"""The `zramfs` command. Every error is one line on stderr and a non-zero exit status
(1, or 2 for usage), never a traceback."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import trio

from zramfs import daemon

log = logging.getLogger("zramfs")


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_device() -> daemon.DeviceSpec:
    """The embedded default: zram0, lz4, a quarter of RAM."""
    return daemon.DeviceSpec(disksize=ram_bytes() // 4 // 4096 * 4096, algorithm="lz4")


def cmd_daemon(args: argparse.Namespace) -> int:
    specs = [default_device()] if args.default_device else []
    trio.run(daemon.serve, Path(args.mountpoint), specs)
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zramfs", description="zram in userspace, through FUSE")
    ap.add_argument("--log-level", default="info",
                    choices=("debug", "info", "warning", "error"), help="default: info")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("daemon", help="mount the tree and serve it until SIGTERM/SIGINT")
    d.add_argument("--mountpoint", default=str(daemon.DEFAULT_MOUNTPOINT),
                   help=f"where to mount the tree (default {daemon.DEFAULT_MOUNTPOINT})")
    d.add_argument("--default-device", action="store_true",
                   help="set up zram0 (lz4, a quarter of RAM) at start")
    d.set_defaults(func=cmd_daemon)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="zramfs: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except daemon.DaemonError as e:
        print(f"zramfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
