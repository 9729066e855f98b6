"""Live restart: the tree's FUSE connection outlives the daemon (docs/design.md, "Live
restart"). The tests play the service manager as systemd does (a NOTIFY_SOCKET receiving
FDSTORE descriptors; the next daemon started with LISTEN_FDS), and run `zramfs daemon`'s
own supervisor as `make run` does.

What survives: the mount, its inode numbers, device files opened before the restart, the
requests in flight (FUSE_NOTIFY_RESEND), and the devices with their settings and pages (the
device record and each device's table and pool, kept in memfds: zramfs.sysfs.record).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (PAGE, ZRAMFS, Cleanup, is_mounted, requires_fuse, run, start_daemon,
                      uring_unavailable, wait_for, zramfs_daemon)
from manager import (FUSE_HAS_RESEND, Call, Manager, alive, children, servings, stop,
                     stuck_request)
from zramfs.service import loop
from zramfs.service.pidfile import pid_file

pytestmark = requires_fuse


def test_a_daemon_killed_hands_the_tree_to_the_next_through_the_fd_store(
        tmp_path: Path, cleanup: Cleanup) -> None:
    mgr = Manager(cleanup)
    with zramfs_daemon("--default-device", env=mgr.env(), tmp=tmp_path) as d:
        mgr.wait(lambda: {"fuse", "fuse-init"} <= mgr.store.keys() and mgr.said("READY=1"),
                 "the connection stored and READY")
        init = json.loads(os.pread(mgr.store["fuse-init"], 4096, 0))
        assert init["major"] == 7 and init["max_write"] >= 4096, init
        if not init["offered"] & FUSE_HAS_RESEND:
            pytest.skip("the kernel has no FUSE_NOTIFY_RESEND (Linux 6.9+)")
        attr_ino = os.stat(d.sys("zram0", "disksize")).st_ino
        dev = os.open(d.dev("zram0"), os.O_RDWR)
        closed = [False]
        d.cleanup.push("close zram0", lambda: closed[0] or os.close(dev))
        os.pwrite(dev, b"\xa5" * PAGE, 0)

        name, in_flight = stuck_request(d, tmp_path)

        d.proc.kill()
        d.proc.wait(10)
        assert is_mounted(d.mnt)
        # Requests made while no daemon runs wait in the kernel.
        read_late = Call(lambda: os.pread(dev, PAGE, 0))
        attr_late = Call(lambda: d.read("zram0", "disksize"))
        time.sleep(0.5)
        assert not (in_flight.done or read_late.done or attr_late.done)

        d.proc = start_daemon(d.mnt, d.log, "--default-device", env=mgr.env(),
                              listen_fds=list(mgr.store.items()))
        try:
            wait_for(lambda: servings(d) == 2 or not d.alive(), 60, "the next daemon to serve")
        except AssertionError:
            raise AssertionError(f"the next daemon did not serve:\n{d.log.read_text()}")
        assert d.alive(), d.log.read_text()
        assert "adopted the FUSE connection" in d.log.read_text()
        assert read_late.result(10) == b"\xa5" * PAGE    # the page, kept across the kill
        assert int(attr_late.result(10)) > 0
        # The write the killed daemon had read was resent, with bit 63 in its unique, and
        # answered by the new daemon, which never opened that handle: EBADF, not a hang.
        with pytest.raises(OSError) as e:
            in_flight.result(10)
        assert e.value.errno == errno.EBADF
        assert sorted(os.listdir(d.mnt / "dev")) == ["zram0", name]
        assert d.read(name, "comp_algorithm").split().count("[zstd]") == 1
        assert os.stat(d.sys("zram0", "disksize")).st_ino == attr_ino
        os.pwrite(dev, b"\x5a" * PAGE, PAGE)
        assert os.pread(dev, PAGE, PAGE) == b"\x5a" * PAGE

        # A normal stop: unmounted, and nothing left in the store for another daemon. The file
        # opened under the first daemon counts for the second (the device record): the stop
        # waits for it to be closed, as for any holder.
        os.close(dev)
        closed[0] = True
        time.sleep(0.5)
        d.proc.send_signal(signal.SIGTERM)
        try:
            mgr.wait(lambda: d.proc.poll() is not None, "the daemon to stop", 60)
            assert d.proc.wait(1) == 0, d.log.read_text()
        except (AssertionError, subprocess.TimeoutExpired):
            d.proc.send_signal(signal.SIGUSR1)          # its threads' stacks, into the log
            time.sleep(1)
            raise AssertionError(f"the daemon did not stop:\n{d.log.read_text()}") from None
        assert not is_mounted(d.mnt)
        mgr.wait(lambda: not mgr.store, "FDSTOREREMOVE of everything kept")


def test_the_supervisor_restarts_the_daemon_and_keeps_the_tree(tmp_path: Path) -> None:
    """`zramfs daemon` as `make run` starts it: SIGKILL of the serving child, SIGHUP to the
    supervisor, `zramfs restart`, each time the tree serves on; SIGTERM stops everything."""
    seen: set[int] = set()
    with zramfs_daemon("--default-device", tmp=tmp_path, supervised=True) as d:
        sup = d.proc

        def serving_child(count: int) -> int:
            wait_for(lambda: servings(d) >= count and len(children(sup.pid)) == 1, 60,
                     f"daemon {count} to serve")
            pid, = children(sup.pid)
            seen.add(pid)
            return pid

        first = serving_child(1)
        dev = os.open(d.dev("zram0"), os.O_RDWR)
        closed = [False]
        d.cleanup.push("close zram0", lambda: closed[0] or os.close(dev))
        data = os.urandom(PAGE // 2) * 2
        os.pwrite(dev, data, 0)

        os.kill(first, signal.SIGKILL)
        second = serving_child(2)
        assert second != first
        assert "daemon killed by SIGKILL; restarting it with " in d.log.read_text()
        assert os.pread(dev, PAGE, 0) == data
        assert os.listdir(d.mnt / "dev") == ["zram0"]

        sup.send_signal(signal.SIGHUP)
        third = serving_child(3)
        assert third != second and not alive(second)
        log = d.log.read_text()
        assert "SIGHUP: graceful restart" in log and "daemon handed over" in log
        assert int(d.read("zram0", "disksize")) > 0

        out = run(*ZRAMFS, "restart", "--mountpoint", str(d.mnt))
        assert f"pid {sup.pid}" in out.stdout
        fourth = serving_child(4)
        assert fourth != third
        assert os.pread(dev, PAGE, 0) == data

        # Open files count across restarts: the stop waits for them, as for any holder.
        os.close(dev)
        closed[0] = True
        time.sleep(0.5)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0, d.log.read_text()
        assert not is_mounted(d.mnt)
        out = run(*ZRAMFS, "restart", "--mountpoint", str(d.mnt), check=False)
        assert out.returncode == 1 and "no running daemon" in out.stderr
    assert not any(alive(pid) for pid in seen)


def test_sighup_without_a_supervisor_executes_the_daemon_anew(tmp_path: Path) -> None:
    """As under systemd (ExecReload=kill -HUP $MAINPID): the same pid serves on."""
    with zramfs_daemon("--default-device", tmp=tmp_path) as d:
        dev = os.open(d.dev("zram0"), os.O_RDWR)
        d.cleanup.push("close zram0", lambda: os.close(dev))
        data = os.urandom(PAGE // 2) * 2
        os.pwrite(dev, data, PAGE)
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: servings(d) == 2 or not d.alive(), 60, "the daemon to serve again")
        assert d.alive()
        log = d.log.read_text()
        assert "handed over" in log and "adopted the FUSE connection" in log
        assert os.pread(dev, PAGE, PAGE) == data


def test_a_graceful_restart_does_not_wait_for_a_stuck_request(tmp_path: Path) -> None:
    """A request that does not finish within the grace period (a dict= path on a file system
    that does not answer) is left to the next daemon, which gets it again (RESEND) and
    answers it."""
    with zramfs_daemon("--default-device", tmp=tmp_path) as d:
        _, stuck = stuck_request(d, tmp_path)
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: servings(d) == 2 or not d.alive(), 60, "the daemon to serve again")
        assert d.alive(), d.log.read_text()
        assert "handing over without their answers" in d.log.read_text()
        with pytest.raises(OSError) as e:
            stuck.result(10)
        assert e.value.errno == errno.EBADF         # the new daemon's answer, not a hang
        assert int(d.read("zram0", "disksize")) > 0


def test_after_a_restart_sigterm_takes_down_the_swap_and_mount_set_up_before(
        tmp_path: Path) -> None:
    """The config's swap and ext4 were set up by the first daemon; the second (after SIGHUP)
    leaves them as they are, and its SIGTERM undoes them as the first would have."""
    fs = tmp_path / "fs"
    conf = tmp_path / "zramfs.conf"
    conf.write_text(f"[zram0]\nzram-size = 64\n\n"
                    f"[zram1]\nzram-size = 64\nfs-type = ext4\nmount-point = {fs}\n")
    with zramfs_daemon("--config", str(conf), tmp=tmp_path) as d:
        [swap_loop] = loop.loops_of(d.dev("zram0"))
        [fs_loop] = loop.loops_of(d.dev("zram1"))
        (fs / "kept").write_text("across the restart\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: servings(d) == 2 or not d.alive(), 60, "the daemon to serve again")
        assert d.alive(), d.log.read_text()
        # The same loop devices: nothing set up twice.
        assert loop.loops_of(d.dev("zram0")) == [swap_loop]
        assert loop.loops_of(d.dev("zram1")) == [fs_loop]
        assert (fs / "kept").read_text() == "across the restart\n"
        d.proc.terminate()
        assert d.proc.wait(60) == 0, d.log.read_text()
        assert swap_loop not in loop.swaps()
        assert not is_mounted(fs) and not is_mounted(d.mnt)
        assert not loop.loops_of(d.dev("zram0")) and not loop.loops_of(d.dev("zram1"))
        log = d.log.read_text()
        restarted = log.index("adopted the FUSE connection")
        assert log.index(f"swapoff {swap_loop}", restarted) < log.index("zram0: reset", restarted)
        assert log.index(f"umount {fs}", restarted) < log.index(f"losetup -d {fs_loop}",
                                                                restarted)


def test_kept_state_refused_is_held_until_told_to_try_again_or_give_up(
        tmp_path: Path, cleanup: Cleanup) -> None:
    """A daemon that cannot adopt the kept state (here: a table whose magic is not ours)
    says why, serves nothing and keeps it all, the tree mounted and its requests waiting.
    SIGHUP tries again (the state mended, it adopts: nothing was lost); SIGTERM gives up."""
    mgr = Manager(cleanup)
    with zramfs_daemon("--default-device", env=mgr.env(), tmp=tmp_path) as d:
        mgr.wait(lambda: any(n.endswith(".table") for n in mgr.store) and mgr.said("READY=1"),
                 "the device's table stored and READY")
        data = os.urandom(PAGE // 4) * 4
        dev = os.open(d.dev("zram0"), os.O_RDWR)
        os.pwrite(dev, data, 3 * PAGE)
        os.close(dev)
        [table] = [fd for name, fd in mgr.store.items() if name.endswith(".table")]
        magic = os.pread(table, 8, 0)

        def restart_refused(times: int) -> None:
            os.pwrite(table, b"notours!", 0)
            d.proc.kill()
            d.proc.wait(10)
            mgr.pump()
            d.proc = start_daemon(d.mnt, d.log, "--default-device", env=mgr.env(),
                                  listen_fds=list(mgr.store.items()))
            mgr.wait(lambda: d.log.read_text().count("ERROR: holding ") == times
                     or not d.alive(), "the daemon to refuse and hold")

        restart_refused(1)
        kept = set(mgr.store)
        log = d.log.read_text()
        assert "cannot adopt the kept state" in log and "table" in log, log
        assert d.alive() and is_mounted(d.mnt)
        waiting = Call(lambda: os.stat(d.dev("zram0")).st_size)
        time.sleep(0.5)
        assert not waiting.done                      # held, not failed
        os.pwrite(table, magic, 0)                   # mended (as by a fixed daemon)
        d.proc.send_signal(signal.SIGHUP)
        mgr.wait(lambda: servings(d) == 2 or not d.alive(), "the daemon to try again")
        assert d.alive(), d.log.read_text()
        assert waiting.result(10) > 0
        dev = os.open(d.dev("zram0"), os.O_RDONLY)
        assert os.pread(dev, PAGE, 3 * PAGE) == data
        os.close(dev)
        assert {n for n in mgr.store if not n.startswith("zram")} == \
            {n for n in kept if not n.startswith("zram")}

        # Refused again, and told to give up: unmounted, and nothing left kept.
        [table] = [fd for name, fd in mgr.store.items() if name.endswith(".table")]
        restart_refused(2)
        d.proc.terminate()
        mgr.wait(lambda: d.proc.poll() is not None, "the daemon to give up")
        assert d.proc.wait(1) == 65, d.log.read_text()
        assert not is_mounted(d.mnt)
        mgr.wait(lambda: not mgr.store, "FDSTOREREMOVE of everything kept")


def test_a_changed_config_applies_at_restart_only_to_devices_not_in_use(
        tmp_path: Path) -> None:
    """The config is read again at a restart. Both devices' algorithm changed: zram0, swap
    in use, keeps its settings (the log says what it left); zram1, its swap taken down by
    hand, is set up as the config now says, swap and all. SIGTERM then undoes both."""
    conf = tmp_path / "zramfs.conf"
    config = "[zram0]\nzram-size = 64\n\n[zram1]\nzram-size = 64\n"
    conf.write_text(config)
    with zramfs_daemon("--config", str(conf), tmp=tmp_path) as d:
        [kept_loop] = loop.loops_of(d.dev("zram0"))
        [old_loop] = loop.loops_of(d.dev("zram1"))
        loop.swapoff(old_loop)
        loop.unbind(old_loop)
        conf.write_text(config.replace("zram-size = 64\n",
                                       "zram-size = 64\ncompression-algorithm = zstd\n"))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: servings(d) == 2 or not d.alive(), 60, "the daemon to serve again")
        assert d.alive(), d.log.read_text()
        log = d.log.read_text()
        assert ("zram0: adopted as it was, in use: the config's comp_algorithm=zstd apply "
                "after a reset") in log, log
        assert "zram1: not in use, and the config now says comp_algorithm=zstd" in log, log
        assert "[lz4]" in d.read("zram0", "comp_algorithm")
        assert "[zstd]" in d.read("zram1", "comp_algorithm")
        assert loop.loops_of(d.dev("zram0")) == [kept_loop]
        [new_loop] = loop.loops_of(d.dev("zram1"))
        assert new_loop in loop.swaps()
        d.proc.terminate()
        assert d.proc.wait(60) == 0, d.log.read_text()
        assert not loop.loops_of(d.dev("zram0")) and not loop.loops_of(d.dev("zram1"))


def test_a_second_daemon_refused_on_the_same_mountpoint_touches_nothing_of_the_first(
        tmp_path: Path) -> None:
    """A second `zramfs daemon` on a mountpoint in use, with its supervisor or without, is
    refused and leaves the first as it was: its pid file (`zramfs restart` still finds it),
    its tree and its pages."""
    with zramfs_daemon("--default-device", tmp=tmp_path, supervised=True) as d:
        sup = d.proc
        data = os.urandom(PAGE // 2) * 2
        dev = os.open(d.dev("zram0"), os.O_RDWR)
        try:
            os.pwrite(dev, data, 0)
        finally:
            os.close(dev)
        # Written once the daemon says READY=1, just after its "serving" line.
        wait_for(lambda: pid_file(d.mnt).exists(), 10, "the supervisor's pid file")
        before = pid_file(d.mnt).read_text()
        assert before == f"{sup.pid}\n"
        for extra in ([], ["--no-supervisor"]):
            second = run(*ZRAMFS, "daemon", "--mountpoint", str(d.mnt), "--default-device",
                         *extra, check=False, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})
            assert second.returncode != 0, second.stderr
            assert "already a mount point" in second.stderr, second.stderr
            assert pid_file(d.mnt).read_text() == before, extra
        out = run(*ZRAMFS, "restart", "--mountpoint", str(d.mnt))
        assert f"pid {sup.pid}" in out.stdout
        wait_for(lambda: servings(d) == 2 or sup.poll() is not None, 60,
                 "the first daemon to restart")
        assert sup.poll() is None, d.log.read_text()
        dev = os.open(d.dev("zram0"), os.O_RDONLY)
        try:
            assert os.pread(dev, PAGE, 0) == data
        finally:
            os.close(dev)


def test_sighup_with_the_supervisor_gone_is_refused_and_the_daemon_serves_on(
        tmp_path: Path, cleanup: Cleanup) -> None:
    """The supervisor killed, its child serves on; a SIGHUP then has nobody to hand over to:
    the daemon says so and keeps serving, the tree and the pages as they were. SIGTERM
    still stops it cleanly."""
    with zramfs_daemon("--default-device", tmp=tmp_path, supervised=True) as d:
        sup = d.proc
        wait_for(lambda: len(children(sup.pid)) == 1, 30, "the serving child")
        [child] = children(sup.pid)
        cleanup.push("the orphaned daemon killed", lambda: alive(child) and
                     os.kill(child, signal.SIGKILL))
        data = os.urandom(PAGE // 2) * 2
        dev = os.open(d.dev("zram0"), os.O_RDWR)
        closed = [False]
        d.cleanup.push("close zram0", lambda: closed[0] or os.close(dev))
        os.pwrite(dev, data, 5 * PAGE)

        sup.kill()
        sup.wait(10)
        assert alive(child) and os.pread(dev, PAGE, 5 * PAGE) == data
        os.kill(child, signal.SIGHUP)
        wait_for(lambda: "SIGHUP refused" in d.log.read_text() or not alive(child), 30,
                 "the daemon to refuse the SIGHUP")
        time.sleep(0.5)
        assert alive(child), d.log.read_text()
        log = d.log.read_text()
        assert f"SIGHUP refused, going on as before: the supervisor (pid {sup.pid}) is gone" \
            in log, log
        assert "handed over" not in log
        assert is_mounted(d.mnt)
        assert os.pread(dev, PAGE, 5 * PAGE) == data
        os.pwrite(dev, data[::-1], 6 * PAGE)
        assert os.pread(dev, PAGE, 6 * PAGE) == data[::-1]
        assert int(d.read("zram0", "disksize")) > 0

        os.close(dev)
        closed[0] = True
        os.kill(child, signal.SIGTERM)
        wait_for(lambda: not alive(child), 60, "the daemon to stop")
        assert not is_mounted(d.mnt)


def test_the_metrics_port_taken_during_a_restart_costs_no_device(tmp_path: Path) -> None:
    """Whoever binds the metrics port in the gap of a `zramfs restart` only delays the
    metrics: the new daemon serves every device with its pages, says why there are no
    metrics yet, and serves them once the port is free again."""
    import socket
    from urllib.request import urlopen

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with zramfs_daemon("--default-device", "--metrics", f"127.0.0.1:{port}", tmp=tmp_path,
                       supervised=True) as d:
        sup = d.proc
        name = d.device("64M")
        data = os.urandom(PAGE // 2) * 2
        for dev_name in ("zram0", name):
            fd = os.open(d.dev(dev_name), os.O_RDWR)
            try:
                os.pwrite(fd, data, 7 * PAGE)
            finally:
                os.close(fd)
        wait_for(lambda: pid_file(d.mnt).exists(), 10, "the supervisor's pid file")
        assert b"zramfs_requests_total" in urlopen(f"http://127.0.0.1:{port}/metrics",
                                                   timeout=10).read()

        taker = socket.socket()
        # As the daemon's own listener: past the TIME_WAIT of the scrape above.
        taker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            run(*ZRAMFS, "restart", "--mountpoint", str(d.mnt))

            def take() -> bool:
                try:
                    taker.bind(("127.0.0.1", port))
                except OSError:
                    return False
                taker.listen()
                return True
            wait_for(take, 30, "the old daemon to let the port go")
            wait_for(lambda: servings(d) == 2 or sup.poll() is not None, 60,
                     "the next daemon to serve")
            assert sup.poll() is None, d.log.read_text()
            log = d.log.read_text()
            assert (f"metrics 127.0.0.1:{port}: cannot listen: Address already in use"
                    in log), log
            assert sorted(os.listdir(d.mnt / "dev")) == sorted(["zram0", name])
            for dev_name in ("zram0", name):
                fd = os.open(d.dev(dev_name), os.O_RDONLY)
                try:
                    assert os.pread(fd, PAGE, 7 * PAGE) == data, dev_name
                finally:
                    os.close(fd)
        finally:
            taker.close()

        def scraped() -> bool:
            try:
                return b"zramfs_disksize_bytes" in urlopen(
                    f"http://127.0.0.1:{port}/metrics", timeout=2).read()
            except OSError:
                return False
        wait_for(scraped, 30, "the metrics once the port is free")
        assert d.log.read_text().count(f"metrics on http://127.0.0.1:{port}/metrics") == 2
def test_the_kernels_other_algorithms_are_kept_across_a_kill(tmp_path: Path,
                                                             cleanup: Cleanup) -> None:
    """Devices compressed with lzo-rle, lzo and deflate (level 9) keep their algorithm,
    level and every page across a SIGKILL."""
    mgr = Manager(cleanup)
    with zramfs_daemon(env=mgr.env(), tmp=tmp_path) as d:
        want = {}
        for algorithm in ("lzo-rle", "lzo", "deflate"):
            name = d.hot_add()
            d.write(name, "comp_algorithm", algorithm)
            if algorithm == "deflate":
                d.write(name, "algorithm_params", "level=9")
            d.write(name, "disksize", "16M")
            data = b"".join(b"%s page %06d " % (algorithm.encode(), i) * 200 + os.urandom(600)
                            for i in range(512))
            data = b"".join(data[i:i + PAGE].ljust(PAGE, b"-")
                            for i in range(0, len(data), PAGE))[:512 * PAGE]
            with open(d.dev(name), "r+b") as f:
                f.write(data)
            want[name] = (algorithm, data, d.mm_stat(name)[:2])
        mgr.wait(lambda: all(any(n.startswith(f"{name}.") for n in mgr.store) for name in want),
                 "the devices kept")
        d.proc.kill()
        d.proc.wait(10)
        d.proc = start_daemon(d.mnt, d.log, env=mgr.env(), listen_fds=list(mgr.store.items()))
        mgr.wait(lambda: servings(d) == 2 or not d.alive(), "the next daemon to serve", 60)
        assert d.alive(), d.log.read_text()
        for name, (algorithm, data, stat) in want.items():
            assert f"[{algorithm}]" in d.read(name, "comp_algorithm").split()
            assert d.mm_stat(name)[:2] == stat
            with open(d.dev(name), "rb") as f:
                assert f.read(len(data)) == data, name
        stop(d, mgr)


@requires_fuse
def test_on_io_uring_sighup_is_refused_and_a_crash_loses_the_tree(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The README's transport table, io_uring's row: a graceful restart is refused (SIGHUP
    logged and ignored, the device serves on with its pages), and a crash takes the tree with
    it (ECONNABORTED): nothing is kept for a next daemon, as docs/fuse-protocol.md §5.1 says why."""
    reason = uring_unavailable()
    if reason:
        pytest.skip(reason)
    request.getfixturevalue("uring_param_restored")
    with zramfs_daemon(tmp=tmp_path, transport="io_uring") as d:
        name = d.device("16M")
        data = os.urandom(64 * PAGE)
        with open(d.dev(name), "r+b", buffering=0) as f:
            f.write(data)
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "no graceful restart on the io_uring transport" not in d.log.read_text():
            assert time.monotonic() < deadline, d.log.read_text()
            time.sleep(0.05)
        assert d.proc.poll() is None
        with open(d.dev(name), "rb", buffering=0) as f:
            assert f.read(len(data)) == data
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(30)
        with pytest.raises(OSError) as e:
            os.stat(d.dev(name))
        assert e.value.errno == errno.ECONNABORTED      # the kernel aborted the connection
        run("fusermount3", "-u", "-z", str(d.mnt), timeout=30)
