"""Tiering: the attribute syntax (here), and writeback, recompression and eviction on a real
mount (below)."""
from __future__ import annotations

import pytest

from zramfs.tiering import (Recompress, Writeback, parse_idle, parse_recomp_algorithm,
                            parse_recompress, parse_writeback)


@pytest.mark.parametrize("text,want", [
    ("idle", Writeback("idle")),
    ("huge_idle\n", Writeback("huge_idle")),
    ("type=incompressible", Writeback("incompressible")),
    ("page_index=7", Writeback(None, [(7, 7)])),
    ("page_indexes=1-100 page_index=200 page_indexes=300-301",
     Writeback(None, [(1, 100), (200, 200), (300, 301)])),
])
def test_writeback_syntax(text: str, want: Writeback) -> None:
    assert parse_writeback(text) == want


@pytest.mark.parametrize("text", ["", "cold", "type=cold", "page_index=x", "page_indexes=5-1",
                                  "page_indexes=5", "type=idle page_index=1",
                                  "type=idle type=huge", "idle huge"])
def test_writeback_syntax_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_writeback(text)


def test_idle_syntax() -> None:
    assert parse_idle("all\n") is None
    assert parse_idle("86400") == 86400
    for bad in ("0", "-5", "soon", ""):
        with pytest.raises(ValueError):
            parse_idle(bad)


def test_recomp_algorithm_syntax() -> None:
    assert parse_recomp_algorithm("algo=zstd priority=1") == (1, "zstd", None)
    assert parse_recomp_algorithm("algo=lz4hc priority=3 level=12") == (3, "lz4hc", 12)
    assert parse_recomp_algorithm("algo=zstd") == (1, "zstd", None)
    for bad in ("priority=1", "algo=zstd priority=4", "algo=zstd priority=0",
                "algo=zstd level=x", "algo=zstd dict=/x"):
        with pytest.raises(ValueError):
            parse_recomp_algorithm(bad)


def test_recompress_syntax() -> None:
    assert parse_recompress("type=idle") == Recompress("idle")
    assert parse_recompress("threshold=3000") == Recompress(None, 3000)
    assert parse_recompress("type=huge algo=zstd max_pages=10") == \
        Recompress("huge", 0, 10, "zstd")
    assert parse_recompress("type=huge_idle priority=2").priority == 2
    for bad in ("", "type=all", "threshold=0", "max_pages=-1", "type=idle colour=red"):
        with pytest.raises(ValueError):
            parse_recompress(bad)
