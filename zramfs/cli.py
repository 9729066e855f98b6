"""The `zramfs` command. Every error is one line on stderr and exit status 1 (2 for usage),
never a traceback.

    zramfs daemon [--mountpoint DIR] [--config FILE] [--default-device] [--no-supervisor]
    zramfs restart [--mountpoint DIR]
    zramfs ctl [NAME] [--find] [--size SIZE] [--algorithm ALG] [--reset] [--output COLS]
               [--bytes] [--raw] [--json]
    zramfs swapon NAME [--priority N]  /  zramfs swapoff NAME
    zramfs stats [NAME]
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path

import trio

from zramfs import ctl
from zramfs.service import config, daemon, fdstore, pidfile
from zramfs.service.config import DeviceConfig

log = logging.getLogger("zramfs")


def ram_mib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 20)


def default_device() -> DeviceConfig:
    """The embedded default: zram0, lz4, a quarter of RAM, no swap or file system on it."""
    return DeviceConfig("zram0", disksize=int(ram_mib() / 4) << 20, fs_type=None)


def cmd_daemon(args: argparse.Namespace) -> int:
    # SIGUSR1 writes every thread's stack to the log: what a stuck daemon is doing.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    mountpoint = Path(args.mountpoint or daemon.DEFAULT_MOUNTPOINT).absolute()
    if not args.no_supervisor and "NOTIFY_SOCKET" not in os.environ:
        # No service manager: become the small supervisor that keeps the tree across a
        # crash or an upgrade, and serve from a child it starts (zramfs/supervisor.py).
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "zramfs.supervisor",
                                  "--mountpoint", str(mountpoint),
                                  "--log-level", args.log_level, "--",
                                  sys.executable, "-m", "zramfs.cli", *args.argv])
    inherited = fdstore.listen_fds()
    devices = config.load(Path(args.config), ram_mib=ram_mib()) if args.config else []
    settings = config.load_daemon(Path(args.config)) if args.config else config.DaemonConfig()
    if args.default_device and not any(d.id == 0 for d in devices):
        devices.insert(0, default_device())
    opts = daemon.Options(mountpoint, devices, mlock=args.mlock,
                          force_after=args.force_after,
                          metrics=args.metrics or settings.metrics,
                          fuse_transport=(args.fuse_transport or settings.fuse_transport
                                          or "classic"),
                          inherited=inherited, argv=args.argv)
    handover = trio.run(daemon.serve, opts)
    if handover is not None:
        daemon.continue_in_next(opts, handover)
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    """A graceful restart of the daemon serving the tree: SIGHUP to the pid in its pid file
    (its supervisor's, or its own), which the daemon keeps while it serves."""
    mountpoint = Path(args.mountpoint).absolute() if args.mountpoint else ctl.mounted_tree()
    pid = pidfile.read_pid_file(mountpoint)
    if pid is None:
        raise ctl.CtlError(f"no running daemon is recorded for {mountpoint} "
                           f"({pidfile.pid_file(mountpoint)}); under systemd: "
                           "systemctl reload zramfs")
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        raise ctl.CtlError(f"pid {pid}: {e.strerror}") from None
    print(f"{mountpoint}: graceful restart of the daemon (pid {pid}) asked")
    return 0


def _mount(args: argparse.Namespace) -> ctl.Mount:
    """The tree named by --mountpoint, or the one zramfs tree mounted (from /proc/mounts)."""
    mount = ctl.Mount(Path(args.mountpoint) if args.mountpoint else ctl.mounted_tree())
    mount.check()
    return mount


def cmd_ctl(args: argparse.Namespace) -> int:
    mount = _mount(args)
    size = ctl.parse_size(args.size) if args.size else None
    if args.find:
        if args.device:
            raise ctl.CtlError("--find and a device name exclude each other")
        if size is None:
            raise ctl.CtlError("--find needs --size")
        print(ctl.find(mount, size, args.algorithm, args.algorithm_params))
        return 0
    if args.reset:
        if not args.device:
            raise ctl.CtlError("--reset needs a device name")
        for text in args.device:
            ctl.reset(mount, mount.name_of(text))
        return 0
    names = [mount.name_of(d) for d in args.device] or None
    if size or args.algorithm or args.algorithm_params:
        if not names or len(names) != 1:
            raise ctl.CtlError("setting up a device needs exactly one device name")
        ctl.configure(mount, names[0], size, args.algorithm, args.algorithm_params)
        return 0
    columns = list(ctl.COLUMNS) if args.output_all else ctl.columns(args.output)
    rows = ctl.status(mount, names)
    if rows or args.json:
        print(ctl.format_status(rows, columns, as_bytes=args.bytes, raw=args.raw,
                                as_json=args.json, headings=not args.noheadings))
    return 0


def cmd_swapon(args: argparse.Namespace) -> int:
    mount = _mount(args)
    print(ctl.swapon(mount, mount.name_of(args.device), args.priority))
    return 0


def cmd_swapoff(args: argparse.Namespace) -> int:
    mount = _mount(args)
    ctl.swapoff(mount, mount.name_of(args.device))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    mount = _mount(args)
    names = [mount.name_of(args.device)] if args.device else mount.names()
    print(ctl.stats(mount, names), end="")
    return 0


def cmd_writeback(args: argparse.Namespace) -> int:
    mount = _mount(args)
    return _long_run(ctl.writeback, mount, mount.name_of(args.device), args.mode, args.batch)


def cmd_recompress(args: argparse.Namespace) -> int:
    mount = _mount(args)
    return _long_run(ctl.recompress, mount, mount.name_of(args.device), " ".join(args.params),
                     args.batch)


def _long_run(fn, mount: ctl.Mount, name: str, what: str, batch: int) -> int:
    """A writeback or recompression in batches, progress on stderr; Ctrl-C stops it between
    two batches, with what was done kept."""
    try:
        fn(mount, name, what, batch, sys.stderr)
    except KeyboardInterrupt:
        print(f"zramfs: {name}: interrupted; what was done is kept", file=sys.stderr)
        return 130
    return 0


def cmd_train_dict(args: argparse.Namespace) -> int:
    mount = _mount(args)
    name = mount.name_of(args.device)
    data = ctl.train_dictionary(mount, name, args.size)
    try:
        Path(args.output).write_bytes(data)
    except OSError as e:
        raise ctl.CtlError(f"{args.output}: {e.strerror}") from None
    print(f"{args.output}: a {len(data)}-byte zstd dictionary from {name}'s pages")
    return 0


def dict_size(text: str) -> int:
    try:
        size = ctl.parse_size(text)
    except ctl.CtlError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not 256 <= size <= 16 << 20:
        raise argparse.ArgumentTypeError(f"{text}: a dictionary of 256 bytes to 16M")
    return size


def pages(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of pages")
    return int(text)


def priority(text: str) -> int:
    if not text.lstrip("-").isdigit() or not -1 <= int(text) <= 32767:
        raise argparse.ArgumentTypeError(f"{text!r} is not a swap priority in -1..32767")
    return int(text)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zramfs", description="zram in userspace, through FUSE")
    ap.add_argument("--log-level", default="info",
                    choices=("debug", "info", "warning", "error"), help="default: info")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--mountpoint", default=None,
                       help=f"the daemon's tree (the daemon's default {daemon.DEFAULT_MOUNTPOINT};"
                            " the other commands find it in /proc/mounts where only one is)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("daemon", parents=[where],
                       help="mount the tree and serve it until SIGTERM/SIGINT")
    d.add_argument("--config", metavar="FILE",
                   help=f"devices to set up, zram-generator style (e.g. {config.DEFAULT_PATH})")
    d.add_argument("--default-device", action="store_true",
                   help="set up zram0 (lz4, a quarter of RAM) unless the config has it")
    d.add_argument("--mlock", choices=("auto", "yes", "no"), default="auto",
                   help="lock the daemon's memory (auto: when a device is swap)")
    d.add_argument("--force-after", type=seconds, default=None, metavar="SECONDS",
                   help="at shutdown, free devices others still hold after this long "
                        "(default: serve them until they are released)")
    d.add_argument("--metrics", metavar="ADDR:PORT",
                   help="serve Prometheus metrics there (e.g. 127.0.0.1:9101)")
    d.add_argument("--no-supervisor", action="store_true",
                   help="without systemd, serve from this process: a crash then loses the "
                        "tree (default: a small parent keeps it and restarts the daemon)")
    d.add_argument("--fuse-transport", choices=config.FUSE_TRANSPORTS, default=None,
                   help="how requests reach the daemon: classic (/dev/fuse), io_uring "
                        "(Linux 6.14+; switches the fuse module's enable_uring on) or auto "
                        "(io_uring where the kernel has it). Default: the config's "
                        "fuse-transport, else classic")
    d.set_defaults(func=cmd_daemon)

    r = sub.add_parser("restart", parents=[where],
                       help="graceful restart of the daemon (an upgrade): the tree, swap and "
                            "mounts stay, I/O waits meanwhile")
    r.set_defaults(func=cmd_restart)

    c = sub.add_parser("ctl", parents=[where], help="zramctl: show, set up and reset devices")
    c.add_argument("device", nargs="*", help="zramN, or its path")
    c.add_argument("-f", "--find", action="store_true", help="set up a free device, print it")
    c.add_argument("-s", "--size", help="disksize, with K, M, G or T")
    c.add_argument("-a", "--algorithm", help="lzo-rle, lzo, lz4, lz4hc, zstd or deflate")
    c.add_argument("-p", "--algorithm-params", metavar="PARAMS", help="e.g. level=5")
    c.add_argument("-r", "--reset", action="store_true", help="reset the named devices")
    c.add_argument("-o", "--output", metavar="LIST",
                   help="columns (+LIST adds to the default ones): " + ",".join(ctl.COLUMNS))
    c.add_argument("--output-all", action="store_true", help="every column")
    c.add_argument("-t", "--streams", type=int, metavar="NUMBER",
                   help="accepted and ignored: streams are one per CPU, as in Linux 6.15+")
    c.add_argument("-b", "--bytes", action="store_true", help="sizes in bytes")
    c.add_argument("--raw", action="store_true", help="no alignment")
    c.add_argument("-n", "--noheadings", action="store_true", help="no header line")
    c.add_argument("-J", "--json", action="store_true", help="JSON output")
    c.set_defaults(func=cmd_ctl)

    s = sub.add_parser("swapon", parents=[where],
                       help="loop device with direct I/O, mkswap, swapon --discard")
    s.add_argument("device", help="zramN, or its path")
    s.add_argument("-p", "--priority", type=priority, default=100, help="swap priority (100)")
    s.set_defaults(func=cmd_swapon)
    s = sub.add_parser("swapoff", parents=[where], help="swapoff and detach the loop device")
    s.add_argument("device", help="zramN, or its path")
    s.set_defaults(func=cmd_swapoff)

    s = sub.add_parser("writeback", parents=[where],
                       help="write back pages of a type, in batches, with progress")
    s.add_argument("device", help="zramN, or its path")
    s.add_argument("mode", choices=list(ctl.PAGE_TYPES), help="the pages to write back")
    s.add_argument("--batch", type=pages, default=16384, help="pages a batch (16384: 64 MiB)")
    s.set_defaults(func=cmd_writeback)
    s = sub.add_parser("recompress", parents=[where],
                       help="recompress pages, in batches, with progress")
    s.add_argument("device", help="zramN, or its path")
    s.add_argument("params", nargs="+", help="as the recompress attribute: type=idle ...")
    s.add_argument("--batch", type=pages, default=16384, help="pages a batch (16384)")
    s.set_defaults(func=cmd_recompress)

    s = sub.add_parser("train-dict", parents=[where],
                       help="train a zstd dictionary on a device's stored pages")
    s.add_argument("device", help="zramN, or its path")
    s.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write it")
    s.add_argument("--size", type=dict_size, default=110 << 10, help="its size (110K)")
    s.set_defaults(func=cmd_train_dict)

    s = sub.add_parser("stats", parents=[where],
                       help="the allocator's per-class table and a summary")
    s.add_argument("device", nargs="?", help="zramN (default: all)")
    s.set_defaults(func=cmd_stats)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv              # as given: the daemon runs itself again with it
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="zramfs: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except daemon.StateRefused as e:
        print(f"zramfs: {e}", file=sys.stderr)
        return daemon.STATE_REFUSED_EXIT
    except (daemon.DaemonError, config.ConfigError, ctl.CtlError) as e:
        print(f"zramfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:           # `zramfs ctl | head`: the reader left, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
