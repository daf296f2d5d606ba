"""A start's load in columns (``gateway.runtime.iter_ledger_chunks`` -> ``Accountant.load_chunks``: the
ledger's scan in chunks of columns, each subscriber's terms worked out once per distinct input) ends
exactly where the load of dict rows ends (``Accountant.load_subscribers`` of the rows as
``Ledger.subscribers()`` gives them, a row at a time): the same engine, subscriber table and terms
table, on both backends, for a ledger with a mix of everything the load looks at, in chunks smaller
than the ledger (each chunk's own distinct terms, tariffs and the scans' matching across chunks)."""

from __future__ import annotations

import ipaddress
import sys
import time
import tomllib

import pytest

import gateway.runtime
from accounting import prepaid
from accounting.ledger import Ledger
from accounting.operations import Operations
from ext.errors import TollgateError
from gateway.config import parse_config
from gateway.runtime import Accountant, iter_ledger_chunks

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_tariff_scenarios import BASE  # noqa: E402

CONFIG = BASE.format(currency="EUR") + """
[[group]]
name = "staff"
discount = "20%"

[[tariff]]
name = "flat"
price_unit = "MB"
[tariff.prices]
external = "1.00"
peering = "1.00"

[[tariff]]
name = "other"
price_unit = "MB"
volume_limit = "5 GB"
[tariff.prices]
external = "2.00"
peering = "2.00"

[[tariff]]
name = "third"
price_unit = "MB"
[tariff.prices]
external = "3.00"
peering = "0.50"

[[tariff]]
name = "guest"
period = "daily"
price_unit = "MB"
[tariff.prices]
external = "0"
peering = "0"

[sessions]
portal_login = true
portal_session = 259200
voucher_tariff = "guest"

[[subscriber]]
name = "seeded"
tariff = "flat"
group = "staff"
balance = "1.00"
addresses = ["100.64.200.1/32"]
"""

TARIFFS = ("flat", "other", "third")
FIRST_USE = time.time_ns()  # (a voucher not used within its days after it was made has expired)


def net(i: int, k: int) -> str:
    """Subscriber ``i``'s ``k``-th network: an IPv4 /32, or every third an IPv6 /64."""
    if k % 3 == 2:
        return str(ipaddress.IPv6Network(f"2001:db8:{i:x}:{k:x}::/64"))
    return f"100.64.{i}.{k + 1}/32"


def mixed_ledger(target) -> tuple[Ledger, dict]:
    """40 subscribers: 0 to 4 networks, three tariffs, two credit limits, own terms on a few, a group
    on one, two inactive; the config's subscriber (its terms from its config entry); four guests of
    vouchers (their terms hold each one's first use: three that set no term of their own, two of them
    first used at one moment, one at another; one of a voucher's volume)."""
    ledger = Ledger.open(target)
    ops = Operations(ledger, parse_config(tomllib.loads(CONFIG)), "cli:test")
    sids = {}
    for i in range(40):
        name = f"s{i}"
        sids[name] = ledger.add_subscriber(name, TARIFFS[i % 3], "EUR", 100 * i - 500,
                                           credit_limit=300 if i % 7 == 0 else 0,
                                           addresses=[net(i, k) for k in range(i % 5)])
    ledger.set_terms(sids["s3"], discount_bp=2500, discount_until_ns=10 ** 18, volume_limit=10 ** 9,
                     speed_up_bps=10 ** 6, access_hours="mon-fri 08:00-18:00")
    ledger.set_terms(sids["s8"], credit_until_ns=5 * 10 ** 17, max_connections=10)
    ledger.set_terms(sids["s13"], group_name="staff")
    ledger.set_terms(sids["s21"], volume_limit=0)  # a term set to a falsy value is still set
    ledger.set_billing_since(sids["s8"], 4 * 10 ** 17)
    ledger.set_active(sids["s5"], False)
    ledger.set_active(sids["s17"], False)
    sids["seeded"] = ledger.add_subscriber("seeded", "flat", "EUR", 100, addresses=["100.64.200.1/32"])
    # a voucher's volume is the guest's own volume_limit; of one of money alone, its guest sets no term
    for k, (first, volume) in enumerate(((FIRST_USE, None), (FIRST_USE, None), (FIRST_USE + 60 * 10 ** 9, None),
                                         (FIRST_USE, "1000000"))):
        code = ops.generate_vouchers(1, value="1.00" if volume is None else None, volume=volume, days=2)[0]["code"]
        sids[f"guest{k}"] = ops.redeem_voucher(code, f"100.64.210.{k + 1}", now=first)["subscriber_id"]
    return ledger, sids


def dict_rows(ledger: Ledger) -> list[dict]:
    """The start's rows as a row at a time gives them (from ``Ledger.subscribers()``, not the scan)."""
    starts = prepaid.volume_starts(ledger)
    return [{**{k: s[k] for k in ("id", "name", "tariff", "balance", *Ledger.TERMS)},
             "addresses": list(s["addresses"]), "since": s["billing_since_ns"] or s["created_ns"],
             "volume_since": starts.get(s["id"])}
            for s in ledger.subscribers() if s["active"]]


def state(acct: Accountant, ledger: Ledger) -> dict:
    """Everything the load leaves: the engine's subscribers and who owns each network, the subscriber
    table's rows, the terms table's (and which subscribers share one Terms object)."""
    sids = [s["id"] for s in ledger.subscribers()]
    networks = [n for s in ledger.subscribers() for n in s["addresses"]]
    shared = {}
    for sid in sids:
        if sid in acct.terms:
            shared.setdefault(id(acct.terms[sid]), []).append(sid)
    return {
        "engine": {sid: acct.engine.subscriber(sid) for sid in sids if sid in acct.subscribers},
        "owners": {n: acct.engine.lookup_subscriber(str(ipaddress.ip_network(n)[-1])) for n in networks},
        "table": {sid: (i.name, i.tariff, i.addresses, i.since) for sid, i in acct.subscribers.items()},
        "terms": {sid: acct.terms[sid] for sid in sids if sid in acct.terms},
        "shared": sorted(shared.values()),
        "since": dict(acct.since),
        "access_dirty": set(acct.access_dirty),
    }


@pytest.mark.parametrize("chunk", [1, 3, 10_000])
def test_the_columns_load_as_the_rows_do(ledger_target, monkeypatch, chunk):
    ledger, sids = mixed_ledger(ledger_target())
    cfg = parse_config(tomllib.loads(CONFIG))
    by_rows = Accountant(cfg, ledger)
    events = by_rows.load_subscribers(dict_rows(ledger))
    monkeypatch.setattr(gateway.runtime, "ROW_CHUNK", chunk)
    monkeypatch.setattr(Ledger, "START_CHUNK", 2)  # the networks' and own terms' scans read on across chunks
    by_columns = Accountant(cfg, ledger)
    assert by_columns.load_chunks(iter_ledger_chunks(ledger)) == events
    got, want = state(by_columns, ledger), state(by_rows, ledger)
    assert got == want

    # what the comparison stands on: the mix is there
    table = want["table"]
    assert sids["s5"] not in table and sids["s17"] not in table and len(table) == 43
    assert {len(table[sids[f"s{i}"]][2]) for i in range(5)} == {0, 1, 2, 3, 4}
    terms = want["terms"]
    assert terms[sids["s1"]] is not terms[sids["s2"]] and terms[sids["s1"]].tariff == "other"
    assert terms[sids["s3"]].discount == 2500 and terms[sids["s3"]].access is not None
    assert terms[sids["s13"]].discount == terms[sids["seeded"]].discount == 2000  # the group's
    assert terms[sids["s21"]].volume_limit == 0 and terms[sids["s7"]].credit_limit == 300
    assert want["access_dirty"] == {sids["s3"]} and want["since"][sids["s8"]] == 4 * 10 ** 17
    # subscribers of no own terms share their (tariff, credit)'s one Terms, across chunks too
    assert terms[sids["s1"]] is terms[sids["s10"]] is terms[sids["s31"]]
    assert by_columns.terms[sids["s1"]] is by_columns.terms[sids["s31"]]
    assert len(want["shared"]) == len(got["shared"]) < len(table)
    guests = [terms[sids[f"guest{k}"]] for k in range(4)]
    assert guests[0].volume_since == guests[3].volume_since == FIRST_USE
    assert guests[2].volume_since == FIRST_USE + 60 * 10 ** 9
    assert guests[0] is guests[1] and guests[1] is not guests[2] and guests[0].tariff == "guest"
    assert guests[3].volume_limit == 10 ** 6 and guests[0].volume_limit is None
    ledger.close()


def test_a_chunk_s_errors_name_the_subscriber(ledger_target, monkeypatch):
    monkeypatch.setattr(gateway.runtime, "ROW_CHUNK", 3)
    ledger, sids = mixed_ledger(ledger_target())
    ledger.add_subscriber("gone", "retired", "EUR", 0, addresses=["100.64.201.1/32"])
    cfg = parse_config(tomllib.loads(CONFIG))
    with pytest.raises(TollgateError, match="subscriber 'gone' has tariff 'retired', which the config does not define"):
        Accountant(cfg, ledger).load_chunks(iter_ledger_chunks(ledger))

    ledger.set_active(ledger.get_subscriber("gone")["id"], False)
    acct = Accountant(cfg, ledger)  # a network of s12's already another's in the engine: the engine refuses it
    acct.load_subscribers([{"id": 10 ** 6, "name": "squatter", "tariff": "flat", "balance": 0, "credit_limit": 0,
                            "addresses": [net(12, 1)]}])
    with pytest.raises(TollgateError, match="subscriber 's12': .*already belongs"):
        acct.load_chunks(iter_ledger_chunks(ledger))
    ledger.close()
