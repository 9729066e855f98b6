"""Paths an operator gives the daemon (`dict=` of algorithm_params and of the config's
zstd(...), `backing_dev`) that are not what they should be: a FIFO, a directory, a character
device. Each is refused at once with EINVAL and a log line naming what it is, never waited on:
an open of a FIFO waits for a writer, and the daemon would wait with it (zramfs.sysfs.files).

At a restart the same holds for the settings replayed: a dictionary path that became a FIFO
is like one that went away (the kept copy is used), and the restart does not hang.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (PAGE, Cleanup, Daemon, requires_fuse, start_daemon, stop_daemon,
                      zramfs_daemon)
from manager import Manager, stop
from test_restart_state import restart_killed

pytestmark = requires_fuse

HANG = 15                  # seconds after which a write of the attribute counts as hung

WRITE = """
import os, sys
try:
    with open(sys.argv[1], "w") as f:
        f.write(sys.argv[2])
    print(0)
except OSError as e:
    print(e.errno)
"""


def special(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """A path of `kind` and the words the daemon's log line should use for it."""
    if kind == "fifo":
        path = tmp_path / "special.fifo"
        os.mkfifo(path)
        return path, "a FIFO"
    if kind == "directory":
        return tmp_path, "a directory"
    return Path("/dev/zero"), "a character device"


def let_go(path: Path) -> None:
    """A reader waiting in the open of the FIFO at `path` (a daemon on the old code) gets its
    writer, and EOF at once."""
    if not path.is_fifo():
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass                     # no reader: nothing waits


def write_bounded(d: Daemon, attr_path: Path, value: str, special_path: Path) -> str:
    """The errno of writing `value` to `attr_path` in a process of its own ("0": taken);
    a failure if it does not come back within HANG seconds."""
    writer = subprocess.Popen([sys.executable, "-c", WRITE, str(attr_path), value],
                              stdout=subprocess.PIPE, text=True)
    try:
        out, _ = writer.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        let_go(special_path)
        writer.kill()
        writer.communicate()
        pytest.fail(f"writing {value!r} to {attr_path} hung for {HANG} s:\n{d.log.read_text()}")
    return out.strip()


@pytest.mark.parametrize("kind", ["fifo", "directory", "dev-zero"])
@pytest.mark.parametrize("attr", ["dict", "backing_dev"])
def test_a_fifo_a_directory_or_a_character_device_is_einval_at_once(
        tmp_path: Path, attr: str, kind: str) -> None:
    path, what = special(kind, tmp_path)
    with zramfs_daemon(tmp=tmp_path) as d:
        d.cleanup.push("a FIFO's reader let go", lambda: let_go(path))
        name = d.hot_add()
        if attr == "dict":
            d.write(name, "comp_algorithm", "zstd")
            target, value = d.sys(name, "algorithm_params"), f"dict={path}"
        else:
            target, value = d.sys(name, "backing_dev"), str(path)
        started = time.monotonic()
        assert write_bounded(d, target, value, path) == str(errno.EINVAL)
        assert time.monotonic() - started < 5
        said = [line for line in d.log.read_text().splitlines()
                if name in line and str(path) in line and what in line]
        assert said, f"no log line says {path} is {what}:\n{d.log.read_text()}"
        # Still serving, the refused setting not taken.
        assert d.read(name, "backing_dev") == "none\n"
        d.write(name, "disksize", "4M")
        with open(d.dev(name), "r+b", buffering=0) as f:
            f.write(b"x" * PAGE)


def test_a_config_dict_on_a_fifo_fails_the_daemon_at_once(tmp_path: Path) -> None:
    """The config's zstd(dict=FIFO): the daemon says why and stops, instead of waiting."""
    fifo = tmp_path / "pages.fifo"
    os.mkfifo(fifo)
    conf = tmp_path / "zramfs.conf"
    conf.write_text(f"[zram0]\nzram-size = 16\ncompression-algorithm = zstd(dict={fifo})\n")
    mnt, log = tmp_path / "mnt", tmp_path / "daemon.log"
    mnt.mkdir()
    proc = start_daemon(mnt, log, "--config", str(conf))
    try:
        status = proc.wait(HANG)
    except subprocess.TimeoutExpired:
        let_go(fifo)
        status = None
    finally:
        stop_daemon(proc, mnt)
    text = log.read_text()
    assert status is not None, f"the daemon waited on the FIFO for {HANG} s:\n{text}"
    assert status != 0 and "a FIFO" in text and str(fifo) in text, text
    assert "Traceback" not in text, text


def test_a_restart_finding_a_fifo_at_the_dict_path_uses_the_kept_copy(
        tmp_path: Path, cleanup: Cleanup) -> None:
    """The dictionary file replaced by a FIFO, then a crash: the next daemon does not wait on
    the FIFO; it takes the dictionary kept from before and every page reads back."""
    import zstandard
    import corpus
    mgr = Manager(cleanup)
    data = corpus.build(4 << 20, ("/usr/lib/python3.11",))
    pages = [data[i:i + PAGE] for i in range(0, len(data), PAGE)]
    path = tmp_path / "pages.dict"
    path.write_bytes(zstandard.train_dictionary(16 << 10, pages[0::2]).as_bytes())
    cleanup.push("a FIFO's reader let go", lambda: let_go(path))
    with zramfs_daemon(env=mgr.env(), tmp=tmp_path) as d:
        mgr.pump()
        name = d.device("8M", "zstd", f"dict={path}")
        with open(d.dev(name), "r+b", buffering=0) as f:
            f.write(data)
        mgr.pump()
        path.unlink()
        os.mkfifo(path)
        restart_killed(d, mgr)
        with open(d.dev(name), "rb", buffering=0) as f:
            assert f.read(len(data)) == data
        log = d.log.read_text()
        assert "a FIFO" in log and "the copy kept from before the restart is used" in log, log
        stop(d, mgr)
