"""A device's zstd dictionaries across live restarts, against an operator who replaces them:
every page written with a dictionary reads back as written, or fails its read (EIO, counted
in io_stat's failed_reads); never other bytes.

Each frame names the dictionary it was written with (zramfs.zcomp._zcomp.dictionary_name), so a
raw-content dictionary (which has no zstd id) replaced by another, or a trained one replaced
by garbage and the garbage by other garbage, is told from the one the frame needs. With the
copies kept beside the device's pages (zramfs.sysfs.record's `dicts`), every page reads back; with
them gone from the service manager's store, the pages that need them fail their reads.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from conftest import PAGE, Cleanup, Daemon, requires_fuse, start_daemon, zramfs_daemon
from manager import Manager, servings, stop
from test_restart_state import wait_serving_again

pytestmark = requires_fuse

MiB = 1 << 20


def restart_killed(d: Daemon, mgr: Manager, keep_dicts: bool) -> None:
    """A crash, and the next daemon started with what the manager keeps; without
    `keep_dicts`, the kept dictionaries are gone from the store first."""
    count = servings(d)
    d.proc.kill()
    d.proc.wait(10)
    mgr.pump()
    if not keep_dicts:
        for name in [n for n in mgr.store if n.endswith(".dicts")]:
            os.close(mgr.store.pop(name))
    d.proc = start_daemon(d.mnt, d.log, env=mgr.env(), listen_fds=list(mgr.store.items()))
    wait_serving_again(d, mgr, count + 1)


def read_pages(d: Daemon, name: str, data: bytes) -> tuple[int, int, int]:
    """(right, wrong, failed): the device's first pages read one by one against `data`."""
    right = wrong = failed = 0
    fd = os.open(d.dev(name), os.O_RDONLY)
    try:
        for off in range(0, len(data), PAGE):
            try:
                got = os.pread(fd, PAGE, off)
            except OSError as e:
                assert e.errno == errno.EIO, e
                failed += 1
                continue
            if got == data[off:off + PAGE]:
                right += 1
            else:
                wrong += 1
    finally:
        os.close(fd)
    return right, wrong, failed


def failed_reads(d: Daemon, name: str) -> int:
    return int(d.read(name, "io_stat").split()[0])


@pytest.mark.parametrize("kept", [True, False], ids=["dicts-kept", "dicts-lost"])
@pytest.mark.parametrize("case", ["raw-replaced", "trained-garbage-garbage"])
def test_a_replaced_dictionary_never_reads_back_other_bytes(tmp_path: Path, cleanup: Cleanup,
                                                            case: str, kept: bool) -> None:
    import zstandard
    import corpus
    mgr = Manager(cleanup)
    text = corpus.build(16 * MiB, ("/usr/lib/python3.11",))
    data = text[:8 * MiB]
    # Dictionaries of the same kind of bytes as the pages, so that frames lean on them.
    raws = [text[8 * MiB + i * 128 * 1024:8 * MiB + (i + 1) * 128 * 1024] for i in range(3)]
    path = tmp_path / "pages.dict"
    if case == "raw-replaced":
        first, then = raws[0], [raws[1]]
    else:
        pages = [data[i:i + PAGE] for i in range(0, len(data), PAGE)]
        first = zstandard.train_dictionary(32 << 10, pages[::4]).as_bytes()
        then = [raws[1], raws[2]]          # garbage: not zstd dictionaries, so raw content
    path.write_bytes(first)
    parts = len(then)
    cut = [len(data) * i // parts // PAGE * PAGE for i in range(parts + 1)]
    with zramfs_daemon(env=mgr.env(), tmp=tmp_path) as d:
        mgr.pump()
        name = d.device("16M", "zstd", f"dict={path}")
        for i, replacement in enumerate(then):
            with open(d.dev(name), "r+b", buffering=0) as f:
                f.seek(cut[i])
                f.write(data[cut[i]:cut[i + 1]])
            mgr.pump()
            path.write_bytes(replacement)
            restart_killed(d, mgr, kept)
        before = failed_reads(d, name)
        right, wrong, failed = read_pages(d, name, data)
        assert wrong == 0, f"{wrong} of {len(data) // PAGE} pages read back other bytes " \
                           f"({failed} failed)"
        assert failed_reads(d, name) - before == failed
        if kept:
            assert failed == 0 and right == len(data) // PAGE
        else:
            assert failed > 0            # the pages whose dictionary is gone
        stop(d, mgr)
