"""The daemon's memory budget against fake /proc and /sys trees, and once against this machine."""
from __future__ import annotations

from pathlib import Path

import pytest

from zramfs.service.budget import (DEFAULT_MARGIN, V1_NO_LIMIT, cgroup_limit, cgroup_usage, mem_total,
                           memory_budget, memory_used)

GIB = 1 << 30
MEMINFO = "MemTotal:       16777216 kB\nMemFree:         1048576 kB\nMemAvailable:    8388608 kB\n"
RAM = 16 * GIB


def fake_root(tmp_path: Path, cgroup: str, files: dict[str, str]) -> Path:
    """A tree with proc/self/cgroup, proc/meminfo and the given files under sys/fs/cgroup."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    (tmp_path / "proc/meminfo").write_text(MEMINFO)
    for name, text in files.items():
        path = tmp_path / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


V1_CGROUP = "5:devices:/\n4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n"


def test_v1_with_a_limit(tmp_path: Path) -> None:
    root = fake_root(tmp_path, V1_CGROUP, {
        "memory/memory.limit_in_bytes": f"{V1_NO_LIMIT}\n",
        "memory/docker/memory.limit_in_bytes": f"{V1_NO_LIMIT}\n",
        "memory/docker/abc/memory.limit_in_bytes": f"{2 * GIB}\n",
        "memory/docker/abc/memory.usage_in_bytes": f"{GIB // 2}\n",
    })
    budget = memory_budget(root=root)
    assert (budget.limit, budget.source) == (2 * GIB, "cgroup v1")
    assert budget.size == 2 * GIB - DEFAULT_MARGIN
    assert budget.path == root / "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes"
    assert cgroup_usage(root=root) == GIB // 2
    assert memory_used(budget, root=root) == GIB // 2
    assert "cgroup v1 2.0 GiB" in str(budget)


def test_v1_ancestor_limit_is_tighter(tmp_path: Path) -> None:
    root = fake_root(tmp_path, V1_CGROUP, {
        "memory/docker/memory.limit_in_bytes": f"{GIB}\n",
        "memory/docker/memory.usage_in_bytes": f"{3 * GIB // 4}\n",
        "memory/docker/abc/memory.limit_in_bytes": f"{2 * GIB}\n",
        "memory/docker/abc/memory.usage_in_bytes": f"{GIB // 4}\n",
    })
    budget = memory_budget(margin=0, root=root)
    assert (budget.size, budget.limit) == (GIB, GIB)
    assert budget.path.parent == root / "sys/fs/cgroup/memory/docker"
    assert cgroup_usage(root=root) == GIB // 4              # the process's own cgroup
    assert memory_used(budget, root=root) == 3 * GIB // 4   # the one whose limit binds


def test_v1_without_a_limit_is_ram_less_margin(tmp_path: Path) -> None:
    root = fake_root(tmp_path, V1_CGROUP, {
        "memory/memory.limit_in_bytes": f"{V1_NO_LIMIT}\n",
        "memory/docker/abc/memory.limit_in_bytes": "9223372036854771712\n",
    })
    assert cgroup_limit(root=root) is None
    budget = memory_budget(root=root)
    assert (budget.limit, budget.source) == (RAM, "MemTotal")
    assert budget.size == RAM - DEFAULT_MARGIN
    assert budget.path == root / "proc/meminfo"
    assert memory_used(budget, root=root) == RAM - 8 * GIB


def test_v1_container_sees_only_its_own_cgroup(tmp_path: Path) -> None:
    # /proc/self/cgroup names /docker/abc, but only that cgroup is mounted, at the top
    root = fake_root(tmp_path, V1_CGROUP, {"memory/memory.limit_in_bytes": f"{GIB}\n"})
    assert cgroup_limit(root=root) == (GIB, root / "sys/fs/cgroup/memory/memory.limit_in_bytes",
                                       "cgroup v1")


V2_CGROUP = "0::/system.slice/zramfs.service\n"


def test_v2_nested_memory_max(tmp_path: Path) -> None:
    root = fake_root(tmp_path, V2_CGROUP, {
        "system.slice/memory.max": f"{4 * GIB}\n",
        "system.slice/zramfs.service/memory.max": f"{6 * GIB}\n",
        "system.slice/zramfs.service/memory.current": f"{GIB}\n",
        "system.slice/memory.current": f"{3 * GIB}\n",
    })
    budget = memory_budget(margin=GIB, root=root)
    assert (budget.limit, budget.size, budget.source) == (4 * GIB, 3 * GIB, "cgroup v2")
    assert budget.path == root / "sys/fs/cgroup/system.slice/memory.max"
    assert cgroup_usage(root=root) == GIB
    assert memory_used(budget, root=root) == 3 * GIB


def test_v2_max_is_no_limit(tmp_path: Path) -> None:
    root = fake_root(tmp_path, V2_CGROUP, {
        "system.slice/memory.max": "max\n",
        "system.slice/zramfs.service/memory.max": "max\n",
    })
    assert cgroup_limit(root=root) is None
    assert memory_budget(root=root).source == "MemTotal"


def test_limit_larger_than_ram_loses(tmp_path: Path) -> None:
    root = fake_root(tmp_path, V2_CGROUP, {
        "system.slice/zramfs.service/memory.max": f"{64 * GIB}\n",
    })
    assert cgroup_limit(root=root) is not None
    budget = memory_budget(root=root)
    assert (budget.limit, budget.source) == (RAM, "MemTotal")


def test_no_cgroup_file_and_margin_edges(tmp_path: Path) -> None:
    root = fake_root(tmp_path, "", {})
    (root / "proc/self/cgroup").unlink()
    assert cgroup_limit(root=root) is None and cgroup_usage(root=root) is None
    assert memory_budget(margin=RAM + 1, root=root).size == 0
    with pytest.raises(ValueError):
        memory_budget(margin=-1, root=root)


def test_this_machine() -> None:
    budget = memory_budget()
    ram = mem_total()
    assert 0 < budget.limit <= ram
    assert budget.size == budget.limit - DEFAULT_MARGIN
    assert budget.path.exists()
    if budget.source == "MemTotal":
        found = cgroup_limit()
        assert budget.limit == ram
        assert found is None or found[0] >= ram
    else:
        assert int(budget.path.read_text()) == budget.limit
    assert 0 < memory_used(budget) <= budget.limit
    usage = cgroup_usage()
    assert usage is None or usage > 0
