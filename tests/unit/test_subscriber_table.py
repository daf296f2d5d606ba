"""gateway/subscriber_table.py: the Accountant's subscribers and terms as columns answer every Mapping
operation the daemon uses as a dict of the same facts does, after the same operations (hypothesis drives
both), and stay that way through changes, deletions, re-adds and the arenas' compaction."""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from accounting.billing import Terms
from gateway import subscriber_table as st_mod
from gateway.subscriber_table import (MAX_SID, NO_SINCE, SubscriberInfo, SubscriberTable, SubscriberView,
                                      TermsTable)

NAMES = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)  # any letters: é, ß, 漢, emoji
NETWORK = st.sampled_from(["100.64.0.1/32", "100.64.1.0/24", "2001:db8:100::/64", "10.0.0.0/8", "100.64.9.9/32"])
NETWORKS = st.lists(NETWORK, max_size=6).map(tuple)
TARIFFS = st.sampled_from(["lab", "flat", "tarif été"])
SINCES = st.one_of(st.none(), st.integers(NO_SINCE + 1, (1 << 63) - 1))
SIDS = st.one_of(st.integers(0, 40), st.integers(0, 5000))


def facts(info) -> tuple:
    return info.name, info.tariff, info.addresses, info.networks_text, info.since


def same(table: SubscriberTable, model: dict) -> None:
    """Every read the daemon makes, against the dict."""
    assert len(table) == len(model)
    assert list(table) == sorted(model)  # (ascending id)
    assert list(table.keys()) == sorted(model)
    assert [(sid, facts(v)) for sid, v in table.items()] == sorted(model.items())
    assert [facts(v) for v in table.values()] == [model[s] for s in sorted(model)]
    for sid, want in model.items():
        assert sid in table
        assert facts(table[sid]) == want and facts(table.get(sid)) == want and table[sid].id == sid
    for sid in (0, 1, 7, 41, 5001, -1, MAX_SID, MAX_SID + 1, "1", None, 1.0, True):
        if sid not in model:
            assert sid not in table and table.get(sid) is None and table.get(sid, "x") == "x"
    assert table.since_of() == {sid: f[4] for sid, f in model.items() if f[4] is not None}
    assert dict(table) == {sid: table[sid] for sid in model}
    assert table.networks_texts() == [model[s][3] for s in sorted(model)]  # (read in C, all at once)
    assert table.all_networks() == [n for s in sorted(model) for n in model[s][2]]
    assert table.networks_by_id() == (sorted(model), [model[s][3] for s in sorted(model)])
    assert {sid: facts(v) for sid, v in table.views(sorted(model)).items()} == model
    with table.networks_arena() as (arena, words, present):  # (what the eBPF start binds, read as C reads it)
        assert table.lock.locked()  # its writers wait meanwhile
        held = [sid for sid in range(len(present)) if present[sid]]
        starts_lengths = [(words[sid] >> st_mod.LENGTH_BITS, words[sid] & st_mod.MAX_TEXT) for sid in held]
        assert held == sorted(model)
        assert [arena[a:a + n].decode() for a, n in starts_lengths] == [model[s][3] for s in held]
    assert not table.lock.locked()


class TableAgainstDict(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table, self.model = SubscriberTable(), {}

    @rule(sid=SIDS, name=NAMES, tariff=TARIFFS, nets=NETWORKS, since=SINCES)
    def assign(self, sid, name, tariff, nets, since):
        self.table[sid] = SubscriberInfo(sid, name, tariff, nets, since)
        self.model[sid] = (name, tariff, nets, " ".join(nets), since)

    @rule(first=SIDS, rows=st.lists(st.tuples(NAMES, TARIFFS, NETWORKS, SINCES), min_size=1, max_size=30),
          consecutive=st.booleans(), data=st.data())
    def fill(self, first, rows, consecutive, data):
        """A chunk as a start fills it: consecutive ids (slices), or any (duplicates too: the last wins)."""
        sids = list(range(first, first + len(rows))) if consecutive else \
            data.draw(st.lists(SIDS, min_size=len(rows), max_size=len(rows)))
        self.table.fill(sids, [r[0] for r in rows], [r[1] for r in rows], [" ".join(r[2]) for r in rows],
                        [r[3] for r in rows])
        for sid, (name, tariff, nets, since) in zip(sids, rows):
            self.model[sid] = (name, tariff, nets, " ".join(nets), since)

    @rule(data=st.data(), name=NAMES)
    def rename(self, data, name):
        if self.model:
            sid = data.draw(st.sampled_from(sorted(self.model)))
            self.table[sid].name = name
            self.model[sid] = (name, *self.model[sid][1:])

    @rule(data=st.data(), nets=NETWORKS)
    def new_networks(self, data, nets):
        if self.model:
            sid = data.draw(st.sampled_from(sorted(self.model)))
            self.table.get(sid).addresses = nets
            old = self.model[sid]
            self.model[sid] = (old[0], old[1], nets, " ".join(nets), old[4])

    @rule(data=st.data(), tariff=TARIFFS, since=SINCES)
    def new_tariff_and_since(self, data, tariff, since):
        if self.model:
            sid = data.draw(st.sampled_from(sorted(self.model)))
            info = self.table[sid]
            info.tariff, info.since = tariff, since
            old = self.model[sid]
            self.model[sid] = (old[0], tariff, old[2], old[3], since)

    @rule(data=st.data())
    def take_since(self, data):
        if self.model:
            sid = data.draw(st.sampled_from(sorted(self.model)))
            assert self.table.take_since(sid) == self.model[sid][4]
            self.model[sid] = (*self.model[sid][:4], None)
        assert self.table.take_since(99999) is None

    @rule()
    def take_all_since(self):
        """A start's start_billing: everyone's since at once, none from then on."""
        taken = self.table.take_all_since()
        assert {sid: v for sid, v in enumerate(taken) if v != NO_SINCE} == \
            {sid: f[4] for sid, f in self.model.items() if f[4] is not None}
        self.model = {sid: (*f[:4], None) for sid, f in self.model.items()}

    @rule(sid=SIDS)
    def delete(self, sid):
        if sid in self.model:
            view = self.table[sid]
            del self.table[sid]
            del self.model[sid]
            with pytest.raises(KeyError):
                view.name = "gone"  # a write to a row that left
        else:
            with pytest.raises(KeyError):
                del self.table[sid]

    @invariant()
    def agree(self):
        same(self.table, self.model)

    @invariant()
    def arena_bounded(self):
        """Stale bytes never pass half an arena after a write (it is compacted then)."""
        for arena in (self.table.names, self.table.networks):
            assert arena.stale * 2 <= len(arena.state[0])
            live = sum(arena.length(s) for s in self.table)
            assert len(arena.state[0]) - arena.stale == live


TestTableAgainstDict = TableAgainstDict.TestCase
TestTableAgainstDict.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


def test_names_networks_and_ids_at_the_edges():
    t = SubscriberTable()
    many = tuple(f"100.64.{i // 256}.{i % 256}/32" for i in range(5000))
    t[0] = SubscriberInfo(0, "Zoë Ünal 漢字 🙂", "tarif été", ())
    t[1 << 20] = SubscriberInfo(1 << 20, "x", "lab", many, 5)
    assert list(t) == [0, 1 << 20] and len(t) == 2
    assert t[0].name == "Zoë Ünal 漢字 🙂" and t[0].tariff == "tarif été"
    assert t[0].addresses == () and t[0].networks_text == ""  # no networks
    assert t[1 << 20].addresses == many and t[1 << 20].networks_text == " ".join(many) and t[1 << 20].since == 5
    assert t.nbytes()["networks"] >= len(" ".join(many))
    assert t.networks_texts() == ["", " ".join(many)] and t.all_networks() == list(many)
    t[3] = SubscriberInfo(3, "n", "lab", ("réseau/32", "x/1"))  # (not a network the engine takes: the table's path
    assert t.networks_texts() == ["", "réseau/32 x/1", " ".join(many)]  # for texts that are not ASCII)


def test_the_largest_id_and_beyond(monkeypatch):
    monkeypatch.setattr(st_mod, "MAX_SID", 4095)  # (the real one, 2**24 - 1, would size columns of 16M)
    t = SubscriberTable()
    t.fill([4095], ["last"], ["lab"], [""], [None])
    assert len(t.present) == 4096 and list(t) == [4095] and t[4095].name == "last"
    for bad in (4096, -1):
        with pytest.raises(ValueError, match="outside 0..4095"):
            t[bad] = SubscriberInfo(bad, "n", "lab")
        assert bad not in t and t.get(bad) is None
    with pytest.raises(TypeError, match="is an int"):
        t["7"] = SubscriberInfo(7, "n", "lab")
    with pytest.raises(TypeError, match="is an int"):
        t[True] = SubscriberInfo(1, "n", "lab")
    assert list(t) == [4095]


def test_bad_input_changes_nothing():
    t = SubscriberTable()
    t[1] = SubscriberInfo(1, "a", "lab", ("100.64.0.1/32",), 7)
    before = facts(t[1])
    with pytest.raises(ValueError, match="differ in length"):
        t.fill([2, 3], ["b"], ["lab"], [""], [None])
    with pytest.raises(ValueError, match="64-bit"):
        t.fill([1, 2], ["z", "b"], ["lab", "lab"], ["", ""], [None, 1 << 63])
    with pytest.raises(TypeError, match="since"):
        t[1].since = "yesterday"
    with pytest.raises(TypeError, match="not one str"):
        t[1].addresses = "100.64.0.9/32"  # a text is not a sequence of networks
    with pytest.raises(TypeError, match="name"):
        t[1].name = None
    with pytest.raises(ValueError, match="64-bit"):
        t[1].since = NO_SINCE  # the sentinel is not a time
    assert facts(t[1]) == before and len(t) == 1 and list(t) == [1]


def test_del_then_re_add():
    t = SubscriberTable()
    t.fill([1, 2, 3], ["a", "b", "c"], ["lab"] * 3, ["100.64.0.1/32", "", "100.64.0.3/32"], [1, 2, 3])
    view = t[2]
    del t[2]
    assert 2 not in t and list(t) == [1, 3] and len(t) == 2 and t.since_of() == {1: 1, 3: 3}
    assert view.name == "b"  # a thread's view of a subscriber that left meanwhile reads what it held
    assert t.take_since(2) is None
    with pytest.raises(KeyError):
        t[2]
    t.fill([2], ["b again"], ["flat"], ["100.64.0.2/32"], [None])
    assert list(t) == [1, 2, 3] and len(t) == 3 and facts(t[2]) == ("b again", "flat", ("100.64.0.2/32",),
                                                                     "100.64.0.2/32", None)
    assert view.name == "b again"  # the same subscriber id: the same subscriber


def test_many_changes_keep_the_arenas_small():
    """A long-running daemon: each change appends its text; the stale bytes are compacted away."""
    n = 2000
    t = SubscriberTable()
    t.fill(list(range(1, n + 1)), [f"s{i}" for i in range(n)], ["lab"] * n,
           [f"100.64.{i // 256}.{i % 256}/32" for i in range(n)], [None] * n)
    size = len(t.networks.state[0]), len(t.names.state[0])
    for k in range(20):
        for sid in range(1, n + 1, 3):
            info = t[sid]
            info.addresses = (f"10.{k}.{sid // 256}.{sid % 256}/32",)
            info.name = f"s{sid - 1}" if k % 2 else f"S{sid - 1}"
    assert len(t.networks.state[0]) <= 2 * size[0] + 64 and len(t.names.state[0]) <= 2 * size[1] + 64
    for sid in range(1, n + 1):
        i = sid - 1
        want = f"10.19.{sid // 256}.{sid % 256}/32" if sid % 3 == 1 else f"100.64.{i // 256}.{i % 256}/32"
        assert t[sid].addresses == (want,) and t[sid].name == (f"s{i}")
    for sid in range(1, n + 1, 2):
        del t[sid]
    assert len(t.networks.state[0]) - t.networks.stale == sum(t.networks.length(s) for s in t)
    assert t.networks.stale * 2 <= len(t.networks.state[0])


def test_the_daemons_threads_read_whole_texts_while_one_writes():
    t = SubscriberTable()
    t.fill(list(range(1, 201)), ["aaaa"] * 200, ["lab"] * 200, ["100.64.0.1/32"] * 200, [None] * 200)
    stop, bad = threading.Event(), []

    def read():
        while not stop.is_set():
            for sid in range(1, 201):
                info = t.get(sid)
                if info is not None and (info.name not in ("aaaa", "bbbbbbbb") or
                                         info.networks_text not in ("100.64.0.1/32", "2001:db8:100::/64 10.0.0.0/8")):
                    bad.append((info.name, info.networks_text))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for r in readers:
        r.start()
    try:
        for k in range(30):  # (compactions on the way)
            for sid in range(1, 201):
                t[sid].name = "bbbbbbbb" if k % 2 else "aaaa"
                t[sid].addresses = ("2001:db8:100::/64", "10.0.0.0/8") if k % 2 else ("100.64.0.1/32",)
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert not bad


def test_a_view_has_the_attributes_of_a_subscriber_info():
    t = SubscriberTable()
    info = SubscriberInfo(5, "e", "lab", ["100.64.0.5/32", "2001:db8:100:5::/64"], 9)
    t[5] = info
    view = t[5]
    assert isinstance(view, SubscriberView) and view == info and not hasattr(view, "__dict__")
    for attr in ("id", "name", "tariff", "addresses", "networks_text", "since"):
        assert getattr(view, attr) == getattr(info, attr), attr
    t[6] = view  # another row from a view
    assert facts(t[6]) == facts(info) and t[6].id == 6


# ---- terms -------------------------------------------------------------------

TERMS = [Terms("lab"), Terms("lab", credit_limit=5), Terms("flat"), Terms("lab")]  # [0] == [3], not the same object


class TermsAgainstDict(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table, self.model = TermsTable(), {}

    @rule(sid=SIDS, k=st.integers(0, len(TERMS) - 1))
    def assign(self, sid, k):
        self.table[sid] = self.model[sid] = TERMS[k]

    @rule(first=SIDS, ks=st.lists(st.integers(0, len(TERMS) - 1), min_size=1, max_size=20),
          consecutive=st.booleans(), data=st.data())
    def fill(self, first, ks, consecutive, data):
        sids = list(range(first, first + len(ks))) if consecutive else \
            data.draw(st.lists(SIDS, min_size=len(ks), max_size=len(ks)))
        self.table.fill(sids, [TERMS[k] for k in ks])
        for sid, k in zip(sids, ks):
            self.model[sid] = TERMS[k]

    @rule(sid=SIDS)
    def delete(self, sid):
        assert self.table.pop(sid, None) is self.model.pop(sid, None)

    @invariant()
    def agree(self):
        t, m = self.table, self.model
        assert len(t) == len(m) and list(t) == sorted(m)
        assert [(s, id(v)) for s, v in t.items()] == [(s, id(m[s])) for s in sorted(m)]
        assert [id(v) for v in t.values()] == [id(m[s]) for s in sorted(m)]
        for sid in range(-1, 45):
            assert (sid in t) == (sid in m) and t.get(sid) is m.get(sid)
        assert t == m  # (Mapping equality, field by field: test_ledger_rows compares two Accountants' terms)
        held = {id(v): v for v in m.values()}
        assert sorted(map(id, t.distinct())) == sorted(held)  # nobody's Terms is no longer held
        for terms in TERMS:
            assert t.holding([terms]) == sorted(s for s, v in m.items() if v is terms)


TestTermsAgainstDict = TermsAgainstDict.TestCase
TestTermsAgainstDict.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


def test_terms_slots_are_reused():
    t = TermsTable()
    for round_ in range(50):  # a terms object made for each change (a config entry's, a voucher's)
        t[1] = Terms("lab", credit_limit=round_)
    assert len(t.objects) <= 3 and len(t.distinct()) == 1 and t[1].credit_limit == 49
    with pytest.raises(TypeError, match="Terms"):
        t[2] = None
    with pytest.raises(ValueError, match="outside"):
        t[MAX_SID + 1] = Terms("lab")
    assert list(t) == [1]


@given(st.lists(st.tuples(NAMES, NETWORKS), min_size=1, max_size=50))
@settings(max_examples=50, deadline=None)
def test_a_chunk_filled_at_once_reads_back(rows):
    t = SubscriberTable()
    sids = list(range(1, len(rows) + 1))
    t.fill(sids, [r[0] for r in rows], ["lab"] * len(rows), [" ".join(r[1]) for r in rows], [None] * len(rows))
    assert [(t[s].name, t[s].addresses) for s in sids] == rows
