"""What ``tollgate run`` was asked to do: the daemon's options, and what follows from the source."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunOptions:
    config_path: str
    db_path: str
    queues: tuple = (0,)
    fail_open: bool = True
    listen: str = "::"  # both families (see http.listen_socket)
    port: int = 8080
    engine: str | None = None
    flush_interval: float = 1.0
    batch_size: int = 64
    linger_us: int = 0
    drift_interval: float = 10.0  # seconds between engine-vs-kernel comparisons
    drift_min_bytes: int = 64 * 1024  # a drift below this (or 0.5% of the kernel's count) is noise
    metrics_subscribers: int = 1000  # cap on per-subscriber series in /metrics
    clock_offset: float = 0.0  # seconds added to the calendar's clock (see Gateway.calendar_now)
    source: str = "nfqueue"  # see gateway/sources
    source_options: dict = field(default_factory=dict)
    kernel_quota: bool | None = None  # per-subscriber kernel quotas; None: on for nflog and conntrack

    @property
    def inline(self) -> bool:
        return self.source == "nfqueue"

    @property
    def kernel_marked(self) -> bool:
        """Whether what the engine rates is what our table's counters count,
        so that the ledger keeps kernel marks (inline; conntrack, bounded by
        them, see gateway/sources/conntrack.py)."""
        return self.source in ("nfqueue", "conntrack")

    @property
    def bpf_marked(self) -> bool:
        """The eBPF source: the ledger keeps per-zone marks of its kernel
        counters (Ledger.apply_flush_bpf), and the nft drift check is off."""
        return self.source == "ebpf"

    @property
    def quotas(self) -> bool:
        """Whether kernel quotas back a passive source (see gateway/sources/nflog.py):
        meaningful only where the gateway forwards the traffic it counts."""
        if self.inline:
            return False
        return self.source in ("nflog", "conntrack") if self.kernel_quota is None else self.kernel_quota
