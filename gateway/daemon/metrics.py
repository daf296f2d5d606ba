"""The daemon's Prometheus registry: its own metrics, and the engine's and
the queues' counters exported at scrape time (no per-packet metric calls).

Locks: none of its own. A scrape reads the engine's statistics (the engine
locks inside) and the flusher's per-subscriber byte totals (a dict copied
whole by ``sorted``, safe against the flusher's updates under the GIL).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class Metrics:
    """Every metric the daemon's parts update, in one registry served at /metrics."""

    def __init__(self, gw) -> None:
        self.registry = r = CollectorRegistry()
        self.blocks = Counter("tollgate_blocks", "subscribers blocked", ["reason"], registry=r)
        self.unblocks = Counter("tollgate_unblocks", "subscribers unblocked", ["reason"], registry=r)
        self.block_latency = Histogram(
            "tollgate_block_latency_seconds", "from the breaching packet to the kernel set holding the subscriber",
            buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1), registry=r)
        self.nft_latency = Histogram("tollgate_nft_update_seconds", "time of one batched nftables update", registry=r)
        self.flush_lag = Gauge("tollgate_flush_lag_seconds", "seconds since the last successful flush", registry=r)
        self.flush_lag.set_function(lambda: time.time() - gw.flusher.last_flush)
        self.drift = Gauge("tollgate_drift_bytes", "kernel minus engine bytes, for subscribers beyond the noise "
                           "threshold at the last check (negative: the engine is ahead of the kernel)",
                           ["subscriber"], registry=r)
        self.unrated = Counter("tollgate_unrated_bytes", "bytes the kernel forwarded that the engine never rated "
                               "(fail-open while no reader was bound, rated but unflushed at a crash), charged when "
                               "found", registry=r)
        self.drift_alarms = Counter("tollgate_drift_alarms", "drift checks that found a subscriber beyond the "
                                    "threshold", registry=r)
        self.resets = Counter("tollgate_connection_resets", "TCP connections of blocked subscribers ended at once "
                              "(policy/resets.py)", registry=r)
        r.register(EngineCollector(gw))
        from .sessions import SessionCollector  # issue 15: sessions and address binding

        r.register(SessionCollector(gw))

    def add_collectors(self, registry) -> None:
        """Another part's own registry (the hosted RADIUS server's) served at /metrics as well."""
        self.registry.register(registry)


class EngineCollector:
    """Exports the engine's own counters at scrape time."""

    def __init__(self, gw) -> None:
        self.gw = gw

    def collect(self):
        s = self.gw.acct.engine.stats()
        for name, value, doc in (
            ("tollgate_packets", s.packets, "packets seen by the engine"),
            ("tollgate_bytes", s.bytes, "IP bytes seen by the engine"),
            ("tollgate_malformed_packets", s.malformed_packets, "packets that could not be parsed"),
            ("tollgate_unknown_packets", s.unknown_packets, "packets of no subscriber"),
            ("tollgate_dropped_packets", s.dropped_packets, "packets dropped for blocked subscribers"),
            ("tollgate_dropped_bytes", s.dropped_bytes, "bytes dropped for blocked subscribers"),
            ("tollgate_over_limit_bytes", s.over_limit_bytes, "bytes rated past a subscriber's limit: flow records "
             "a passive source reported after the traffic passed (0 inline: the breaching packet is dropped)"),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        q = GaugeMetricFamily("tollgate_queue_stat", "nfqueue reader counters", labels=["queue", "stat"])
        for reader in self.gw.readers:
            for key, value in reader.stats().items():
                q.add_metric([self.gw.reader_label(reader), key], value)
        yield q
        drops = CounterMetricFamily("tollgate_queue_kernel_drops", "packets the kernel dropped for a queue "
                                    "(/proc/net/netfilter/nfnetlink_queue)", labels=["queue", "where"])
        for queue_num, queue_dropped, user_dropped in kernel_queue_drops():
            drops.add_metric([str(queue_num), "queue_full"], queue_dropped)
            drops.add_metric([str(queue_num), "socket"], user_dropped)
        yield drops
        yield from self.subscribers()

    def subscribers(self):
        """Bytes and balance of the busiest subscribers. The series are capped
        (``--metrics-subscribers``, default 1000) so a large network cannot
        swamp Prometheus; totals for everyone are in the ledger."""
        gw = self.gw
        top = sorted(gw.flusher.engine_bytes.items(), key=lambda kv: -kv[1])[:gw.opts.metrics_subscribers]
        nbytes = CounterMetricFamily("tollgate_subscriber_bytes", "IP bytes rated for the subscriber since the "
                                     "gateway started", labels=["subscriber"])
        balance = GaugeMetricFamily("tollgate_subscriber_balance", "live balance in internal units (nano-units "
                                    "of the currency, or bytes)", labels=["subscriber"])
        for sid, total in top:
            info = gw.acct.subscribers.get(sid)
            if info is None:
                continue
            nbytes.add_metric([info.name], total)
            balance.add_metric([info.name], gw.acct.engine.subscriber(sid).balance)
        yield nbytes
        yield balance


def kernel_queue_drops() -> list[tuple[int, int, int]]:
    """(queue, dropped because full, dropped because our socket was full) per bound queue."""
    out = []
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 7:
                    out.append((int(fields[0]), int(fields[5]), int(fields[6])))
    except OSError:
        pass
    return out
