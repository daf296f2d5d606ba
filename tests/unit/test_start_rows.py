"""A start's rows (``gateway.runtime.iter_ledger_rows``, from ``Ledger.subscriber_rows``: each subscriber's
networks joined by the database into one text) hold what ``Ledger.subscribers()`` and ``get_subscriber``
hold: the same subscribers, and each one's networks in ``ORDER BY network``, on both backends. SQLite before
3.44 has no ``group_concat(... ORDER BY)``: its join keeps the order by min/max and an ordered subquery
(accounting/store/sqlite.py), which the subscribers with three networks and more here hold to it."""

from __future__ import annotations

import ipaddress
import random
import tomllib

from accounting.ledger import Ledger
from gateway.config import parse_config
from gateway.lab import lab_config
from gateway.runtime import Accountant, iter_ledger_rows


def v4(i: int, plen: int = 32) -> str:
    return str(ipaddress.ip_network(f"{ipaddress.IPv4Address((100 << 24 | 64 << 16) + i)}/{plen}", strict=False))


def v6(i: int, plen: int = 64) -> str:
    return str(ipaddress.ip_network(f"{ipaddress.IPv6Address(0x20010DB8_0100 << 80 | i << 64)}/{plen}", strict=False))


def test_the_start_rows_hold_the_subscribers_networks_in_order(ledger_target):
    rnd = random.Random(12)
    ledger = Ledger.open(ledger_target())
    many = [v4(i) for i in range(0, 400, 3)] + [v6(i) for i in range(0, 300, 7)] + \
        [v4(1024, 24), "2001:db8:200::/48", "2001:db8:100:ffff::1/128"]
    rnd.shuffle(many)  # inserted out of order: the rowids' order is not the networks'
    subs = {
        "none": [],
        "one4": [v4(500)],
        "one6": [v6(500)],
        # two of them whose text order is not their numeric order (10 < 9 as text), given backwards
        "two": [v4(900 + 9), v4(900 + 10)],
        "three": [v6(900), v4(902), v4(901)],
        "many": many,
    }
    ids = {name: ledger.add_subscriber(name, "lab", "EUR", 100, addresses=nets) for name, nets in subs.items()}
    ledger.add_address(ids["none"], v4(2000))  # added later, then taken out again: none again
    ledger.remove_address(v4(2000))
    ledger.add_address(ids["three"], v4(903))  # a later rowid, sorting between the first ones
    subs["three"].append(v4(903))
    off = ledger.add_subscriber("off", "lab", "EUR", 0, addresses=[v4(3000), v4(2999)])
    ledger.set_active(off, False)

    got = {r["name"]: r for r in iter_ledger_rows(ledger)}
    assert set(got) == set(subs)  # the inactive one is not loaded
    listed = {s["name"]: s for s in ledger.subscribers()}
    for name in subs:
        text = got[name]["addresses"]
        assert type(text) is str
        one = ledger.get_subscriber(name)  # its own query, ORDER BY network
        assert listed[name]["addresses"] == one["addresses"]
        assert text == " ".join(one["addresses"])
        assert sorted(text.split(" ") if text else []) == sorted(n for n in one["addresses"])
        if ledger.db.dialect == "sqlite":  # BINARY collation: Python's order of the texts
            assert one["addresses"] == sorted(one["addresses"])
    assert got["none"]["addresses"] == "" and listed["none"]["addresses"] == []
    assert len(got["many"]["addresses"].split(" ")) == len(many) and got["two"]["addresses"].count(" ") == 1
    assert [s["id"] for s in ledger.subscribers()] == sorted(ids.values()) + [off]

    # loaded as a start loads them: the engine owns every network, the Accountant holds the text as it came
    acct = Accountant(parse_config(tomllib.loads(lab_config(1))), ledger, "c")
    acct.load_subscribers(iter_ledger_rows(ledger))
    for name, sid in ids.items():
        assert acct.subscribers[sid].addresses == tuple(ledger.get_subscriber(sid)["addresses"])
        for network in subs[name]:
            assert acct.engine.lookup_subscriber(str(ipaddress.ip_network(network)[-1])) == sid
    assert acct.engine.lookup_subscriber(v4(3000).split("/")[0]) == 0
    ledger.close()


def test_a_row_of_networks_that_joined_would_pass_as_none_or_two_is_refused():
    """Rows whose networks are a sequence (the config's, a change's) are joined for the engine: a network
    that is empty, has a space or is not a text is refused by the subscriber's name, not taken as no
    network or as two."""
    import pytest

    from ext.errors import TollgateError

    for addresses, why in ((("100.64.0.1/32 100.64.0.2/32",), "a space in it"), (("",), "empty"),
                           (("100.64.0.1/32", 7), "not text"), (["100.64.0.3/32", None], "not text")):
        acct = Accountant(parse_config(tomllib.loads(lab_config(1))), None, "c")
        rows = [{"id": 1, "name": "a", "tariff": "lab", "balance": 100, "credit_limit": 0,
                 "addresses": ["100.64.9.1/32"]},
                {"id": 2, "name": "b", "tariff": "lab", "balance": 100, "credit_limit": 0, "addresses": addresses}]
        with pytest.raises(TollgateError, match=f"subscriber 'b': bad network .*: {why}"):
            acct.load_subscribers(rows)
    acct = Accountant(parse_config(tomllib.loads(lab_config(1))), None, "c")
    acct.load_subscribers([{"id": 1, "name": "a", "tariff": "lab", "balance": 100, "credit_limit": 0,
                            "addresses": ("100.64.9.1/32", "2001:db8:9::/48")},
                           {"id": 2, "name": "b", "tariff": "lab", "balance": 100, "credit_limit": 0, "addresses": []}])
    assert acct.subscribers[1].addresses == ("100.64.9.1/32", "2001:db8:9::/48") and acct.subscribers[2].addresses == ()
    assert acct.engine.lookup_subscriber("2001:db8:9::1") == 1
