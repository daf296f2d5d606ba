"""The tc program's dirty bitmap (tg_dirty) and ``Maps.scan`` reading only
what it marks, through BPF_PROG_TEST_RUN: packets for subscribers spread
over many 64-counter words come back from one scan, each counter once with
its exact delta, and nothing else; a scan with nothing new returns nothing;
what a scan swapped out but nobody charged (a process that died in
between) is found by ``full=True`` against the old snapshot; refused
packets are marked too. A program that sets no bit, or a scan that reads
the wrong counter of a word, fails here."""

from __future__ import annotations

import os
import random

import pytest

from ext.engine_py import ZoneRule

sys_path_benches = os.path.join(os.path.dirname(__file__), "..", "..", "benches")

PIN = f"/sys/fs/bpf/tollgate-test-dirty-{os.getpid()}"
SLOTS = 5000
N_ZONES = 2


@pytest.fixture(scope="module")
def maps():
    from ext.bpfmaps import BpfError, Maps

    try:
        Maps.unpin(PIN)
        m = Maps.load(PIN, max_slots=SLOTS, n_zones=N_ZONES, default_zone=1)
    except (BpfError, ImportError) as exc:
        pytest.fail(f"the eBPF program does not load here: {exc}")
    try:
        m.set_zones([ZoneRule("198.18.0.0/16", 0)])
        yield m
    finally:
        m.close()
        Maps.unpin(PIN)


def addr(slot: int) -> str:
    return f"100.64.{slot // 250}.{slot % 250 + 1}"


def frame(src: str, size: int) -> bytes:
    import sys

    sys.path.insert(0, sys_path_benches)
    from bench_bpf_load import frame4

    return frame4(src, "198.18.0.2", size)


def test_scan_reads_what_moved_and_only_that(maps):
    from ext.bpfmaps import GRANT_FREE, TC_ACT_OK, TC_ACT_SHOT

    rng = random.Random(7)
    slots = sorted(rng.sample(range(SLOTS), 300))
    maps.set_subscribers(slots, [addr(s) + "/32" for s in slots])
    for s in slots:
        maps.set_grant(s, 0, 0, GRANT_FREE)
    snapshot = bytearray(maps.n_counters * 24)
    assert maps.scan(snapshot) == []  # nothing moved yet
    sent = {}
    for s in slots:
        size = 64 + s % 200
        n = 1 + s % 3
        for _ in range(n):
            assert maps.test_run(0, frame(addr(s), size))[0] == TC_ACT_OK
        sent[maps.counter_index(s, 0, 0)] = (n * size, n)
    # a refused one (grant 0 in zone 1: the default zone, for a destination outside 198.18/15)
    refused = slots[0]
    assert maps.test_run(0, frame4_other(addr(refused)))[0] == TC_ACT_SHOT
    hits = maps.scan(snapshot)
    got = {i: (used - ou, packets - op) for i, used, packets, dropped, ou, op, od in hits}
    assert got.pop(maps.counter_index(refused, 1, 0)) == (0, 0)
    assert got == sent
    assert len(hits) == len(sent) + 1
    assert maps.scan(snapshot) == []  # the bits were swapped to 0, nothing moved since
    # moved again, swapped out by another scan whose caller died before charging it: only a full scan finds it
    s = slots[-1]
    before = bytes(snapshot)
    assert maps.test_run(0, frame(addr(s), 100))[0] == TC_ACT_OK
    lost = bytearray(before)
    assert [h[0] for h in maps.scan(lost)] == [maps.counter_index(s, 0, 0)]
    old = bytearray(before)
    assert maps.scan(old) == []
    full = maps.scan(old, full=True)
    assert [(h[0], h[1] - h[4]) for h in full] == [(maps.counter_index(s, 0, 0), 100)]


def frame4_other(src: str) -> bytes:
    import sys

    sys.path.insert(0, sys_path_benches)
    from bench_bpf_load import frame4

    return frame4(src, "198.19.0.9", 80)
