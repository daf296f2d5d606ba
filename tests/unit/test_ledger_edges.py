"""The ledger's numbers at the edges, on both backends (``[sqlite]``, ``[pg]``: tests/conftest.py's
ledger_target): amounts, bytes and packets of 0 and of 2^63-1 (the largest a column holds on both), and
sums past 2^63-1.

A sum past 2^63-1 is either the exact integer or a LedgerError saying why, never a rounded, wrapped or
float number. PostgreSQL's ``sum()`` of a bigint is a numeric: exact however large, loaded back as an int
(accounting/store/postgres.py). SQLite's ``sum()`` stops with "integer overflow": the ledger says so
(``Backend.sums``). A row cannot hold more than 2^63-1 on either: a write or a rollup that would need it is
refused and changes nothing.
"""

from __future__ import annotations

import pytest

from accounting import rollup
from accounting.ledger import Ledger
from ext.errors import LedgerError

TOP = (1 << 63) - 1
NS = 10 ** 9
HOUR = 1_700_000_000 // 3600 * 3600  # a UTC hour start, long before "now" below
M = 60


@pytest.fixture
def led(ledger_target):
    with Ledger.open(ledger_target()) as led:
        yield led


def ints(value):
    """Every number in ``value`` (dicts, lists, tuples): each must be an int, not a Decimal or a float,
    which compare equal to ints and would hide here."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in ints(v)]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in ints(v)]
    assert type(value) is int or isinstance(value, str) or value is None, (type(value), value)
    return [value] if type(value) is int else []


def exact_or_refused(led, call, want):
    """``call()`` is ``want``, in ints, where the backend sums past 2^63-1 (PostgreSQL); a LedgerError
    naming the sum where it cannot (SQLite)."""
    if led.db.dialect == "sqlite":
        with pytest.raises(LedgerError, match=r"passes 2\^63-1"):
            call()
        return
    got = call()
    ints(got)
    assert got == want


def test_zero_and_the_largest_numbers_a_row_holds(led):
    a = led.add_subscriber("a", "t", "EUR")
    b = led.add_subscriber("b", "t", "EUR", opening_balance=TOP)
    led.apply_flush("f1", [(a, 1, 0, HOUR, TOP, TOP, TOP), (b, 0, 1, HOUR, 0, 0, 0)], TOP)
    assert led.balance(a) == -TOP and led.balance(b) == TOP
    assert led.charges(a) == [dict(led.charges(a)[0], amount=TOP, ts_ns=TOP)] and led.charges(b) == []
    got = led.usage(group_by=("subscriber_id", "zone", "direction", "minute"))
    assert got == [{"subscriber_id": a, "zone": 1, "direction": 0, "minute": HOUR, "span": 60, "bytes": TOP,
                    "packets": TOP, "amount": TOP},
                   {"subscriber_id": b, "zone": 0, "direction": 1, "minute": HOUR, "span": 60, "bytes": 0,
                    "packets": 0, "amount": 0}]
    ints(got)
    top = led.top_usage(2)
    assert [(r["subscriber_id"], r["bytes"], r["packets"], r["amount"]) for r in top] == [(a, TOP, TOP, TOP),
                                                                                          (b, 0, 0, 0)]
    ints(top)
    assert led.usage_range(a, since=HOUR, until=HOUR + M, group_by=("day",)) == [
        {"minute": HOUR - HOUR % 86400, "bytes": TOP, "packets": TOP, "amount": TOP}]
    volumes, prevailing = led.period_totals({a: 0, b: 0}, HOUR * NS)
    assert volumes == {a: {(1, 0): TOP}, b: {(0, 1): 0}} and prevailing == {}
    ints(volumes)
    led.add_payment(a, TOP)
    assert led.balance(a) == 0 and led.check_invariants() == []
    # the other ends: the smallest opening balance, the largest credit limit, adjustments and postings of +-2^63-1
    c = led.add_subscriber("c", "t", "EUR", opening_balance=-TOP - 1, credit_limit=TOP)
    assert (led.get_subscriber(c)["balance"], led.get_subscriber(c)["credit_limit"]) == (-TOP - 1, TOP)
    d = led.add_subscriber("d", "t", "EUR")
    led.add_adjustment(d, -TOP, "a correction as large as a row holds", "ops")
    led.add_adjustment(d, TOP, "and back", "ops")
    assert led.add_posting(d, "fee", TOP, 1, "fee:d") and led.balance(d) == -TOP
    assert [x["amount"] for x in led.adjustments(d)] == [-TOP, TOP] and led.postings(d)[0]["amount"] == TOP
    assert led.check_invariants() == []


def test_sums_past_2_63_are_exact_or_refused(led):
    a = led.add_subscriber("a", "t", "EUR")
    b = led.add_subscriber("b", "t", "EUR")
    # two minutes of a, one of b, each as large as a row holds: every total over them passes 2^63-1
    led.apply_flush("f1", [(a, 1, 0, HOUR, TOP, TOP, 0), (a, 1, 0, HOUR + M, TOP, TOP, 0),
                           (b, 1, 0, HOUR, TOP, 1, 0)], 1)
    exact_or_refused(led, lambda: led.usage(group_by=()), [{"bytes": 3 * TOP, "packets": 2 * TOP + 1, "amount": 0}])
    exact_or_refused(led, lambda: led.usage(a, group_by=("zone",)),
                     [{"zone": 1, "bytes": 2 * TOP, "packets": 2 * TOP, "amount": 0}])
    exact_or_refused(led, lambda: [(r["subscriber_id"], r["bytes"]) for r in led.top_usage(2)],
                     [(a, 2 * TOP), (b, TOP)])
    exact_or_refused(led, lambda: led.usage_range(a, since=HOUR, until=HOUR + 2 * M, group_by=("minute",), bucket=120),
                     [{"minute": HOUR, "bytes": 2 * TOP, "packets": 2 * TOP, "amount": 0}])
    exact_or_refused(led, lambda: led.period_totals({a: 0}, (HOUR + 3600) * NS)[0], {a: {(1, 0): 2 * TOP}})
    # what is not past it still reads on both
    assert led.usage(b, group_by=()) == [{"bytes": TOP, "packets": 1, "amount": 0}]


def test_the_check_of_a_history_past_2_63(led):
    """Payments and charges of 2^63-1 each, twice: every balance fits a row, their sums do not. PostgreSQL
    checks the exact sums; SQLite names the balance check as one it cannot make, and still makes the others."""
    a = led.add_subscriber("a", "t", "EUR")
    for n in (1, 2):
        led.apply_flush(f"f{n}", [(a, n, 0, HOUR, 1, 1, TOP)], n)  # zones 1 and 2: two usage rows
        led.add_payment(a, TOP)
    assert led.balance(a) == 0
    problems = led.check_invariants()
    if led.db.dialect == "sqlite":
        assert len(problems) == 1 and problems[0].startswith("balances: cannot be read (a subscriber's history "
                                                             "passes 2^63-1"), problems
    else:
        assert problems == []
    led.db.execute("UPDATE subscribers SET balance = balance + 1")  # and a wrong balance is still found
    if led.db.dialect != "sqlite":
        assert led.check_invariants() == [f"subscriber {a} (a): balance 1 != opening 0 + payments {2 * TOP} + "
                                          f"adjustments 0 - charges {2 * TOP} - fees and settlements 0 = 0"]


def rows_of(led):
    return (led.db.execute("SELECT * FROM usage ORDER BY 1, 2, 3, 4").fetchall(),
            led.db.execute("SELECT subscriber_id, flush_id, amount, ts_ns, span_ns, flush_count FROM charges"
                           " ORDER BY 1, 4, 2").fetchall())


def test_a_rollup_whose_row_would_pass_2_63_keeps_the_rows_as_they_are(led):
    a = led.add_subscriber("a", "t", "EUR", opening_balance=TOP)
    # usage: two minutes of one hour that add up to more than a row holds
    led.apply_flush("f1", [(a, 1, 0, HOUR, TOP, 1, 0), (a, 1, 0, HOUR + M, 1, 1, 0)], HOUR * NS)
    before = rows_of(led)
    now = (HOUR + 40 * 86400) * NS
    with pytest.raises(LedgerError, match=r"usage of subscriber .* add up to more than a row holds \(2\^63-1\)"):
        rollup.roll_up(led, now, "UTC")
    assert rows_of(led) == before


def test_a_rollup_whose_charge_would_pass_2_63_keeps_the_charges_as_they_are(led):
    a = led.add_subscriber("a", "t", "EUR", opening_balance=TOP)
    # two flushes' charges of one hour that add up to more than a row holds, in zones of their own (their usage
    # rolls up: each zone's sum fits)
    led.apply_flush("f1", [(a, 1, 0, HOUR, 1, 1, TOP)], HOUR * NS)
    led.add_payment(a, TOP)
    led.apply_flush("f2", [(a, 2, 0, HOUR + M, 1, 1, TOP)], (HOUR + M) * NS)
    usage_before, charges_before = rows_of(led)
    with pytest.raises(LedgerError, match=r"charges of subscriber .* add up to more than a row holds"):
        rollup.roll_up(led, (HOUR + 40 * 86400) * NS, "UTC")
    usage_after, charges_after = rows_of(led)
    assert charges_after == charges_before
    day = HOUR - HOUR % 86400
    assert usage_after == [(a, 1, 0, day, 1, 1, TOP, 86400), (a, 2, 0, day, 1, 1, TOP, 86400)]  # rolled: its day
    assert usage_before != usage_after and led.balance(a) == 0


def test_a_number_no_column_holds_is_refused_and_changes_nothing(led):
    a = led.add_subscriber("a", "t", "EUR")
    before = led.db.dump()
    for call in (lambda: led.add_payment(a, TOP + 1),
                 lambda: led.apply_flush("f1", [(a, 1, 0, HOUR, TOP + 1, 1, 0)], 1)):
        with pytest.raises(LedgerError):
            call()
        assert led.db.dump() == before


def test_a_write_whose_result_would_pass_2_63_is_refused(led):
    """A balance or a usage row added into past 2^63-1. PostgreSQL refuses the bigint out of range (a
    LedgerError, nothing written). SQLite's ``+`` turns the result into a float without an error (the row
    would hold 9.223372036854776e+18): schema 25's triggers refuse it there, the same LedgerError."""
    a = led.add_subscriber("a", "t", "EUR", opening_balance=TOP)
    led.apply_flush("f1", [(a, 1, 0, HOUR, TOP, 1, 0)], 1)
    before = led.db.dump()
    for call in (lambda: led.add_payment(a, 5), lambda: led.apply_flush("f2", [(a, 1, 0, HOUR, 5, 1, 0)], 2)):
        with pytest.raises(LedgerError, match="out of range|2\\^63"):
            call()
        assert led.db.dump() == before


def test_a_sum_past_2_63_is_refused_below_zero_and_in_the_kernel_marks_too(led):
    """The other sums the ledger adds in SQL: a charge taking a balance below -2^63 (a debt no column holds),
    a kernel mark added past 2^63-1 (SQLite: schema 25's triggers; PostgreSQL: bigint out of range)."""
    a = led.add_subscriber("a", "t", "EUR", opening_balance=-TOP)
    led.adjust_kernel_marks({(a, 0): (TOP, 1)})
    before = led.db.dump()
    for call in (lambda: led.apply_flush("f1", [(a, 1, 0, HOUR, 1, 1, 5)], 1),
                 lambda: led.adjust_kernel_marks({(a, 0): (1, 1)})):
        with pytest.raises(LedgerError, match="out of range|2\\^63"):
            call()
        assert led.db.dump() == before
    assert led.balance(a) == -TOP and led.kernel_marks() == {(a, 0): (TOP, 1)}
