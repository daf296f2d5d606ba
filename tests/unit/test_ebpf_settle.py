"""The eBPF source's charge of its counters against the kernel's refunds (gateway/sources/ebpf.py,
``_settle`` and ``settled``), without a kernel: the maps' counters and refunds are plain buffers here.

What a counter charges is ``used - refunded``, one poll after it was read, never less than it charged
already: a refund that comes after its bytes were charged (a late drop) charges nothing until the
delivered total passes what was charged, and nothing is ever charged negative.
"""

from __future__ import annotations

from types import SimpleNamespace

from gateway.sources.ebpf import EbpfSource

N_ZONES = 2


def source(n_counters: int = 4 * N_ZONES * 2):  # subscribers 0..3
    """An EbpfSource with just what ``_settle`` reads: counters' charges and refunds, an engine that records
    what it is asked to rate, a keeper that records what it observes."""
    src = EbpfSource.__new__(EbpfSource)
    rated: list[tuple] = []
    engine = SimpleNamespace(rate_volume=lambda sid, zone, d, nbytes, packets, ts: rated.append(
        (sid, zone, d, nbytes, packets, ts)) or [])
    src.gw = SimpleNamespace(acct=SimpleNamespace(engine=engine))
    src.maps = SimpleNamespace(n_zones=N_ZONES)
    src.keeper = SimpleNamespace(observe=lambda i, nbytes, seconds: None)
    src.counts = {"charged_bytes": 0, "charged_packets": 0}
    src.charged = memoryview(bytearray(n_counters * 16)).cast("Q")
    src.refunds = memoryview(bytearray(n_counters * 16)).cast("B").cast("Q", (n_counters, 2))
    src.unsettled = {}
    return src, rated


def test_charged_one_poll_late_less_refunds():
    src, rated = source()
    i = (1 * N_ZONES + 1) * 2 + 0  # subscriber 1, zone 1, upload
    src.unsettled[i] = (1000, 10, 111)  # read by a poll: used, packets, its time
    src.refunds[i, 0], src.refunds[i, 1] = 300, 2  # dropped after the program counted it, before the next poll
    events: list = []
    assert src._settle({1}, events, 0.05) == 700
    assert rated == [(1, 1, 0, 700, 8, 111)]  # at the time it was read, not the time it was charged
    assert src.settled(i) == 1000  # charged 700, refunded 300: the grant keeper's base
    assert src.unsettled == {}


def test_a_late_refund_charges_nothing_until_the_delivered_total_passes_it():
    src, rated = source()
    i = (2 * N_ZONES + 0) * 2 + 1  # subscriber 2, zone 0, download
    src.unsettled[i] = (1000, 10, 1)
    assert src._settle({2}, [], 0.05) == 1000  # all of it delivered, as far as anyone knew
    src.refunds[i, 0], src.refunds[i, 1] = 400, 4  # a drop of bytes charged already
    src.unsettled[i] = (1200, 12, 2)  # 200 more delivered: 1200 - 400 = 800, less than the 1000 charged
    assert src._settle({2}, [], 0.05) == 0
    src.unsettled[i] = (1800, 18, 3)  # 1800 - 400 = 1400 delivered: 400 more than charged
    assert src._settle({2}, [], 0.05) == 400
    assert sum(r[3] for r in rated) == 1800 - 400 and all(r[3] >= 0 and r[4] >= 0 for r in rated)
    assert [r[4] for r in rated] == [10, 4]  # packets the same way: 18 - 4 = 14 in all


def test_a_subscriber_gone_meanwhile_is_not_charged():
    src, rated = source()
    src.unsettled[(3 * N_ZONES) * 2] = (500, 5, 1)
    assert src._settle(set(), [], 0.05) == 0 and rated == [] and src.unsettled == {}
