"""A live upgrade across the package's move into folders: a daemon of the last main before
it (flat zramfs/) is upgraded in place by `zramfs restart` into this tree, and every page
of a zsmalloc device and of a zbud device (whose pool the new tree adopts in place, where the
old one copied it) comes back, adopted in place.

A running daemon re-executes itself by module name (`python -m zramfs.cli`), so an upgrade
is: new code where the old was imported from, then SIGHUP. Here the daemon imports through
a symlink (PYTHONPATH), which is pointed from the old tree to this one before the restart,
as a package manager replaces the installed files.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import (ROOT, ZRAMFS, Cleanup, Daemon, can_mount_fuse, is_mounted,
                      release_holders, run, stop_daemon, wait_for)
from manager import children, servings
from zramfs.service.pidfile import pid_file

# The last main of the flat layout (zramfs/_zram.pyx, zramfs/daemon.py, ...).
PREVIOUS_MAIN = "fc11571809fec5f7ae24daa4b8c242a2a87da0a0"
PAGE = 4096
SIZE = 32 << 20


def build_previous(where: Path) -> Path:
    """PREVIOUS_MAIN's tree, its extensions built in place with this venv's Cython."""
    tree = where / "previous"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS_MAIN],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    built = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-j", "2"],
                           cwd=tree, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return tree


def serving_child(d: Daemon, count: int) -> int:
    """The supervisor's one child once `count` daemons have come to serve."""
    wait_for(lambda: servings(d) >= count and len(children(d.proc.pid)) == 1
             or d.proc.poll() is not None, 120, f"daemon {count} to serve")
    assert d.proc.poll() is None, d.log.read_text()
    return children(d.proc.pid)[0]


def pages_of_every_kind() -> bytes:
    """SIZE bytes: compressible text, random (huge), same-filled pages and zero pages."""
    text = (Path(__file__).read_bytes() * 64)[:PAGE * 64]
    chunks = []
    for i in range(SIZE // PAGE):
        kind = i % 4
        chunks.append(text[(i % 64) * PAGE:(i % 64 + 1) * PAGE] if kind == 0
                      else os.urandom(PAGE) if kind == 1
                      else bytes([i % 251]) * PAGE if kind == 2 else bytes(PAGE))
    return b"".join(chunks)


def code_of(pid: int) -> set[str]:
    """The zramfs extension files the process has mapped."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in maps if "_zram.cpython" in line}


def test_live_upgrade_from_the_flat_layout_keeps_every_page(tmp_path: Path) -> None:
    reason = can_mount_fuse()
    if reason:
        pytest.skip(reason)
    known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS_MAIN}^{{commit}}"],
                           capture_output=True)
    if known.returncode != 0:
        pytest.skip(f"not a git checkout with {PREVIOUS_MAIN[:7]} in its history")
    previous = build_previous(tmp_path)
    current = tmp_path / "current"
    current.symlink_to(previous)
    base = Path(tempfile.mkdtemp(prefix="zramfs-test-"))
    mnt, log = base / "mnt", base / "daemon.log"
    env = {k: v for k, v in os.environ.items()
           if k != "NOTIFY_SOCKET" and not k.startswith("LISTEN_")}
    env["PYTHONPATH"] = str(current)
    with open(log, "ab") as out:
        # cwd: neither tree (python -m puts the working directory first on the path).
        proc = subprocess.Popen([sys.executable, "-m", "zramfs.cli", "--log-level", "debug",
                                 "daemon", "--mountpoint", str(mnt), "--default-device"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    d = Daemon(mnt, proc, log, Cleanup())
    try:
        old = serving_child(d, 1)
        assert any(p.startswith(f"{previous}/zramfs/_zram.") for p in code_of(old)), code_of(old)
        # zram0 (the default device, zsmalloc) and a zbud device, whose pool layout changed.
        zbud = d.hot_add()
        d.write(zbud, "zpool", "zbud")
        d.write(zbud, "disksize", str(SIZE))
        images, before = {}, {}
        for name in ("zram0", zbud):
            dev = os.open(d.dev(name), os.O_RDWR)
            d.cleanup.push(f"close {name}", lambda dev=dev: os.close(dev))
            images[name] = (dev, pages_of_every_kind())
            os.pwrite(dev, images[name][1], 0)
            os.fsync(dev)
            before[name] = d.mm_stat(name)

        fresh = tmp_path / "current.next"
        fresh.symlink_to(ROOT)
        os.replace(fresh, current)               # the upgrade's new files
        out = run(*ZRAMFS, "restart", "--mountpoint", str(mnt))
        assert f"pid {proc.pid}" in out.stdout
        new = serving_child(d, 2)
        assert new != old
        assert any(p.startswith(f"{ROOT}/zramfs/zram/_zram.") for p in code_of(new)), code_of(new)
        text_log = log.read_text()
        assert "daemon handed over" in text_log, text_log
        for name in images:
            assert f"{name}: adopted " in text_log, text_log
        assert "copied" not in text_log, text_log

        for name, (dev, image) in images.items():
            got = os.pread(dev, SIZE, 0)
            assert hashlib.sha256(got).digest() == hashlib.sha256(image).digest(), name
            after = d.mm_stat(name)
            assert after[:2] == before[name][:2], (name, before[name], after)  # orig, compr
    finally:
        d.cleanup.run_all()
        release_holders(mnt)
        stop_daemon(proc, mnt, timeout=60)
        pid_file(mnt).unlink(missing_ok=True)
        if not is_mounted(mnt):
            shutil.rmtree(base, ignore_errors=True)
