"""accounting/operations.py on a real ledger file: amounts in the currency's minor unit, one owner per address
(and the block page's lookup agreeing with the engine's on a ledger that holds overlaps anyway), subscribers
seeded from the config with their audit row, and a subscriber's own terms with theirs."""

from __future__ import annotations

import ipaddress
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accounting.audit import AuditLog
from accounting.ledger import Ledger, LedgerError
from accounting.operations import OperationError, Operations, _subnet_prefix
from api.app import LedgerView
from ext.errors import TollgateError
from gateway.config import load_config
from gateway.runtime import Accountant, ledger_rows


def config_text(currency: str = "EUR", subscribers: str = "") -> str:
    return f"""
[gateway]
currency = "{currency}"
timezone = "UTC"
local_networks = ["100.64.0.0/10", "2001:db8:100::/48"]

[[group]]
name = "staff"

[[tariff]]
name = "basic"
price_unit = "MB"
[tariff.prices]
external = "1"
{subscribers}"""


@pytest.fixture
def make(tmp_path, ledger_target):
    """``make(currency, subscribers)`` -> (Operations as cli:test, the config) on a fresh ledger."""
    opened = []

    def build(currency: str = "EUR", subscribers: str = ""):
        path = tmp_path / f"{currency}-{len(opened)}.toml"
        path.write_text(config_text(currency, subscribers))
        cfg = load_config(path)
        ledger = Ledger.open(ledger_target())
        opened.append(ledger)
        return Operations(ledger, cfg, "cli:test"), cfg

    yield build
    for ledger in opened:
        ledger.close()


def dump(ops: Operations) -> list[str]:
    return list(ops.ledger.db.dump())


# ---- item 15: amounts in the currency's minor unit -------------------------------------------------------

# (currency, finer than its minor unit, exactly one minor unit)
CURRENCIES = [("EUR", "0.001", "0.01"), ("JPY", "0.5", "1"), ("BHD", "0.0005", "0.001"), ("MB", "0.001", "0.01")]


@pytest.mark.parametrize("currency, fine, step", CURRENCIES)
def test_an_amount_finer_than_the_minor_unit_is_refused_everywhere(make, currency, fine, step):
    ops, _ = make(currency)
    ops.add("a", "basic", balance=step, credit_limit=step)
    before = dump(ops)
    for call in (lambda: ops.add("b", "basic", balance=fine), lambda: ops.add("b", "basic", credit_limit=fine),
                 lambda: ops.add("b", "basic", balance=f"-{fine}"),
                 lambda: ops.topup("a", fine, "k1"), lambda: ops.topup("a", f"1{fine.lstrip('0')}", "k2"),
                 lambda: ops.adjust("a", fine, "why"), lambda: ops.adjust("a", f"-{fine}", "why"),
                 lambda: ops.update("a", credit_limit=fine), lambda: ops.generate_cards(1, fine)):
        with pytest.raises(OperationError, match="finer than") as err:
            call()
        assert err.value.status == 422
    assert dump(ops) == before  # nothing written, not even an audit row


@pytest.mark.parametrize("currency, opening, payments, adjustments", [
    ("EUR", "3.01", ["0.01", "2.37"], ["-0.01", "1.000"]),
    ("JPY", "301", ["1", "237"], ["-1", "1.0"]),
    ("BHD", "3.001", ["0.001", "2.375"], ["-0.001", "1.0000"]),
])
def test_the_listings_of_a_subscriber_add_up_to_its_balance(make, currency, opening, payments, adjustments):
    ops, _ = make(currency)
    ops.add("a", "basic", balance=opening)
    for i, amount in enumerate(payments):
        ops.topup("a", amount, f"k{i}")
    for amount in adjustments:
        ops.adjust("a", amount, "correction")

    def number(text: str) -> Decimal:
        value, code = text.split()
        assert code == currency
        return Decimal(value)

    rows = AuditLog(ops.ledger).rows()
    listed = (number(rows[0]["after"]["balance"]) + sum(number(p["amount"]) for p in ops.payments("a"))
              + sum(number(r["after"]["amount"]) for r in rows if r["action"] == "adjustment.add"))
    assert number(ops.get("a")["balance"]) == listed
    assert ops.ledger.check_invariants() == []


# ---- item 18: one owner per address -----------------------------------------------------------------------

def test_overlapping_prefixes_of_two_subscribers_are_refused(make):
    ops, _ = make()
    ops.add("a", "basic", ["100.64.0.0/28", "2001:db8:100:1::/64"])
    ops.add("idle", "basic", ["100.64.9.0/24"])
    ops.deactivate("idle")  # its prefixes still have their owner: it may come back
    before = dump(ops)
    for nets in (["100.64.0.5/32"], ["100.64.0.0/24"], ["100.64.0.0/28"], ["100.0.0.0/8"], ["0.0.0.0/0"],
                 ["100.64.0.8/29"], ["2001:db8:100:1::5/128"], ["2001:db8:100::/48"], ["2001:db8:100:1:8000::/65"],
                 ["::/0"], ["100.64.9.7/32"], ["100.64.50.1/32", "100.64.0.15/32"]):
        with pytest.raises(OperationError, match="overlaps|already belongs") as err:
            ops.add("b", "basic", nets)
        assert err.value.status == 409, nets
    assert dump(ops) == before
    b = ops.add("b", "basic", ["100.64.0.16/28", "2001:db8:100:2::/64", "100.64.1.0/24"])
    for nets in (["100.64.0.0/27"], ["2001:db8:100:1::1/128"]):
        with pytest.raises(OperationError, match="overlaps|already belongs"):
            ops.update(b["id"], addresses=nets)
    assert ops.get("b")["addresses"] == b["addresses"]
    # a subscriber's own prefixes may nest and may be replaced by overlapping ones of its own
    assert ops.update("a", addresses=["100.64.0.0/29", "100.64.0.4/30"])["addresses"] == \
        ["100.64.0.0/29", "100.64.0.4/30"]
    assert ops.ledger.check_invariants() == []


networks = st.one_of(
    st.builds(lambda a, n: ipaddress.IPv4Network((a, n), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32)),
    # IPv6 with runs of zero hextets, where '::' shortens the text
    st.builds(lambda a, n, zeros: ipaddress.IPv6Network((a & ~zeros, n), strict=False), st.integers(0, 2**128 - 1),
              st.integers(0, 128), st.integers(0, 2**128 - 1)))


@settings(max_examples=500, deadline=None)
@given(networks, st.integers(0, 128), st.integers(0, 2**128 - 1))
def test_every_subnet_is_in_the_range_the_overlap_check_reads(net, extra, bits):
    """The overlap check reads only the rows from _subnet_prefix up to the next text (in SQLite's own
    comparison): every subnet must be among them, or an overlap would go unseen."""
    length = min(net.max_prefixlen, net.prefixlen + extra % (net.max_prefixlen - net.prefixlen + 1))
    host = bits % (1 << (net.max_prefixlen - net.prefixlen)) if net.prefixlen < net.max_prefixlen else 0
    sub = type(net)((int(net.network_address) + host, length), strict=False)
    assert sub.subnet_of(net)
    prefix = _subnet_prefix(net)
    if not prefix:
        return  # the check reads every row then
    import sqlite3

    with sqlite3.connect(":memory:") as db:
        inside = db.execute("SELECT ? >= ? AND ? < ?", (str(sub), prefix, str(sub),
                                                        prefix[:-1] + chr(ord(prefix[-1]) + 1))).fetchone()
        assert inside == (1,), (sub, net, prefix)


def test_an_overlap_found_through_the_index_range(make):
    """Prefixes whose text shares no fixed part with the new one, and ones that do, side by side."""
    ops, _ = make()
    ops.add("a", "basic", ["100.64.0.128/25", "100.65.0.0/16", "2001:db8:100:0:1::/80", "::ffff:0:0/96"])
    for nets in (["100.64.0.0/24"], ["100.64.0.0/16"], ["100.64.0.0/10"], ["2001:db8:100::/64"],
                 ["2001:db8::/32"], ["::/8"], ["::ffff:100.64.0.1/128"], ["0.0.0.0/1"]):
        with pytest.raises(OperationError, match="overlaps|already belongs"):
            ops.add("b", "basic", nets)
    assert ops.add("b", "basic", ["100.64.0.0/25", "100.66.0.0/16", "2001:db8:100:0:2::/80"])["addresses"]


@pytest.mark.parametrize("engine", ["py", "c"])
def test_the_block_page_takes_the_longest_match_as_the_engine_does(make, engine):
    """A ledger from before overlaps were refused: b's /32 inside a's /28. The block page must show b at
    b's address, as the engine charges b for it."""
    ops, cfg = make()
    ledger = ops.ledger
    a = ledger.add_subscriber("a", "basic", "EUR", 5 * 10**9, addresses=["100.64.0.0/28", "2001:db8:100::/56"])
    if ledger.db.dialect == "postgres":  # such a ledger cannot be made there: schema 24's constraint refuses b
        with pytest.raises(LedgerError, match="overlaps one that belongs to another subscriber"):
            ledger.add_subscriber("b", "basic", "EUR", 7 * 10**9, addresses=["100.64.0.5/32"])
        assert [s["name"] for s in ledger.subscribers()] == ["a"]
        return
    b = ledger.add_subscriber("b", "basic", "EUR", 7 * 10**9, addresses=["100.64.0.5/32", "2001:db8:100:1::/64"])
    view = LedgerView(cfg, ledger.path)

    def engine_owner(address: str) -> int | None:
        acct = Accountant(cfg, ledger, engine)
        acct.load_subscribers(ledger_rows(ledger))
        return acct.engine.lookup_subscriber(address) or None

    def page_owner(address: str) -> int | None:
        page = view.subscriber_page(address)
        return None if page is None else page["id"]

    cases = {"100.64.0.5": b, "100.64.0.4": a, "100.64.0.6": a, "100.64.0.15": a, "100.64.0.16": None,
             "2001:db8:100:1::9": b, "2001:db8:100:2::9": a, "2001:db8:101::1": None}
    for address, owner in cases.items():
        assert page_owner(address) == engine_owner(address) == owner, address
    assert view.subscriber_page("100.64.0.5")["name"] == "b" and view.subscriber_page("100.64.0.5")["balance"] == \
        "7.00 EUR"
    assert page_owner("::ffff:100.64.0.5") == b  # a dual-stack socket's spelling of the same client
    ledger.set_active(b, False)  # not loaded into the engine: its /32 is a's again
    for address in ("100.64.0.5", "2001:db8:100:1::9"):
        assert page_owner(address) == engine_owner(address) == a
    view.thread_ledger().close()


# ---- item 17: config seeds and terms, with their audit rows -------------------------------------------------

SEEDS = """
[[subscriber]]
name = "alice"
tariff = "basic"
balance = "10.00"
addresses = ["100.64.0.2/32"]

[[subscriber]]
name = "bob"
tariff = "basic"
balance = "0.000001"
addresses = ["100.64.0.3/32"]
"""


def test_subscribers_seeded_from_the_config_have_an_audit_row(make):
    ops, cfg = make("EUR", SEEDS)
    assert Accountant(cfg, ops.ledger).seed_ledger() == ["alice", "bob"]
    rows = AuditLog(ops.ledger).rows()
    assert [(r["actor"], r["action"], r["target"]) for r in rows] == [
        (f"config:{cfg.path}", "subscriber.add", "subscriber:1"),
        (f"config:{cfg.path}", "subscriber.add", "subscriber:2")]
    assert rows[0]["after"]["balance"] == "10.00 EUR" and rows[0]["after"]["addresses"] == ["100.64.0.2/32"]
    # a seed is the config's exact amount (a rating test may give a nano-unit); only people's input is cents
    assert ops.ledger.balance("bob") == 1000
    assert Accountant(cfg, ops.ledger).seed_ledger() == []  # known already: nothing added, no new row
    assert AuditLog(ops.ledger).count() == 2 and AuditLog(ops.ledger).verify() == (True, None)


@pytest.mark.parametrize("seed, says", [
    ('name = "<script>alert(1)</script>"\ntariff = "basic"', "name"),
    ('name = "carol"\ntariff = "basic"\naddresses = ["100.64.0.0/24"]', "overlaps 100.64.0.2/32"),
])
def test_a_bad_seed_is_refused_with_nothing_written(make, seed, says):
    ops, cfg = make("EUR", SEEDS + "\n[[subscriber]]\n" + seed + "\n")
    with pytest.raises(TollgateError, match=r"subscriber\[2\].*" + says.replace("(", r"\(")):
        Accountant(cfg, ops.ledger).seed_ledger()
    assert [s["name"] for s in ops.ledger.subscribers()] == ["alice", "bob"]  # those before it went in
    assert AuditLog(ops.ledger).count() == 2


def test_terms_are_checked_and_audited(make):
    ops, _ = make()
    ops.add("a", "basic")
    shown = ops.set_terms("a", discount_bp=2000, speed_down_bps=50_000_000, group_name="staff",
                          access_hours="Mon-Fri 08:00-20:00")
    assert shown["terms"]["discount_bp"] == 2000 and shown["terms"]["group_name"] == "staff"
    before = dump(ops)
    for bad, says in (({"group_name": "vip"}, "unknown group"), ({"discount_bp": 10001}, "discount"),
                      ({"access_hours": "Mon-Fri 08:00-25:00"}, "access"), ({"max_connections": -1}, "whole number"),
                      ({"colour": "red"}, "unknown terms"), ({"credit_limit": 5}, "unknown terms"),
                      ({"access_hours": "Mon\x1b"}, "printable")):
        with pytest.raises(OperationError, match=says):
            ops.set_terms("a", **bad)
    with pytest.raises(OperationError, match="no subscriber") as err:
        ops.set_terms("nobody", discount_bp=1)
    assert err.value.status == 404
    ops.set_terms("a", discount_bp=2000)  # the same again changes nothing: no row
    assert dump(ops) == before
    row = AuditLog(ops.ledger).rows()[-1]
    assert (row["actor"], row["action"], row["before"]["discount_bp"], row["after"]["speed_down_bps"]) == \
        ("cli:test", "subscriber.terms", None, 50_000_000)


@pytest.mark.parametrize("call, says", [
    (lambda ops: ops.add("<script>alert(1)</script>", "basic"), "name"),
    (lambda ops: ops.add("a b", "basic"), "name"),
    (lambda ops: ops.add("x", "basic", contract="C\x00"), "contract"),
    (lambda ops: ops.add("x", "basic", addresses=[f"100.64.1.{i}/32" for i in range(65)]), "at most 64"),
    (lambda ops: ops.topup("a", "1.00", "k", method="<b>"), "method"),
    (lambda ops: ops.topup("a", "1.00", "k", comment="x" * 501), "comment"),
    (lambda ops: ops.adjust("a", "1.00", "line\nbreak"), "reason"),
    (lambda ops: ops.block("a", "\x07"), "reason"),
    (lambda ops: ops.activate_card("a", "X" * 65), "code"),
    (lambda ops: ops.generate_cards(1, "1.00", batch="b\x7f"), "batch"),
    (lambda ops: ops.generate_cards(0, "1.00"), "1 to 100000"),
    (lambda ops: ops.update("a", effective_ns=-1), "effective_ns"),
])
def test_what_the_api_refuses_every_front_end_refuses(make, call, says):
    ops, _ = make()
    ops.add("a", "basic")
    before = dump(ops)
    with pytest.raises(OperationError, match=says) as err:
        call(ops)
    assert err.value.status == 422
    assert dump(ops) == before
