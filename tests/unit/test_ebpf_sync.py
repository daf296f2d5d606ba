"""The eBPF source's ``sync_addresses`` without a copy of what the maps hold (gateway/sources/ebpf.py): the
touched subscribers' networks bound again as the Accountant holds them now (one call, in C), those that left
forgotten by the grant keeper, one beyond the maps' slots refused with the reason, one without networks
left alone; the Accountant's table read and the maps written in one hold of the engine lock, so that a
network the change follower moves meanwhile is never bound again to the owner it left. Without a kernel."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import ext
from gateway.subscriber_table import SubscriberInfo
from gateway.sources.ebpf import EbpfSource


class Lock:
    """The engine lock, saying whether it is held."""

    def __init__(self) -> None:
        self.lock, self.held = threading.Lock(), False

    def __enter__(self):
        self.lock.acquire()
        self.held = True

    def __exit__(self, *exc):
        self.held = False
        self.lock.release()


def source(tmp_path, subscribers):
    e = ext.EnginePy(1, 1, default_zone=0)
    src = EbpfSource(e, lambda events: None, pin_dir=str(tmp_path / "nothing-pinned"))
    lock, bound, forgotten = Lock(), [], []

    def bind(slots, texts):
        assert lock.held, "the maps written outside the engine lock"
        bound.append((list(slots), list(texts)))

    src.maps = SimpleNamespace(max_slots=8, set_subscriber_networks=bind)
    src.keeper = SimpleNamespace(forget=forgotten.append)
    src.gw = SimpleNamespace(engine_lock=lock, acct=SimpleNamespace(subscribers=subscribers))
    return src, bound, forgotten


def test_touched_networks_bound_again_and_the_gone_forgotten(tmp_path, caplog):
    subs = {1: SubscriberInfo(1, "s1", "lab", ["100.64.0.1/32", "2001:db8:1::/64"]),
            3: SubscriberInfo(3, "s3", "lab", []),
            9: SubscriberInfo(9, "s9", "lab", ["100.64.0.9/32"])}
    src, bound, forgotten = source(tmp_path, subs)
    src.touch([1, 2, 3, 9])
    with caplog.at_level(logging.ERROR, "tollgate.sources.ebpf"):
        src.sync_addresses()
    assert bound == [([1], ["100.64.0.1/32 2001:db8:1::/64"])]
    assert forgotten == [2]
    assert "subscriber 9 does not fit the maps' 8 slots" in caplog.text
    bound.clear()
    src.sync_addresses()  # nothing touched since: nothing written
    assert bound == [] and forgotten == [2]


def test_a_network_moved_by_the_change_follower_is_bound_as_it_is_now(tmp_path):
    subs = {1: SubscriberInfo(1, "s1", "lab", ["100.64.0.1/32"]), 2: SubscriberInfo(2, "s2", "lab", [])}
    src, bound, _ = source(tmp_path, subs)
    src.touch([1, 2])
    # the change follower hands s1's network to s2 (its hooks moved it in the maps) before the sync runs
    subs[1].addresses, subs[2].addresses = (), ("100.64.0.1/32",)
    src.sync_addresses()
    assert bound == [([2], ["100.64.0.1/32"])]


def test_nothing_touched_nothing_locked(tmp_path):
    src, bound, forgotten = source(tmp_path, {})
    src.gw.engine_lock = None  # not even taken
    src.sync_addresses()
    assert bound == [] == forgotten
