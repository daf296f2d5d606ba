"""The maps' bulk operations of a start (ext/bpfmaps.pyx) against what they
replace, one by one, on two loads side by side (root; real maps):

* ``set_subscriber_networks`` (each subscriber's networks as one text,
  parsed in C) binds exactly what ``set_subscribers`` of a slot and a prefix
  each binds: the same keys and values in every subscriber map (bpftool's
  dump), the same flags; a bad network in a text raises and binds nothing;
* ``set_subscriber_networks_arena`` (the same texts read straight from a
  ``SubscriberTable``'s arena, as the eBPF start binds them) binds the same:
  held subscribers only, through changes, deletions and a compaction; a bad
  network, a slot beyond the maps, a word outside the arena raise and bind
  nothing;
* ``mirror_blocked`` leaves the counters' flags, the F_ANY_BLOCKED flag and
  the blocked slots as ``set_blocked(slot, slot in blocked)`` for each slot
  does, from flags a previous process left (a slot blocked that is paid
  since, one that is not a subscriber any more);
* ``refusals_into`` fills the snapshot and finds the refused bytes as the
  Python loop over the counters' view did (a refusal made by the program).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from ext.engine_py import ZoneRule
from gateway.subscriber_table import LENGTH_BITS, SubscriberInfo

PIN = f"/sys/fs/bpf/tollgate-test-bulk-{os.getpid()}"
SLOTS = 300
N_ZONES = 2
SUBMAPS = ("tg_sub4", "tg_sub6", "tg_sub6_64", "tg_sub4_lpm", "tg_sub6_lpm")


@pytest.fixture
def two():
    from ext.bpfmaps import BpfError, Maps

    made = []
    try:
        for k in "ab":
            Maps.unpin(f"{PIN}-{k}")
            made.append(Maps.load(f"{PIN}-{k}", max_slots=SLOTS, n_zones=N_ZONES, default_zone=1))
    except (BpfError, ImportError) as exc:
        for m in made:
            m.close()
        pytest.fail(f"the eBPF program does not load here: {exc}")
    try:
        for m in made:
            m.set_zones([ZoneRule("198.18.0.0/16", 0)])
        yield made
    finally:
        for k, m in zip("ab", made):
            m.close()
            Maps.unpin(f"{PIN}-{k}")


def networks(sid: int) -> list[str]:
    """A /32 each, a /64 for most, a /128, an IPv4 /24 (an LPM entry), an IPv6 /48 and /96 for some."""
    out = [f"100.64.{sid // 250}.{sid % 250 + 1}/32"]
    if sid % 5:
        out.append(f"2001:db8:{sid:x}::/64")
    if sid % 7 == 0:
        out.append(f"2001:db8:ffff::{sid:x}")  # no length: a /128
    if sid % 11 == 0:
        out.append(f"10.{sid % 250}.{sid // 250}.0/24")
    if sid % 13 == 0:
        out += [f"2001:db9:{sid:x}::/48", f"2001:dba::{sid:x}:0:0/96"]
    return out


def dump(m, name: str):
    if shutil.which("bpftool") is None:
        pytest.fail("bpftool is not installed (it reads the maps back): run `make system-deps`", pytrace=False)
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", f"{m.pin_dir}/{name}"], capture_output=True,
                         text=True, check=True).stdout
    return sorted((tuple(e["key"]), tuple(e["value"])) for e in json.loads(out))


def test_networks_as_texts_bind_what_prefixes_bind(two):
    a, b = two
    sids = [s for s in range(1, SLOTS) if s % 3]
    slots, prefixes = [], []
    for sid in sids:
        slots += [sid] * len(networks(sid))
        prefixes += networks(sid)
    texts = [" ".join(networks(sid)) for sid in sids]
    # a subscriber without networks, and a network given twice (rebound: the last one wins in both)
    sids.insert(3, 2 * SLOTS // 3)
    texts.insert(3, "")
    slots.append(7)
    prefixes.append(networks(1)[0])
    sids.append(7)
    texts.append(networks(1)[0])
    a.set_subscribers(slots, prefixes)
    b.set_subscriber_networks(sids, texts)
    assert a.subscriber_count() == b.subscriber_count()
    assert a.subscriber_count()["tg_sub4_lpm"] > 0 and a.subscriber_count()["tg_sub6_lpm"] > 0
    for name in SUBMAPS:
        assert dump(a, name) == dump(b, name), name
    assert a.flags == b.flags


@pytest.mark.parametrize("bad", ["100.64.0.1/33", "100.64.0.1/24", "2001:db8::/64 ", "nonsense", "100.64.0.2  "
                                 "100.64.0.3", "100.64.0.1/+8"])
def test_a_bad_network_in_a_text_binds_nothing(two, bad):
    from ext.bpfmaps import BpfError

    _a, b = two
    with pytest.raises(BpfError):
        b.set_subscriber_networks([1, 2], ["100.64.9.9/32 2001:db8:1::/64", bad])
    assert set(b.subscriber_count().values()) == {0}
    with pytest.raises(BpfError, match="slot"):
        b.set_subscriber_networks([1, SLOTS], ["100.64.9.9/32", "100.64.9.10/32"])
    with pytest.raises(BpfError):
        b.set_subscriber_networks([1], ["100.64.9.9/32", "100.64.9.10/32"])
    assert set(b.subscriber_count().values()) == {0}


def table_of(nets_of: dict):
    from gateway.subscriber_table import SubscriberInfo, SubscriberTable

    return SubscriberTable({sid: SubscriberInfo(sid, f"s{sid}", "lab", nets) for sid, nets in nets_of.items()})


def test_networks_from_the_arena_bind_what_prefixes_bind(two):
    a, b = two
    # 0, 1, 2, 3 and more networks, IPv4 and IPv6, hosts and LPM prefixes
    nets_of = {sid: networks(sid) for sid in range(1, SLOTS) if sid % 3}
    nets_of.update({3: [], 6: ["2001:db8:6::/64"], 9: ["100.64.0.9/32", "2001:db8:9::9"],
                    12: ["10.12.0.0/16", "2001:db8:c::/64", "2001:dbb::/32"]})
    table = table_of(nets_of)
    # held no more (its text stays in the arena: not bound), changed (the old text stale), added again
    del table[4]
    del nets_of[4]
    table[5].addresses = nets_of[5] = ["100.64.200.5/32"]
    table[299] = SubscriberInfo(299, "back", "lab", ["2001:db8:12b::/64"])
    nets_of[299] = ["2001:db8:12b::/64"]
    slots = [sid for sid in sorted(nets_of) for _ in nets_of[sid]]
    a.set_subscribers(slots, [n for sid in sorted(nets_of) for n in nets_of[sid]])
    with table.networks_arena() as (arena, words, present):
        b.set_subscriber_networks_arena(arena, words, present)
    assert a.subscriber_count() == b.subscriber_count()
    assert all(a.subscriber_count().values())
    for name in SUBMAPS:
        assert dump(a, name) == dump(b, name), name
    assert a.flags == b.flags
    # after a compaction (the arena copied, its words moved): the same again
    before = table.networks.state
    for sid in list(table) * 2:  # (the stale bytes pass half the arena)
        table[sid].addresses = nets_of[sid]
    assert table.networks.state is not before  # (compacted)
    with table.networks_arena() as (arena, words, present):
        b.set_subscriber_networks_arena(arena, words, present)
    for name in SUBMAPS:
        assert dump(a, name) == dump(b, name), name


def test_an_empty_table_binds_nothing(two):
    _a, b = two
    with table_of({}).networks_arena() as state:
        b.set_subscriber_networks_arena(*state)
    with table_of({1: [], 2: []}).networks_arena() as state:
        b.set_subscriber_networks_arena(*state)
    assert set(b.subscriber_count().values()) == {0}


@pytest.mark.parametrize("bad", ["100.64.0.1/33", "100.64.0.1/24", "2001:db8::/64 ", "nonsense", "100.64.0.2  "
                                 "100.64.0.3", "100.64.0.1/+8", "2001:db8::1/129", "réseau/32"])
def test_a_bad_network_in_the_arena_binds_nothing(two, bad):
    from ext.bpfmaps import BpfError

    _a, b = two
    table = table_of({1: ["100.64.9.9/32", "2001:db8:1::/64"], 2: ["100.64.9.10/32"], 3: [bad]})
    with table.networks_arena() as (arena, words, present):
        with pytest.raises(BpfError, match="bad prefix"):
            b.set_subscriber_networks_arena(arena, words, present)
    assert set(b.subscriber_count().values()) == {0}
    del table[3]  # held no more: its text is not read
    with table.networks_arena() as state:
        b.set_subscriber_networks_arena(*state)
    assert b.subscriber_count()["tg_sub4"] == 2


def test_the_arena_s_slots_and_words_are_checked(two):
    from array import array

    from ext.bpfmaps import BpfError

    _a, b = two
    table = table_of({1: ["100.64.9.9/32"], SLOTS: ["100.64.9.10/32"]})
    with table.networks_arena() as (arena, words, present):
        with pytest.raises(BpfError, match=f"slot {SLOTS} of '100.64.9.10/32' is not in 0..{SLOTS - 1}"):
            b.set_subscriber_networks_arena(arena, words, present)
        present = bytes(present[:SLOTS])  # (SLOTS left out: the rest binds)
        bad = array("Q", words)
        bad[1] = (len(arena) << LENGTH_BITS) | 3  # a word beyond the arena's end
        with pytest.raises(BpfError, match="beyond the arena"):
            b.set_subscriber_networks_arena(arena, bad, present)
        with pytest.raises(BpfError, match="words for"):
            b.set_subscriber_networks_arena(arena, words[:1], present)
        with pytest.raises(BpfError, match="64-bit"):
            b.set_subscriber_networks_arena(arena, array("I", bytes(8 * len(words))), present)
        assert set(b.subscriber_count().values()) == {0}
        b.set_subscriber_networks_arena(arena, words, present)
    assert b.subscriber_count()["tg_sub4"] == 1


def flags(m) -> list[int]:
    view = m.counters()
    try:
        return [view[i, 7] for i in range(m.n_counters)]
    finally:
        view.release()


@pytest.mark.parametrize("before, blocked", [
    ({3, 9, 250}, {9, 40}),  # 3 paid since, 250 not a subscriber any more: its flag stays
    ((), {40}),
    ({5}, set()),  # nobody blocked any more: F_ANY_BLOCKED goes
    ((), set()),
    ({-1}, set()),  # F_ANY_BLOCKED left set with no slot blocked (a slot's flags cleared behind its back)
    ({-1}, {12}),
])
def test_mirror_blocked_leaves_what_set_blocked_of_everyone_leaves(two, before, blocked):
    from ext.bpfmaps import F_ANY_BLOCKED, Maps

    among = {s: None for s in range(1, 200)}  # the subscribers (a dict, as the start's)
    for m in two:
        for s in before:
            m.set_blocked(abs(s), True)
            if s < 0:
                view = m.counters()
                for i in range(abs(s) * N_ZONES * 2, (abs(s) + 1) * N_ZONES * 2):
                    view[i, 7] = 0
                view.release()
    # a process that starts anew reads the flags the previous one left
    a, b = [Maps.open(m.pin_dir) for m in two]
    try:
        for s in among:
            a.set_blocked(s, s in blocked)
        b.mirror_blocked(blocked, among)
        assert flags(a) == flags(b)
        assert a.blocked_slots() == b.blocked_slots() == set(blocked) | ({250} & set(before))
        assert any(f for f in flags(b)) == bool(blocked or 250 in before)
        assert a.flags == b.flags
        assert bool(b.flags & F_ANY_BLOCKED) == bool(blocked or 250 in before)
    finally:
        a.close()
        b.close()


def test_mirror_blocked_refuses_a_slot_it_does_not_mirror(two):
    from ext.bpfmaps import BpfError

    _a, b = two
    with pytest.raises(BpfError):
        b.mirror_blocked({SLOTS + 1}, {SLOTS + 1: None})
    with pytest.raises(BpfError):
        b.mirror_blocked({4}, {5: None})
    assert b.blocked_slots() == set()


def test_refusals_into_reads_what_the_loop_read(two):
    import sys

    from ext.bpfmaps import COUNTER_FIELDS, GRANT_FREE, TC_ACT_OK, TC_ACT_SHOT

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benches"))
    from bench_bpf_load import frame4

    m = two[0]
    subs = [1, 2, 3, 70, 299]
    m.set_subscribers(subs, [networks(s)[0] for s in subs])
    for s in subs:
        m.set_grant(s, 0, 0, GRANT_FREE)
    for s, size in ((2, 300), (2, 500), (70, 64)):  # refused: zone 1 (outside 198.18/16) has no grant
        assert m.test_run(0, frame4(networks(s)[0][:-3], "203.0.113.9", size))[0] == TC_ACT_SHOT
    # and a download refused: the slot's last counter (zone 1, direction 1)
    assert m.test_run(1, frame4("203.0.113.9", networks(299)[0][:-3], 90))[0] == TC_ACT_SHOT
    assert m.test_run(0, frame4(networks(3)[0][:-3], "198.18.0.2", 100))[0] == TC_ACT_OK
    snapshot = bytearray(m.n_counters * 24)
    got = m.refusals_into(snapshot, {s: None for s in subs if s != 70})  # 70: not a subscriber now
    want_snap = memoryview(bytearray(m.n_counters * 24)).cast("Q")
    want = {}
    view = m.counters()
    try:
        db, dp = COUNTER_FIELDS.index("dropped_bytes"), COUNTER_FIELDS.index("dropped_packets")
        for sid in (1, 2, 3, 299):
            for i in range(sid * N_ZONES * 2, (sid + 1) * N_ZONES * 2):
                want_snap[3 * i + 2] = view[i, dp]
                if view[i, db]:
                    want[i] = view[i, db]
    finally:
        view.release()
    assert got == want == {m.counter_index(2, 1, 0): 800, m.counter_index(299, 1, 1): 90}
    assert snapshot == want_snap.tobytes()
