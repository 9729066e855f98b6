"""Operations: config-driven start and stop, the CLI, the systemd unit, and swap safety."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zramfs import ctl as ctl_module

from conftest import (PAGE, ROOT, URING_PARAM, ZRAMFS, Cleanup, Daemon, is_mounted,
                      requires_fuse, run, uring_unavailable, zramfs_daemon)

pytestmark = requires_fuse


def zramfs(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([*ZRAMFS, *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert "Traceback" not in out.stderr, out.stderr
    if check:
        assert out.returncode == 0, out.stderr
    return out


def ctl(d: Daemon, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return zramfs("ctl", "--mountpoint", str(d.mnt), *args, check=check)


def loops_under(path: Path) -> list[str]:
    out = run("losetup", "-l", "-n", "-O", "NAME,BACK-FILE").stdout
    return [line.split()[0] for line in out.splitlines() if str(path) in line]


def swap_priority(dev: str) -> int | None:
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        f = line.split()
        if f[0] == dev:
            return int(f[4])
    return None


def test_config_brings_up_swap_and_ext4_and_sigterm_takes_them_down(
        tmp_path: Path, transport: str) -> None:
    fs = tmp_path / "fs"
    conf = tmp_path / "zramfs.conf"
    conf.write_text(f"""
[zram0]
zram-size = 256
compression-algorithm = zstd(level=3)
swap-priority = 1234

[zram1]
zram-size = 128
fs-type = ext4
mount-point = {fs}
options = discard,noatime
""")
    with zramfs_daemon("--config", str(conf), tmp=tmp_path, transport=transport) as d:
        [swap_loop] = [lo for lo in loops_under(d.dev("zram0"))]
        [fs_loop] = loops_under(d.dev("zram1"))
        assert swap_priority(swap_loop) == 1234
        assert is_mounted(fs)
        assert "noatime" in next(line for line in Path("/proc/mounts").read_text().splitlines()
                                 if line.split()[1] == str(fs))
        (fs / "hello").write_text("zram\n")
        table = ctl(d).stdout.splitlines()
        assert table[0].split() == ["NAME", "ALGORITHM", "DISKSIZE", "DATA", "COMPR", "TOTAL",
                                    "STREAMS", "MOUNTPOINT"]
        rows = {line.split()[0]: line.split() for line in table[1:]}
        assert rows[str(d.dev("zram0"))][1:3] == ["zstd", "256M"]
        assert rows[str(d.dev("zram0"))][-1] == "[SWAP]"
        assert rows[str(d.dev("zram1"))][1:3] == ["lz4", "128M"]
        assert rows[str(d.dev("zram1"))][-1] == str(fs)
        started = time.monotonic()
        d.proc.terminate()
        assert d.proc.wait(30) == 0, d.log.read_text()
        took = time.monotonic() - started
        assert swap_priority(swap_loop) is None
        assert not is_mounted(fs) and not is_mounted(d.mnt)
        assert not loops_under(d.mnt)
        log = d.log.read_text()
        assert log.index(f"umount {fs}") < log.index(f"losetup -d {fs_loop}")
        assert log.index(f"swapoff {swap_loop}") < log.index("zram0: reset")
        assert took < 30


def test_bad_config_is_one_line_and_sets_up_nothing(tmp_path: Path) -> None:
    conf = tmp_path / "zramfs.conf"
    conf.write_text("[zram0]\nzram-size = 64\nswap-priority = 5\ncolour = blue\n")
    mnt = tmp_path / "mnt"
    out = zramfs("daemon", "--mountpoint", str(mnt), "--config", str(conf), check=False)
    assert out.returncode == 1
    assert out.stderr.strip() == f"zramfs: {conf}:4: [zram0] colour: unknown key"
    assert not is_mounted(mnt)


def test_failed_set_up_undoes_what_was_done(tmp_path: Path) -> None:
    """zram1's file system cannot be made (mount-point is a file): zram0's swap, both loop
    devices and the tree are undone, and the daemon says why and exits 1."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    conf = tmp_path / "zramfs.conf"
    conf.write_text(f"[zram0]\nzram-size = 64\n\n[zram1]\nzram-size = 64\nfs-type = ext4\n"
                    f"mount-point = {blocker}\n")
    mnt = tmp_path / "mnt"
    swaps_before = Path("/proc/swaps").read_text()
    try:
        proc = subprocess.run([*ZRAMFS, "daemon", "--mountpoint", str(mnt), "--config",
                               str(conf)], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 1, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("zramfs: zram1: ") and "Traceback" not in proc.stderr, proc.stderr
        assert Path("/proc/swaps").read_text() == swaps_before
        assert not is_mounted(mnt) and not loops_under(mnt)
    finally:
        for lo in loops_under(mnt):
            run("swapoff", lo, check=False)
            run("losetup", "-d", lo, check=False)
        if is_mounted(mnt):
            run("fusermount3", "-u", "-z", str(mnt), check=False)


def test_ctl_find_configure_reset_and_formats(daemon: Daemon) -> None:
    path = ctl(daemon, "--find", "--size", "64M", "--algorithm", "zstd",
               "--algorithm-params", "level=7").stdout.strip()
    assert path == str(daemon.dev("zram0"))
    assert daemon.read("zram0", "disksize") == f"{64 << 20}\n"
    with open(path, "r+b") as f:
        f.write(b"compressible zram text " * 50000)
        f.write(bytes(4096 * 4))
    assert ctl(daemon, "--find", "-s", "1G").stdout.strip() == str(daemon.dev("zram1"))
    ctl(daemon, "zram1", "--reset")
    assert ctl(daemon, "--find", "-s", "8M").stdout.strip() == str(daemon.dev("zram1"))
    data = json.loads(ctl(daemon, "--json", "--bytes", "--output",
                          "name,disksize,data,compr,algorithm,streams,zero-pages,total,"
                          "mem-limit,mem-used,migrated,comp-ratio,mountpoint").stdout)
    row = data["zramdevices"][0]
    assert row["name"] == path and row["disksize"] == 64 << 20 and row["algorithm"] == "zstd"
    assert row["data"] > 1 << 20 and 0 < row["compr"] < row["data"] // 10
    assert row["zero-pages"] >= 4 and row["streams"] >= 1 and row["mountpoint"] == ""
    assert row["comp-ratio"] == round(row["data"] / row["compr"], 2)
    human = json.loads(ctl(daemon, "--json").stdout)["zramdevices"][0]
    assert human["disksize"] == "64M"
    raw = ctl(daemon, "--raw", "--noheadings", "-o", "NAME,DISKSIZE").stdout.splitlines()
    assert raw == [f"{path} 64M", f"{daemon.dev('zram1')} 8M"]
    ctl(daemon, "zram1", "--reset")
    ctl(daemon, "zram1", "--size", "16M", "--algorithm", "lz4hc")
    assert daemon.read("zram1", "comp_algorithm") == "lzo-rle lzo lz4 [lz4hc] zstd deflate \n"


@pytest.mark.parametrize("args,message", [
    (["--find"], "--find needs --size"),
    (["--find", "--size", "lots"], "invalid size 'lots'"),
    (["--find", "--size", "1G", "--algorithm", "lzo1x"], "lzo1x: unknown algorithm"),
    (["zram9"], "zram9: no such device"),
    (["--output", "NAME,COLOUR"], "unknown column 'COLOUR'"),
    (["--reset"], "--reset needs a device name"),
    (["zram0", "--size", "1G"], "zram0: device is in use"),
])
def test_ctl_errors_are_one_line(daemon: Daemon, args: list[str], message: str) -> None:
    daemon.device("8M")
    out = ctl(daemon, *args, check=False)
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr


def test_cli_without_a_daemon_and_usage_errors(tmp_path: Path) -> None:
    out = zramfs("ctl", "--mountpoint", str(tmp_path), check=False)
    assert out.returncode == 1 and "no zramfs tree" in out.stderr
    out = zramfs("swapon", "zram0", "--priority", "high", "--mountpoint", str(tmp_path),
                 check=False)
    assert out.returncode == 2 and "not a swap priority" in out.stderr
    out = zramfs("frobnicate", check=False)
    assert out.returncode == 2
    out = zramfs("daemon", "--mountpoint", str(tmp_path), "--config", str(tmp_path / "no"),
                 check=False)
    assert out.returncode == 1 and out.stderr.startswith(f"zramfs: {tmp_path}/no: ")


def test_swapon_swapoff_and_stats(daemon: Daemon) -> None:
    daemon.device("64M")
    loop = zramfs("swapon", "zram0", "--priority", "321", "--mountpoint", str(daemon.mnt)).stdout.strip()
    daemon.cleanup.push("swapoff", lambda: run("swapoff", loop, check=False))
    daemon.cleanup.push("losetup -d", lambda: run("losetup", "-d", loop, check=False))
    assert swap_priority(loop) == 321
    assert ctl(daemon, "-o", "NAME,MOUNTPOINT", "--raw", "-n").stdout.split() == \
        [str(daemon.dev("zram0")), "[SWAP]"]
    out = zramfs("swapon", "zram0", "--mountpoint", str(daemon.mnt), check=False)
    assert out.returncode == 1 and "already bound" in out.stderr
    stats = zramfs("stats", "zram0", "--mountpoint", str(daemon.mnt)).stdout
    assert "zram0 (pool zram0):" in stats and "obj_allocated" in stats and "Total" in stats
    assert "allocator zsmalloc," in stats
    zramfs("swapoff", "zram0", "--mountpoint", str(daemon.mnt))
    assert swap_priority(loop) is None and not loops_under(daemon.mnt)
    out = zramfs("swapoff", "zram0", "--mountpoint", str(daemon.mnt), check=False)
    assert out.returncode == 1 and "not in use as swap" in out.stderr


def test_pool_mirror_in_debugfs_tree(daemon: Daemon) -> None:
    pools = daemon.mnt / "sys/kernel/debug/zsmalloc"
    assert os.listdir(pools) == []
    daemon.device("16M")
    with open(daemon.dev("zram0"), "r+b") as f:
        f.write(b"abc" * 100000)
    assert os.listdir(pools) == ["zram0"]
    lines = (pools / "zram0/classes").read_text().splitlines()
    assert lines[0].split() == ["class", "size", "obj_allocated", "obj_used", "pages_used",
                                "pages_per_zspage", "freeable"]
    total = lines[-1].split()
    assert total[0] == "Total" and int(total[2]) > 0
    daemon.write("zram0", "reset", "1")
    assert os.listdir(pools) == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = tmp_path / "zramfs.service"
    unit.write_text((ROOT / "systemd/zramfs.service").read_text()
                    .replace("@PREFIX@", str(Path(sys.executable).parent.parent)))
    out = run("systemd-analyze", "verify", str(unit), check=False)
    assert out.returncode == 0, out.stderr
    text = unit.read_text()
    for line in ("Type=notify", "OOMScoreAdjust=-1000", "LimitMEMLOCK=infinity",
                 "Before=swap.target local-fs.target", "ExecReload=/bin/kill -HUP $MAINPID",
                 "FileDescriptorStoreMax=", "Restart=on-failure"):
        assert line in text


def make_cgroup(cleanup: Cleanup, name: str, limit: str) -> Path:
    cg = Path(f"/sys/fs/cgroup/memory/{name}-{os.getpid()}")
    cg.mkdir()
    cleanup.push(f"rmdir {cg}", lambda: cg.rmdir())
    (cg / "memory.limit_in_bytes").write_text(limit)
    if (cg / "memory.swappiness").exists():
        (cg / "memory.swappiness").write_text("100")
    return cg


@pytest.mark.slow
@pytest.mark.skipif(not Path("/sys/fs/cgroup/memory").is_dir(), reason="no cgroup v1 memory")
def test_swap_through_a_daemon_under_its_own_tight_limit(tmp_path: Path, transport: str) -> None:
    """The daemon serves swap-out while its own memory cgroup is tight: it locked its memory,
    so nothing of it is reclaimed to the swap it serves. A process pushes 384 MiB through swap
    from a 64 MiB cgroup; it finishes in bounded time with its data intact."""
    conf = tmp_path / "zramfs.conf"
    conf.write_text("[zram0]\nzram-size = 1024\nswap-priority = 32000\n")
    cleanup = Cleanup()
    try:
        with zramfs_daemon("--config", str(conf), tmp=tmp_path, transport=transport) as d:
            assert "memory locked (mlockall)" in d.log.read_text()
            daemon_cg = make_cgroup(cleanup, "zramfs-test-daemon", "320M")
            root = Path("/sys/fs/cgroup/memory")
            cleanup.push("daemon back to the root cgroup",
                         lambda: d.alive() and (root / "cgroup.procs").write_text(str(d.proc.pid)))
            (daemon_cg / "cgroup.procs").write_text(str(d.proc.pid))
            hog_cg = make_cgroup(cleanup, "zramfs-test-hog", "64M")
            hog = subprocess.Popen(
                ["sh", "-c", f'echo $$ > {hog_cg}/cgroup.procs && exec "$0" "$@"',
                 sys.executable, str(ROOT / "tests/memhog.py"), "384"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            cleanup.push("end memhog", lambda: hog.poll() is None and (hog.kill(), hog.wait()))
            out, _ = hog.communicate(timeout=300)
            assert hog.returncode == 0, out
            assert "verified 98304 pages" in out
            assert d.alive()
            peak = int((daemon_cg / "memory.max_usage_in_bytes").read_text())
            assert peak > 64 << 20                  # the pool really lived in the daemon's cgroup
            oom = dict(line.split() for line in
                       (daemon_cg / "memory.oom_control").read_text().splitlines())
            assert oom.get("oom_kill", "0") == "0"
            (root / "cgroup.procs").write_text(str(d.proc.pid))
    finally:
        cleanup.run_all()


def test_shutdown_names_who_holds_a_device_and_waits_a_bounded_time(
        tmp_path: Path, transport: str) -> None:
    with zramfs_daemon("--force-after", "2", tmp=tmp_path, transport=transport) as d:
        d.device("16M")
        loop = d.losetup("zram0")
        fd = os.open(d.dev("zram0"), os.O_RDONLY)
        try:
            started = time.monotonic()
            d.proc.terminate()
            assert d.proc.wait(30) == 0, d.log.read_text()
            took = time.monotonic() - started
        finally:
            os.close(fd)
            # The daemon unmounted lazily, so the loop device's backing path is no longer
            # under the mountpoint and the fixture cannot recognise it: detach it here.
            run("losetup", "-d", loop, check=False)
        assert run("losetup", loop, check=False).returncode != 0
        log = d.log.read_text()
        assert f"zram0 is held open by {loop} (bound), pid {os.getpid()}" in log, log
        assert "waiting up to 2 s" in log and "zram0: still open" in log
        assert 2 <= took < 20


def test_ctl_columns_as_zramctl_takes_them(daemon: Daemon) -> None:
    """-o +COLS extends the default columns, --output-all shows every one, -t is taken (and
    changes nothing: streams are per CPU), and without --mountpoint the one zramfs tree
    mounted is found in /proc/mounts (where another suite has one mounted too, ctl names
    both and asks which)."""
    ctl(daemon, "--find", "--size", "16M", "-t", "4")
    head = ctl(daemon, "-o", "+COMP-RATIO,ZERO-PAGES").stdout.splitlines()[0].split()
    assert head == [*ctl_module.DEFAULT_COLUMNS, "COMP-RATIO", "ZERO-PAGES"]
    head = ctl(daemon, "--output-all").stdout.splitlines()[0].split()
    assert head == list(ctl_module.COLUMNS)
    found = zramfs("ctl", "--raw", "-n", "-o", "NAME", check=False)
    trees = [line for line in Path("/proc/mounts").read_text().splitlines()
             if line.split()[2] == "fuse.zramfs"]
    if len(trees) == 1:
        assert found.stdout.split() == [str(daemon.dev("zram0"))]
    else:
        assert found.returncode != 0
        assert f"{len(trees)} zramfs trees are mounted" in found.stderr
        assert str(daemon.mnt) in found.stderr


def test_mounted_tree_is_found_in_the_mount_table(tmp_path: Path) -> None:
    table = tmp_path / "mounts"
    table.write_text("proc /proc proc rw 0 0\n")
    with pytest.raises(ctl_module.CtlError, match="no zramfs tree is mounted"):
        ctl_module.mounted_tree(str(table))
    table.write_text("zramfs /run/my\\040tree fuse.zramfs rw 0 0\n")
    assert ctl_module.mounted_tree(str(table)) == Path("/run/my tree")
    table.write_text("zramfs /a fuse.zramfs rw 0 0\nzramfs /b fuse.zramfs rw 0 0\n")
    with pytest.raises(ctl_module.CtlError, match=r"2 zramfs trees are mounted \(/a, /b\)"):
        ctl_module.mounted_tree(str(table))


@pytest.mark.slow
def test_make_install_and_uninstall_into_a_prefix(tmp_path: Path) -> None:
    """`make install` builds a wheel and an sdist (python -m build), puts the package in a
    virtual environment of its own under PREFIX, the command in BINDIR and a unit that runs
    it; the installed command works without the checkout; `make uninstall` takes it all away."""
    prefix, bindir, units = tmp_path / "opt", tmp_path / "bin", tmp_path / "units"
    where = [f"PREFIX={prefix}", f"BINDIR={bindir}", f"UNIT_DIR={units}"]
    run("make", "-C", str(ROOT), "install", *where, timeout=1200)
    assert sorted(p.suffix for p in (ROOT / "dist").iterdir()) == [".gz", ".whl"]
    command = bindir / "zramfs"
    assert command.is_symlink() and command.resolve() == prefix / "bin" / "zramfs"
    assert "ctl" in run(str(command), "--help", cwd=tmp_path).stdout
    home = run(str(prefix / "bin" / "python"), "-c",
               "import os, zramfs.zram._zram; print(os.path.dirname(zramfs.zram._zram.__file__))",
               cwd=tmp_path).stdout.strip()
    assert home.startswith(str(prefix)), home                  # not the checkout's package
    unit = (units / "zramfs.service").read_text()
    assert f"ExecStart={command} daemon --config /etc/zramfs.conf" in unit
    run("make", "-C", str(ROOT), "uninstall", *where, timeout=120)
    assert not prefix.exists() and not command.exists() and not (units / "zramfs.service").exists()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@requires_fuse
def test_metrics_endpoint_scraped_while_fio_runs(tmp_path: Path, transport: str) -> None:
    """--metrics serves Prometheus' text format: mm_stat, io_stat and bd_stat per device, and
    the FUSE requests by type with their latency; scraped while fio writes and parsed with
    prometheus_client's own parser, the numbers agree with each other and with the tree."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()

    def scrape() -> dict:
        """One scrape, parsed: (name, sorted labels) -> value."""
        text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    with zramfs_daemon("--metrics", f"127.0.0.1:{port}", tmp=tmp_path,
                       transport=transport) as d:
        name = d.device("64M")
        fio = subprocess.Popen(["fio", "--name=m", f"--filename={d.dev(name)}", "--rw=randrw",
                                "--bs=4k", "--direct=1", "--ioengine=libaio", "--iodepth=8",
                                "--size=32M", "--time_based", "--runtime=3",
                                "--buffer_compress_percentage=50", "--refill_buffers"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=tmp_path)
        try:
            time.sleep(1)
            scrapes = [scrape()]
        finally:
            assert fio.wait(60) == 0
        scrapes.append(scrape())
        mm = [int(x) for x in d.read(name, "mm_stat").split()]
        for samples in scrapes:
            dev = (("device", name),)
            assert samples[("zramfs_mm_stat_orig_data_size_bytes", dev)] > 0
            assert samples[("zramfs_disksize_bytes", dev)] == 64 << 20
            assert ("zramfs_io_stat_failed_writes_total", dev) in samples
            assert ("zramfs_bd_stat_count_pages", dev) in samples
            assert samples[("zramfs_dedup_stat_pages_deduplicated", dev)] == 0   # dedup off
            assert ("zramfs_dedup_stat_bytes_saved_bytes", dev) in samples
            writes = samples[("zramfs_requests_total", (("op", "write"),))]
            assert writes > 0
            count = samples[("zramfs_request_duration_seconds_count", (("op", "write"),))]
            inf = samples[("zramfs_request_duration_seconds_bucket", (("le", "+Inf"),
                                                                       ("op", "write")))]
            assert count == inf == writes
        # After fio, the last scrape and the tree say the same.
        assert samples[("zramfs_mm_stat_orig_data_size_bytes", dev)] == mm[0]
        assert samples[("zramfs_mm_stat_mem_used_total_bytes", dev)] == mm[2]
        # dedup_stat: a device with dedup on, the same page written at three offsets.
        twin = d.hot_add()
        d.write(twin, "dedup", "1")
        d.write(twin, "disksize", str(16 << 20))
        fd = os.open(d.dev(twin), os.O_WRONLY)
        try:
            page = os.urandom(PAGE // 2) * 2
            for i in range(3):
                os.pwrite(fd, page, i * PAGE)
        finally:
            os.close(fd)
        samples = scrape()
        shared = [int(x) for x in d.read(twin, "dedup_stat").split()]
        assert shared[0] == 2
        assert samples[("zramfs_dedup_stat_pages_deduplicated", (("device", twin),))] == 2
        assert samples[("zramfs_dedup_stat_bytes_saved_bytes", (("device", twin),))] == shared[1]


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


@requires_fuse
def test_metrics_endpoint_bounds_idle_connections(tmp_path: Path, cleanup: Cleanup) -> None:
    """600 connections that never finish their request (slowloris): the daemon's threads
    stay as they were, a scrape still gets through, and every idle one is closed within
    the endpoint's timeout."""
    import socket
    from urllib.request import urlopen

    from zramfs.service.metrics import REQUEST_TIMEOUT

    port = free_port()
    with zramfs_daemon("--default-device", "--metrics", f"127.0.0.1:{port}",
                       tmp=tmp_path) as d:
        before = threads_of(d.proc.pid)
        idle: list[socket.socket] = []
        cleanup.push("the idle connections closed", lambda: [s.close() for s in idle])
        started = time.monotonic()
        for _ in range(600):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")     # never ended
            idle.append(s)
        time.sleep(0.5)
        during = threads_of(d.proc.pid)
        assert during <= before + 2, f"{before} threads before, {during} with 600 idle"
        text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'zramfs_disksize_bytes{device="zram0"}' in text
        for s in idle:
            s.settimeout(max(0.1, started + REQUEST_TIMEOUT + 10 - time.monotonic()))
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
        took = time.monotonic() - started
        assert took < REQUEST_TIMEOUT + 10, took
        assert threads_of(d.proc.pid) <= before + 2
        assert d.alive(), d.log.read_text()


def test_metrics_config_key(tmp_path: Path) -> None:
    from zramfs.service import config
    conf = tmp_path / "zramfs.conf"
    conf.write_text("[zramfs]\nmetrics = 127.0.0.1:9101\n[zram0]\nzram-size = 64\n")
    assert config.load_daemon(conf).metrics == "127.0.0.1:9101"
    assert [d.name for d in config.load(conf, ram_mib=1024)] == ["zram0"]
    conf.write_text("[zramfs]\nmetrics = everywhere\n")
    with pytest.raises(config.ConfigError, match=r":2: \[zramfs\] metrics: 'everywhere' is not"):
        config.load_daemon(conf)


def test_fuse_transport_option_and_config_key(tmp_path: Path) -> None:
    """--fuse-transport and [zramfs] fuse-transport take classic, io_uring or auto; anything
    else is a one-line error before anything is mounted."""
    from zramfs.service import config
    conf = tmp_path / "zramfs.conf"
    conf.write_text("[zramfs]\nfuse-transport = io_uring\n")
    assert config.load_daemon(conf).fuse_transport == "io_uring"
    conf.write_text("[zramfs]\nfuse-transport = uring\n")
    with pytest.raises(config.ConfigError,
                       match=r":2: \[zramfs\] fuse-transport: 'uring' is not one of classic, "):
        config.load_daemon(conf)
    out = zramfs("daemon", "--config", str(conf), "--mountpoint", str(tmp_path / "m"),
                 check=False)
    assert out.returncode != 0 and "fuse-transport: 'uring' is not one of" in out.stderr
    out = zramfs("daemon", "--fuse-transport", "uring", check=False)
    assert out.returncode == 2 and "invalid choice: 'uring'" in out.stderr
    assert not (tmp_path / "m").exists() or not is_mounted(tmp_path / "m")


def test_auto_transport_takes_io_uring_where_the_kernel_has_it(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """auto: io_uring where the kernel has FUSE over io_uring, switching enable_uring on (and
    saying so); classic where it has not."""
    reason = uring_unavailable()
    if reason is None:
        request.getfixturevalue("uring_param_restored")
        URING_PARAM.write_text("N\n")
    with zramfs_daemon(tmp=tmp_path, transport="auto") as d:
        log = d.log.read_text()
        if reason is None:
            assert f"wrote Y to {URING_PARAM}" in log and "FUSE transport: io_uring" in log
            assert "a crash or a restart loses the tree" in log
        else:
            assert "FUSE transport: classic" in log
        d.write(d.device("16M"), "reset", "1")


def test_train_dict_from_a_devices_own_pages(daemon: Daemon, tmp_path: Path) -> None:
    """`zramfs train-dict zramN -o FILE` trains a zstd dictionary on the device's stored
    pages; a device given it holds the same pages in less memory. An empty device has
    nothing to learn from: one line, exit 1."""
    import corpus
    data = corpus.build(8 << 20)
    source = daemon.device("16M", "zstd")
    with open(daemon.dev(source), "r+b", buffering=0) as f:
        f.write(data)
    out = tmp_path / "pages.dict"
    said = zramfs("train-dict", source, "-o", str(out), "--size", "32K",
                  "--mountpoint", str(daemon.mnt)).stdout
    dictionary = out.read_bytes()
    assert dictionary[:4] == b"\x37\xa4\x30\xec" and len(dictionary) <= 32 << 10   # zstd's magic
    assert f"from {source}'s pages" in said
    target = daemon.device("16M", "zstd", f"dict={out}")
    with open(daemon.dev(target), "r+b", buffering=0) as f:
        f.write(data)
        f.seek(0)
        assert f.read(len(data)) == data
    assert daemon.mm_stat(target)[1] < daemon.mm_stat(source)[1]
    empty = daemon.device("4M", "zstd")
    failed = zramfs("train-dict", empty, "-o", str(tmp_path / "x"), "--mountpoint",
                    str(daemon.mnt), check=False)
    assert failed.returncode == 1 and "too few to train a dictionary" in failed.stderr


@requires_fuse
def test_daemon_runs_a_zram_generator_file_as_it_is(tmp_path: Path, transport: str) -> None:
    """A zram-generator.conf as people have it (obsolete keys, a recompression policy group,
    zram-generator's own fs-type and options): the daemon takes it unchanged and sets up
    what it says."""
    conf = tmp_path / "zram-generator.conf"
    mnt = tmp_path / "zram-fs"
    conf.write_text("[zram0]\nzram-fraction = 0.01\nmax-zram-size = 64\n"
                    "compression-algorithm = lz4 zstd(level=3) (type=idle)\n"
                    f"fs-type = ext4\nmount-point = {mnt}\noptions = discard,noatime\n"
                    "host-memory-limit = none\n")
    with zramfs_daemon("--config", str(conf), tmp=tmp_path, transport=transport) as d:
        assert int(d.read("zram0", "disksize")) == 64 << 20        # min(ram * 0.01, 64)
        assert d.read("zram0", "comp_algorithm") == "lzo-rle lzo [lz4] lz4hc zstd deflate \n"
        assert d.read("zram0", "recomp_algorithm") == "#1: lzo-rle lzo lz4 lz4hc [zstd] deflate \n"
        assert is_mounted(mnt)
        (mnt / "f").write_bytes(b"zram " * 1000)
        assert (mnt / "f").read_bytes() == b"zram " * 1000
        log = d.log.read_text()
        assert "zram-fraction is obsolete: use zram-size" in log
    assert not is_mounted(mnt)


@requires_fuse
def test_config_gives_a_recompression_algorithm_its_dictionary(tmp_path: Path) -> None:
    """`compression-algorithm = lz4 zstd(level=19,dict=PATH)`: the daemon sets up the
    recompression algorithm with the dictionary, as `algorithm_params priority=1 dict=`
    does. The same file on two devices, one with the dictionary: after `recompress
    type=idle` that one holds less, and the file reads back from both."""
    import zstandard
    import corpus
    data = corpus.build(8 << 20, ("/usr/lib/python3.11",))    # source text: a dictionary helps
    dictionary = tmp_path / "pages.dict"
    pages = [data[i:i + PAGE] for i in range(0, len(data), 4 * PAGE)]
    dictionary.write_bytes(zstandard.train_dictionary(32 << 10, pages).as_bytes())
    conf, mounts = tmp_path / "zramfs.conf", [tmp_path / "with", tmp_path / "without"]
    conf.write_text(
        f"[zram0]\nzram-size = 32\ncompression-algorithm = lz4 zstd(level=19,dict={dictionary})\n"
        f"fs-type = ext4\nmount-point = {mounts[0]}\n"
        f"[zram1]\nzram-size = 32\ncompression-algorithm = lz4 zstd(level=19)\n"
        f"fs-type = ext4\nmount-point = {mounts[1]}\n")
    with zramfs_daemon("--config", str(conf), tmp=tmp_path) as d:
        for mnt in mounts:
            (mnt / "corpus").write_bytes(data)
        os.sync()
        for name in ("zram0", "zram1"):
            d.write(name, "idle", "all")
            d.write(name, "recompress", "type=idle")
        with_dict, without = d.mm_stat("zram0")[1], d.mm_stat("zram1")[1]
        assert with_dict < 0.95 * without, (with_dict, without)
        for mnt in mounts:
            with open(mnt / "corpus", "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                assert f.read() == data
