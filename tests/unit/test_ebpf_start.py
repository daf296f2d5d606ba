"""The eBPF source's start, without a kernel: the redirected flags a start sets from nft's restored
blocked set (``EbpfSource._redirect_restored``), now looked up from the networks nft holds (the engine's
exact owners) instead of from every subscriber, give what the look at everyone gave: the subscribers
all of whose networks nft holds, not one with a network left out, not one without networks, not a
network of nobody's or of a subscriber the start does not hold."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

import ext
from ext import netaddr
from gateway.subscriber_table import SubscriberInfo
from gateway.sources.ebpf import EbpfSource

ENGINES = [pytest.param(ext.EnginePy, id="py")] + ([pytest.param(ext.EngineC, id="c")] if ext.EngineC else [])

NETWORKS = {
    1: ["100.64.0.1/32"],  # held: redirected
    2: ["100.64.0.2/32", "2001:db8:2::/64"],  # one of two held: not
    3: ["100.64.0.3/32", "2001:db8:3::/64"],  # both held: redirected
    4: [],  # no networks: never
    5: ["100.64.0.5/32"],  # not held
    6: ["10.6.0.0/16"],  # held, and a /32 inside it that is 7's
    7: ["10.6.0.7/32"],  # held
    8: ["100.64.0.8/32"],  # held, but not among the start's subscribers (left meanwhile)
}
HELD = {"100.64.0.1/32", "100.64.0.2/32", "2001:db8:3::/64", "100.64.0.3/32", "10.6.0.0/16", "10.6.0.7/32",
        "100.64.0.8/32", "100.64.9.9/32"}  # the last: nobody's


@pytest.mark.parametrize("cls", ENGINES)
def test_redirected_from_what_nft_holds(cls, tmp_path):
    e = cls(1, 1, default_zone=0)
    e.set_tariff(0, [1, 1])
    for sid, nets in NETWORKS.items():
        e.add_subscriber(sid, 0, 100)
        for n in nets:
            e.add_address(sid, n)
    subs = {sid: SubscriberInfo(sid, f"s{sid}", "lab", nets) for sid, nets in NETWORKS.items() if sid != 8}
    flagged = []
    src = EbpfSource(e, lambda events: None, pin_dir=str(tmp_path / "nothing-pinned"))
    src.maps = SimpleNamespace(max_slots=64, set_redirected=lambda sid, on: flagged.append((sid, on)))
    src.gw = SimpleNamespace(enforcer_lock=threading.Lock(), engine_lock=threading.RLock(),
                             enforcer=SimpleNamespace(blocked=lambda: set(HELD)), acct=SimpleNamespace(engine=e))
    src._redirect_restored(subs)
    # what the look at every subscriber gave
    everyone = [sid for sid, info in subs.items()
                if info.addresses and all(netaddr.canonical(n) in HELD for n in info.addresses)]
    assert sorted(sid for sid, _on in flagged) == sorted(everyone) == [1, 3, 6, 7]
    assert all(on for _sid, on in flagged)
