"""Prometheus metrics: `zramfs daemon --metrics ADDR:PORT` serves the text format with the
standard client library (prometheus_client), per device and per FUSE request type.

    zramfs_mm_stat_orig_data_size_bytes{device="zram0"}      mm_stat's fields, one gauge each
    zramfs_io_stat_failed_writes_total{device="zram0"}        io_stat's, as counters
    zramfs_bd_stat_count_pages{device="zram0"}                bd_stat's, and the capacity
    zramfs_evicted_pages_total{device="zram0"}                zswap-style eviction
    zramfs_dedup_stat_pages_deduplicated{device="zram0"}      dedup_stat's, one gauge each
    zramfs_requests_total{op="write"}                         the FUSE engine's requests
    zramfs_request_duration_seconds_bucket{op="write",le=...} and their latency

The endpoint is served on the daemon's trio thread (`serve`), where the devices live: no
thread a connection, so nothing a client does can multiply the daemon's threads. It bounds
what clients hold: at most MAX_CONNECTIONS at once (one more closes the oldest still sending
its request, so a scrape gets through a crowd of idle connections), REQUEST_TIMEOUT seconds
for a connection to send its request and take the answer, MAX_REQUEST bytes of request.
It is not data: a port it cannot listen on (taken during a restart by whoever was quicker)
is a log line and another try every RETRY seconds, never a daemon that fails to serve its
devices. The text format and its content negotiation are the client library's
(prometheus_client: choose_encoder).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NoReturn

import trio
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 16        # open at once
REQUEST_TIMEOUT = 5.0       # seconds from a connection's accept to its answer sent
MAX_REQUEST = 8192          # bytes of request line and headers
RETRY = 2.0                 # seconds between tries to listen

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


async def serve(address: str, snapshot: Callable[[], Snapshot],
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
    """The endpoint at `address` until cancelled (trio thread: `snapshot` is called there).
    Started (task_status) after the first try to listen, whether it worked or not: a port
    taken is logged (once for each reason) and tried again every RETRY seconds."""
    addr, port = parse_address(address)
    registry = CollectorRegistry()
    registry.register(Collector(snapshot))
    endpoint = _Endpoint(registry)
    started, said = False, None
    while True:
        try:
            listeners = await trio.open_tcp_listeners(port, host=addr)
        except OSError as e:
            why = e.strerror or str(e)
            if why != said:
                log.warning("metrics %s: cannot listen: %s; trying again every %g s (the "
                            "devices are served meanwhile)", address, why, RETRY)
                said = why
            if not started:
                task_status.started()
                started = True
            await trio.sleep(RETRY)
            continue
        log.info("metrics on http://%s/metrics", address)
        said = None
        if not started:
            task_status.started()
            started = True
        try:
            await trio.serve_listeners(endpoint.handle, listeners)
        except OSError as e:            # accept failed for good: listen anew
            log.warning("metrics %s: %s", address, e.strerror or e)
            await trio.sleep(RETRY)


class _Endpoint:
    """One HTTP/1.x exchange a connection (the answer says Connection: close), within the
    bounds above."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.open = 0
        # connections still sending their request, oldest first: evicted past the bound
        self.reading: dict[object, trio.CancelScope] = {}

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self.open >= MAX_CONNECTIONS:
                if not self.reading:
                    return          # every one is being answered: this one is closed
                self.reading.pop(next(iter(self.reading))).cancel()
            self.open += 1
            try:
                with trio.move_on_after(REQUEST_TIMEOUT) as scope:
                    key = object()
                    self.reading[key] = scope
                    try:
                        head = await _read_head(stream)
                    finally:
                        self.reading.pop(key, None)
                    if head is not None:
                        await stream.send_all(self.answer(head))
            except trio.BrokenResourceError:
                pass                        # the client went away: nothing to answer
            except Exception as e:          # never the daemon's end: one connection's
                log.warning("metrics: a connection failed: %r", e)
            finally:
                self.open -= 1

    def answer(self, head: bytes) -> bytes:
        """The response to a request's head (request line and headers)."""
        lines = head.decode("latin-1").splitlines()
        request = lines[0].split() if lines else []
        if len(request) != 3 or not request[2].startswith("HTTP/"):
            return _response("400 Bad Request", "text/plain", b"bad request\n")
        if request[0] not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", "text/plain", b"GET only\n")
        accept = next((value.strip() for name, _, value in
                       (line.partition(":") for line in lines[1:])
                       if name.strip().lower() == "accept"), "")
        encoder, content_type = choose_encoder(accept)
        try:
            body = encoder(self.registry)
        except Exception as e:      # a collector's bug: a failed scrape, not a dead endpoint
            log.warning("metrics: scrape failed: %r", e)
            return _response("500 Internal Server Error", "text/plain", b"scrape failed\n")
        return _response("200 OK", content_type, b"" if request[0] == "HEAD" else body,
                         len(body))


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """A request's head, or None where the client closes first or sends more than
    MAX_REQUEST bytes without ending it (a request body, if any, is not read)."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_REQUEST:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        data += chunk
    return data


def _response(status: str, content_type: str, body: bytes, length: int | None = None) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            "Connection: close\r\n\r\n").encode() + body
