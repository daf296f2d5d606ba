"""``gateway.runtime.ledger_rows`` (one pass over ``Ledger.subscriber_rows``) gives what it gave when it was
built from ``Ledger.subscribers()``: the same subscribers, addresses and terms, and the same ``Terms``
once through ``Accountant.terms_for`` (which shares one object between subscribers of equal inputs)."""

from __future__ import annotations

import ipaddress
import sys
import tomllib

from accounting import prepaid
from accounting.ledger import Ledger
from gateway.config import ClusterSettings, parse_config
import gateway.runtime
from gateway.runtime import Accountant, iter_ledger_rows, ledger_rows

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_tariff_scenarios import BASE  # noqa: E402

CONFIG = BASE.format(currency="EUR") + """
[[tariff]]
name = "flat"
price_unit = "MB"
[tariff.prices]
external = "1.00"
peering = "1.00"

[[tariff]]
name = "other"
price_unit = "MB"
[tariff.prices]
external = "2.00"
peering = "2.00"
"""


def old_rows(ledger, created_is_since=True):
    """ledger_rows as it was (HEAD 2dcb2b8): two dicts a subscriber, from Ledger.subscribers()."""
    starts = prepaid.volume_starts(ledger)
    return [{**{k: s[k] for k in ("id", "name", "tariff", "balance", *Ledger.TERMS)},
             "addresses": list(s["addresses"]),
             "since": s["billing_since_ns"] or (s["created_ns"] if created_is_since else None),
             "volume_since": starts.get(s["id"])}
            for s in ledger.subscribers() if s.get("active", 1)]


def same(new, old):
    """new rows carry the terms they set and addresses as one text, joined by spaces: equal otherwise."""
    assert [r["id"] for r in new] == [r["id"] for r in old]
    for n, o in zip(new, old):
        assert type(n["addresses"]) is str
        assert {**{k: None for k in Ledger.TERMS}, **n,
                "addresses": n["addresses"].split(" ") if n["addresses"] else []} == o


def test_ledger_rows_as_before(tmp_path, monkeypatch):
    ledger = Ledger.open(tmp_path / "l.db")
    a = ledger.add_subscriber("a", "flat", "EUR", 5, addresses=["100.64.0.2/32", "2001:db8:100:1::/64"])
    b = ledger.add_subscriber("b", "flat", "EUR", 7, credit_limit=3, addresses=["100.64.0.3/32"])
    c = ledger.add_subscriber("c", "other", "EUR", 0)  # no address
    d = ledger.add_subscriber("d", "flat", "EUR", 1, addresses=["100.64.0.9/32", "100.64.0.8/32", "100.64.1.0/24"])
    e = ledger.add_subscriber("e", "flat", "EUR", 1, addresses=["100.64.0.10/32"])
    f = ledger.add_subscriber("f", "flat", "EUR", 9, addresses=["2001:db8:100:2::/64"])
    ledger.set_terms(b, discount_bp=2500, discount_until_ns=10 ** 18, volume_limit=10 ** 9, speed_up_bps=10 ** 6,
                     access_hours="mon-fri 08:00-18:00")
    ledger.set_terms(d, credit_until_ns=5 * 10 ** 17, max_connections=10)
    ledger.set_billing_since(d, 4 * 10 ** 17)
    ledger.set_active(e, False)
    same(ledger_rows(ledger, created_is_since=False), old_rows(ledger, created_is_since=False))
    new, old = ledger_rows(ledger), old_rows(ledger)
    same(new, old)
    assert [r["name"] for r in new] == ["a", "b", "c", "d", "f"]
    assert [r["addresses"] for r in new] == ["100.64.0.2/32 2001:db8:100:1::/64", "100.64.0.3/32", "",
                                             "100.64.0.8/32 100.64.0.9/32 100.64.1.0/24", "2001:db8:100:2::/64"]
    assert new[3]["since"] == 4 * 10 ** 17 and new[0]["since"] == old[0]["since"] is not None
    assert {k for k in new[0] if k in Ledger.TERMS} == {"credit_limit"}  # terms not set are not in the row

    cfg = parse_config(tomllib.loads(CONFIG))
    acct, before = Accountant(cfg, ledger), Accountant(cfg, ledger)
    events = acct.load_subscribers(new)
    assert before.load_subscribers(old) == events
    assert acct.terms == before.terms  # the same terms, field by field
    assert acct.terms[a] is acct.terms[f]  # a and f differ in no input: one object
    assert acct.terms[d] is not acct.terms[a] and acct.terms[d].credit_until == 5 * 10 ** 17
    assert acct.terms[a].credit_limit == 0 and acct.terms[b].credit_limit == 3 and acct.terms[c].tariff == "other"
    assert acct.terms[b].discount == 2500 and acct.terms[b].volume_limit == 10 ** 9
    assert acct.terms[b].access is not None and acct.terms[a].access is None
    assert acct.access_dirty == {b}  # only hours can block a subscriber just loaded (check_access looks at those)
    assert acct.since[d] == 4 * 10 ** 17
    assert {s: (i.name, i.tariff, i.addresses) for s, i in acct.subscribers.items()} == \
        {s: (i.name, i.tariff, i.addresses) for s, i in before.subscribers.items()}

    # streamed as a start does it, two rows at a time: the engine and the Accountant end the same
    monkeypatch.setattr(gateway.runtime, "ROW_CHUNK", 2)
    streamed = Accountant(cfg, ledger)
    assert streamed.load_subscribers(iter_ledger_rows(ledger)) == events
    assert streamed.terms == acct.terms and streamed.since == acct.since and streamed.access_dirty == acct.access_dirty
    assert {s: (i.name, i.tariff, i.addresses) for s, i in streamed.subscribers.items()} == \
        {s: (i.name, i.tariff, i.addresses) for s, i in acct.subscribers.items()}
    for sid in acct.subscribers:
        assert streamed.engine.subscriber(sid) == acct.engine.subscriber(sid)
    for address in ("100.64.0.2", "2001:db8:100:1::5", "100.64.0.3", "100.64.0.8", "100.64.0.9", "100.64.1.77",
                    "100.64.0.10", "2001:db8:100:2::1", "100.64.0.4"):
        assert streamed.engine.lookup_subscriber(address) == acct.engine.lookup_subscriber(address)
    assert acct.engine.lookup_subscriber("100.64.1.77") == d and acct.engine.lookup_subscriber("100.64.0.10") == 0
    acct.start_billing(10 ** 18)
    assert acct.since == {} and acct.biller.accounts[d].joined == 4 * 10 ** 17  # the account holds it now

    # the start's own path: chunks of columns (iter_ledger_chunks, load_chunks), the ledger's scans matched a
    # chunk at a time (Ledger.subscriber_chunks: with one row a fetch, each scan read on across the chunks)
    monkeypatch.setattr(Ledger, "START_CHUNK", 1)
    chunked = Accountant(cfg, ledger)
    assert chunked.load_chunks(gateway.runtime.iter_ledger_chunks(ledger)) == events
    assert chunked.terms == acct.terms
    assert (chunked.since, chunked.access_dirty) == (streamed.since, streamed.access_dirty)
    assert chunked.terms[a] is chunked.terms[f]  # no own terms, the same tariff and credit: one object
    assert {s: (i.name, i.tariff, i.addresses) for s, i in chunked.subscribers.items()} == \
        {s: (i.name, i.tariff, i.addresses) for s, i in acct.subscribers.items()}
    for sid in streamed.subscribers:  # (acct's engine has been billed since)
        assert chunked.engine.subscriber(sid) == streamed.engine.subscriber(sid)
    # a cluster gateway's start leaves out the subscribers whose networks it does not see
    cluster = ClusterSettings(networks=((6, int(ipaddress.IPv6Address("2001:db8:100:2::")), 64),))
    served = [c.ids for c in gateway.runtime.iter_ledger_chunks(ledger, cluster=cluster)]
    assert served == [[f]]


def test_subscriber_info_gives_back_its_networks():
    from gateway.subscriber_table import SubscriberInfo

    for networks in ((), ("100.64.0.2/32",), ("100.64.0.2/32", "2001:db8:100:1::/64", "100.64.1.0/24")):
        info = SubscriberInfo(7, "a", "flat", list(networks))
        assert info.addresses == networks and (info.id, info.name, info.tariff) == (7, "a", "flat")
        info.addresses = networks[1:]  # a change (gateway/daemon/changes.py)
        assert info.addresses == networks[1:]
    assert not hasattr(info, "__dict__")  # one small object a subscriber


def test_a_start_pauses_the_collector_and_freezes_what_it_made():
    import gc

    from gateway.runtime import gc_paused, kept_for_life

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with kept_for_life():
            assert not gc.isenabled()
            with gc_paused():  # (load_subscribers' and start_billing's own, inside the start's)
                made = [[i] for i in range(1000)]
            assert not gc.isenabled()  # the inner one leaves it as it found it
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(made)
    finally:
        gc.unfreeze()
        gc.enable()
