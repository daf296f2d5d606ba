"""The engine's two start queries (both engines, the same answers):
``owner(network)``, the subscriber that owns exactly that prefix (not one
around it, not one inside it), and ``blocked_subscribers()``, the blocked
ones, ascending (the eBPF source's start maps nft's blocked set to
subscribers and mirrors the blocks with them, gateway/sources/ebpf.py)."""

from __future__ import annotations

import pytest

import ext
from ext.constants import BLOCK_LIMIT, BLOCK_VOLUME
from ext.errors import EngineError

ENGINES = [pytest.param(ext.EnginePy, id="py")] + ([pytest.param(ext.EngineC, id="c")] if ext.EngineC else [])


def engine(cls):
    e = cls(1, 1, default_zone=0)
    e.set_tariff(0, [1, 1])
    for sid in range(1, 8):
        e.add_subscriber(sid, 0, 100 if sid != 4 else -5)  # 4: below its credit, blocked as it comes in
    e.add_address(1, "100.64.0.0/24")
    e.add_address(2, "100.64.0.7/32")  # inside 1's /24
    e.add_address(3, "2001:db8:1::/64")
    e.add_address(3, "2001:db8:1::9/128")
    e.add_address(5, "10.0.0.0/8")
    return e


@pytest.mark.parametrize("cls", ENGINES)
def test_owner_is_exact(cls):
    e = engine(cls)
    assert e.owner("100.64.0.0/24") == 1
    assert e.owner("100.64.0.7/32") == 2
    assert e.owner("100.64.0.8/32") == 0  # inside 1's /24: not a prefix anyone was given
    assert e.owner("100.64.0.0/23") == 0
    assert e.owner("2001:db8:1::/64") == 3 and e.owner("2001:db8:1::9/128") == 3
    assert e.owner("2001:db8:1:0:0:0:0:0/64") == 3  # any text of it
    assert e.owner("10.0.0.0/8") == 5
    e.remove_address("10.0.0.0/8")
    assert e.owner("10.0.0.0/8") == 0
    with pytest.raises(EngineError):
        e.owner("100.64.0.1/24")  # host bits: not a network


@pytest.mark.parametrize("cls", ENGINES)
def test_blocked_subscribers(cls):
    e = engine(cls)
    assert e.blocked_subscribers() == [4]
    e.block(6, BLOCK_VOLUME)
    e.block(2, BLOCK_LIMIT)
    assert e.blocked_subscribers() == [2, 4, 6]
    e.unblock(2, BLOCK_LIMIT)
    e.remove_subscriber(6)
    assert e.blocked_subscribers() == [4]
