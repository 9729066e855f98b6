"""Prometheus metrics: `zramfs daemon --metrics ADDR:PORT` serves the text format with the
standard client library (prometheus_client), per device and per FUSE request type.

    zramfs_mm_stat_orig_data_size_bytes{device="zram0"}      mm_stat's fields, one gauge each
    zramfs_io_stat_failed_writes_total{device="zram0"}        io_stat's, as counters
    zramfs_bd_stat_count_pages{device="zram0"}                bd_stat's, and the capacity
    zramfs_evicted_pages_total{device="zram0"}                zswap-style eviction
    zramfs_dedup_stat_pages_deduplicated{device="zram0"}      dedup_stat's, one gauge each
    zramfs_requests_total{op="write"}                         the FUSE engine's requests
    zramfs_request_duration_seconds_bucket{op="write",le=...} and their latency

A scrape runs in the client library's HTTP thread; the devices belong to the trio thread, so
the collector asks that thread for a snapshot (`snapshot`), never reading them itself.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.registry import CollectorRegistry

MM_STAT = ("orig_data_size", "compr_data_size", "mem_used_total", "mem_limit", "mem_used_max",
           "same_pages", "pages_compacted", "huge_pages", "huge_pages_since")
IO_STAT = ("failed_reads", "failed_writes", "invalid_io", "notify_free")
DEDUP_STAT = (("pages_deduplicated", ""), ("bytes_saved", "bytes"), ("hash_table_entries", ""))


@dataclass
class DeviceStats:
    name: str
    disksize: int
    mm_stat: tuple[int, ...]
    io_stat: tuple[int, ...]
    bd_stat: tuple[int, int, int]
    bd_blocks: int                        # the backing device's capacity, 4 KiB blocks
    evicted: int
    dedup_stat: tuple[int, int, int] = (0, 0, 0)


@dataclass
class Snapshot:
    devices: list[DeviceStats] = field(default_factory=list)
    # op -> (count, seconds, latency histogram; bucket b up to buckets[b] seconds, then +Inf)
    requests: dict[str, tuple[int, float, list[int]]] = field(default_factory=dict)
    buckets: list[float] = field(default_factory=list)


class Collector:
    """prometheus_client's custom collector over a snapshot taken on the trio thread."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[object]:
        snap = self.snapshot()
        device = ["device"]
        for i, name in enumerate(MM_STAT):
            unit = "" if name.endswith("pages") or name.endswith("since") else "bytes"
            kind = CounterMetricFamily if name in ("pages_compacted", "huge_pages_since") \
                else GaugeMetricFamily
            m = kind(f"zramfs_mm_stat_{name}", f"mm_stat's {name}", labels=device, unit=unit)
            for d in snap.devices:
                m.add_metric([d.name], d.mm_stat[i])
            yield m
        for i, name in enumerate(IO_STAT):
            m = CounterMetricFamily(f"zramfs_io_stat_{name}", f"io_stat's {name}",
                                    labels=device)
            for d in snap.devices:
                m.add_metric([d.name], d.io_stat[i])
            yield m
        disksize = GaugeMetricFamily("zramfs_disksize", "the device's size", labels=device,
                                     unit="bytes")
        bd_count = GaugeMetricFamily("zramfs_bd_stat_count", "pages on the backing device",
                                     labels=device, unit="pages")
        bd_blocks = GaugeMetricFamily("zramfs_backing_dev_capacity",
                                      "the backing device's size", labels=device, unit="pages")
        bd_reads = CounterMetricFamily("zramfs_bd_stat_reads", "pages read back",
                                       labels=device, unit="pages")
        bd_writes = CounterMetricFamily("zramfs_bd_stat_writes", "pages written back",
                                        labels=device, unit="pages")
        evicted = CounterMetricFamily("zramfs_evicted", "pages evicted over mem_limit",
                                      labels=device, unit="pages")
        for d in snap.devices:
            disksize.add_metric([d.name], d.disksize)
            bd_count.add_metric([d.name], d.bd_stat[0])
            bd_blocks.add_metric([d.name], d.bd_blocks)
            bd_reads.add_metric([d.name], d.bd_stat[1])
            bd_writes.add_metric([d.name], d.bd_stat[2])
            evicted.add_metric([d.name], d.evicted)
        yield from (disksize, bd_count, bd_blocks, bd_reads, bd_writes, evicted)
        for i, (name, unit) in enumerate(DEDUP_STAT):
            m = GaugeMetricFamily(f"zramfs_dedup_stat_{name}", f"dedup_stat's {name}",
                                  labels=device, unit=unit)
            for d in snap.devices:
                m.add_metric([d.name], d.dedup_stat[i])
            yield m
        requests = CounterMetricFamily("zramfs_requests", "FUSE requests served", labels=["op"])
        latency = HistogramMetricFamily("zramfs_request_duration", "FUSE request latency",
                                        labels=["op"], unit="seconds")
        for op, (count, seconds, hist) in sorted(snap.requests.items()):
            requests.add_metric([op], count)
            cumulative, buckets = 0, []
            for le, n in zip([*(f"{b:g}" for b in snap.buckets), "+Inf"], hist):
                cumulative += n
                buckets.append((le, cumulative))
            latency.add_metric([op], buckets, seconds)
        yield requests
        yield latency


def parse_address(text: str) -> tuple[str, int]:
    """`ADDR:PORT` (`[::1]:9101` for IPv6) -> (addr, port); ValueError with the reason."""
    addr, sep, port = text.rpartition(":")
    if not sep or not addr or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not ADDR:PORT (e.g. 127.0.0.1:9101)")
    return addr.strip("[]"), int(port)


def serve(address: str, snapshot: Callable[[], Snapshot]) -> object:
    """Starts the endpoint in the client library's own thread; returns its server (shutdown()
    to stop it)."""
    addr, port = parse_address(address)
    registry = CollectorRegistry()
    registry.register(Collector(snapshot))
    server, _ = start_http_server(port, addr=addr, registry=registry)
    return server
