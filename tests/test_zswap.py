"""scripts/bench-zswap's set-up and clean-up, on the real kernel: zswap in front of a zramfs swap
device (and the kernel's zram and zramfs alone beside it) with a small swapping program. What
is asserted is what the rows are built on, never a timing: every page read back, zswap stored
pages only in its own row, and the machine left as found (zswap's parameters, swaps, loop
devices, kernel zram devices, cgroups)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_fuse

ROOT = Path(__file__).resolve().parent.parent
ZSWAP = Path("/sys/module/zswap/parameters")
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")


def machine() -> dict:
    """What the bench must leave as it found it."""
    return {"zswap": {p.name: p.read_text() for p in ZSWAP.iterdir()},
            "swaps": Path("/proc/swaps").read_text(),
            "loops": subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout,
            "zram": sorted(p.name for p in Path("/sys/block").glob("zram*")),
            "cgroups": sorted(p.name for p in CGROUP_MEMORY.glob("zramfs-bench*"))}


@requires_fuse
@pytest.mark.skipif(not ZSWAP.is_dir() or not (CGROUP_MEMORY / "cgroup.procs").exists(),
                    reason="needs zswap and the cgroup v1 memory controller")
def test_bench_zswap_rows_and_clean_up() -> None:
    before = machine()
    out = subprocess.run([sys.executable, str(ROOT / "scripts/bench-zswap"), "--json",
                          "--mib", "64", "--limit-mib", "24", "--touches", "3000"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["device"].split(" ")[0] for r in rows] == ["kernel", "zramfs", "zswap"]
    assert all(r["bad_pages"] == 0 and r["pages"] == 64 * 256 for r in rows)
    kernel, zramfs, zswap = rows
    # Swap was used: the pages left the cgroup for the device (or zswap's pool) in each row.
    assert kernel["zram_orig"] > 0 and zramfs["zram_orig"] > 0
    assert kernel["zswpout"] == zramfs["zswpout"] == 0          # zswap off there ...
    assert zswap["zswpout"] > 0 and zswap["zswapped"] > 0        # ... and in front here
    assert machine() == before
