"""Writers side by side on a PostgreSQL ledger: no lock for the whole ledger, every invariant still held.

Gateways, the admin API, the portal and the CLI write one shared ledger at once. Each test here runs
real writers on their own connections (as separate processes would) against a real server, and checks
what the ledger holds afterwards, not how long anything took:

- a writer of one subscriber never waits for a writer of another (the connection's ``lock_timeout``
  turns a wait into an error: with one lock for the whole ledger every call below would fail), while
  two writers of one subscriber take turns;
- what the old global lock held is held without it: one owner per address (any overlapping prefix,
  the exclusion constraint of schema 24), audit rows whose "before" is the previous change's "after",
  one manual block, tariff versions and card serials numbered without gaps or clashes, zones named
  once by gateways starting together, one rollup at a time.
"""

from __future__ import annotations

import threading

import pytest

from accounting.audit import AuditLog
from accounting.ledger import Ledger
from accounting.operations import OperationError, Operations
from accounting.rollup import roll_up
from gateway.config import load_config

psycopg = pytest.importorskip("psycopg")

CONFIG = """
[gateway]
currency = "EUR"
local_networks = ["100.64.0.0/10", "2001:db8:100::/48"]

[[tariff]]
name = "basic"
price_unit = "MB"
[tariff.prices]
external = "1"
"""
EUR = 10**9  # internal units


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(CONFIG)
    return load_config(path)


def operations(conninfo: str, config, actor: str = "test") -> Operations:
    return Operations(Ledger.open(conninfo), config, actor)


def side_by_side(n: int, work) -> list:
    """``work(i)`` in ``n`` threads released together; their results (or the exception each raised)."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:  # noqa: BLE001 - the test reads what each writer met
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a writer is stuck"
    return results


def test_a_writer_of_one_subscriber_does_not_wait_for_a_writer_of_another(pg_ledger, config):
    ops = operations(pg_ledger, config)
    ops.add("a", "basic", ["100.64.0.1/32"])
    ops.add("b", "basic", ["100.64.0.2/32"])
    other = operations(pg_ledger, config, "admin:other")
    other.ledger.db.execute("SET lock_timeout = '2s'")  # a wait for a lock fails instead of waiting
    holder = Ledger.open(pg_ledger)
    try:
        with holder.transaction():  # a change of a, still checking (before its feed and audit rows: those
            holder.get_subscriber("a", lock=True)  # are one chain each, taken last and held to the commit)
            # everything of b, and what belongs to no subscriber, goes on beside it
            other.update("b", credit_limit="3.00")
            other.topup("b", "2.50", "b-1")
            other.adjust("b", "-0.50", "goodwill")
            other.set_terms("b", discount_bp=1000)
            other.block("b", "unpaid")
            other.unblock("b")
            other.add("c", "basic", ["100.64.0.3/32", "2001:db8:100:3::/64"])
            other.session_start("kea", "kea1", "lease-1", "b", ["100.64.0.9/32"])
            other.generate_cards(3, "10.00")
            other.ledger.set_tariff("basic", {"price": 1})
            # and a change of a waits for the holder: lock_timeout says so
            with pytest.raises(psycopg.errors.LockNotAvailable):
                other.update("a", credit_limit="1.00")
            holder.add_payment("a", 5 * EUR, idempotency_key="holder")
    finally:
        holder.close()
    other.update("a", credit_limit="1.00")  # the holder committed: a is free again
    assert ops.ledger.balance("a") == 5 * EUR and ops.ledger.balance("b") == 2 * EUR
    assert ops.ledger.get_subscriber("a")["credit_limit"] == 1 * EUR
    assert ops.ledger.check_invariants() == []
    other.ledger.close()
    ops.ledger.close()


def test_overlapping_prefixes_added_at_once_have_one_owner(pg_ledger, config):
    """Eight writers, each adding a subscriber whose prefix overlaps all the others' (and one through a
    session): the checks of all eight pass before any writes; the database refuses all but one."""
    prefixes = ["100.64.0.0/16", "100.64.0.0/24", "100.64.0.7/32", "100.64.0.0/29", "100.64.0.4/30",
                "100.64.0.0/20", "100.64.0.6/31"]
    setup = operations(pg_ledger, config)
    setup.add("guest", "basic")
    writers = [operations(pg_ledger, config, f"admin:{i}") for i in range(8)]

    def work(i: int):
        if i == 7:  # a DHCP lease of the same address for a subscriber that exists already
            return writers[i].session_start("kea", "kea1", "l7", "guest", ["100.64.0.7/32"])["status"]
        return writers[i].add(f"s{i}", "basic", [prefixes[i]])["name"]

    results = side_by_side(8, work)
    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 1, results
    assert all(isinstance(e, OperationError) and e.status == 409 for e in lost), lost
    owners = setup.ledger.db.execute("SELECT DISTINCT subscriber_id FROM addresses").fetchall()
    assert len(owners) == 1
    assert setup.ledger.check_invariants() == []
    for w in writers:
        w.ledger.close()
    setup.ledger.close()


def test_a_deadlock_between_two_writers_is_a_conflict_and_writes_nothing(pg_ledger, config):
    """Two writers that each hold a row the other then asks for: the database finds the deadlock and rolls
    one back whole. That one is told so as a conflict with a write of the same moment (409 at the front
    ends, "try again"), not with the driver's own exception, and nothing of it is in the ledger; the other
    commits. (Two writers adding overlapping addresses meet it in the exclusion check: the test above.)"""
    from ext.errors import LedgerConflict

    setup = operations(pg_ledger, config)
    for name in ("a", "b"):
        setup.add(name, "basic")
    ids = [setup.ledger.get_subscriber(n)["id"] for n in ("a", "b")]
    ledgers = [Ledger.open(pg_ledger) for _ in range(2)]
    for led in ledgers:
        led.db.execute("SET lock_timeout = 0")  # wait for the row, so that the deadlock is what ends it
    holding = threading.Barrier(2, timeout=30)

    def work(i: int) -> str:
        led = ledgers[i]
        with led.transaction():
            led.db.execute("SELECT 1 FROM subscribers WHERE id = ? FOR UPDATE", (ids[i],))
            holding.wait()  # each holds its own row: now each asks for the other's
            led.db.execute("SELECT 1 FROM subscribers WHERE id = ? FOR UPDATE", (ids[1 - i],))
            for sid in ids:
                led.db.execute("UPDATE subscribers SET contract = ? WHERE id = ?", (f"by w{i}", sid))
        return "committed"

    results = side_by_side(2, work)
    assert sorted(map(type, results), key=str) == sorted([str, LedgerConflict], key=str), results
    loser = next(i for i, r in enumerate(results) if isinstance(r, LedgerConflict))
    assert "try again" in str(results[loser]) and "deadlock" in str(results[loser])
    winner = 1 - loser
    assert [setup.ledger.get_subscriber(n)["contract"] for n in ("a", "b")] == [f"by w{winner}"] * 2
    for led in ledgers:
        led.close()
    setup.ledger.close()


def test_changes_of_one_subscriber_at_once_take_turns_and_chain_their_audit_rows(pg_ledger, config):
    """Four writers top one subscriber up 15 times each: the balance is the sum, and every payment's audit
    row says as "before" the balance the one before it left (read under the subscriber's row lock; a
    "before" read outside it would repeat a balance another writer had already changed)."""
    setup = operations(pg_ledger, config)
    setup.add("a", "basic", ["100.64.0.1/32"])
    writers = [operations(pg_ledger, config, f"cashier:{i}") for i in range(4)]
    cents = {0: 1, 1: 10, 2: 100, 3: 1000}  # each writer's own amount: a sum says who was lost

    def work(i: int) -> None:
        for k in range(15):
            writers[i].topup("a", f"{cents[i] / 100:.2f}", f"w{i}-{k}")

    assert side_by_side(4, work) == [None] * 4
    assert setup.ledger.balance("a") == 15 * sum(cents.values()) * EUR // 100
    rows = [r for r in AuditLog(setup.ledger).rows(limit=1000) if r["action"] == "payment.add"]
    assert len(rows) == 60
    for prev, row in zip(rows, rows[1:]):
        assert row["before"]["balance"] == prev["after"]["balance"], (prev, row)
    assert AuditLog(setup.ledger).verify() == (True, None)
    for w in writers:
        w.ledger.close()
    setup.ledger.close()


def test_one_manual_block_of_two_at_once(pg_ledger, config):
    setup = operations(pg_ledger, config)
    setup.add("a", "basic", ["100.64.0.1/32"])
    writers = [operations(pg_ledger, config, f"admin:{i}") for i in range(2)]
    results = side_by_side(2, lambda i: writers[i].block("a", f"by {i}")["name"])
    assert sorted(map(str, results)) == ["a", "subscriber a is already blocked by hand"]
    assert setup.ledger.db.scalar("SELECT count(*) FROM blocks WHERE kind = 'block'") == 1
    for w in writers:
        w.ledger.close()
    setup.ledger.close()


def test_numbers_taken_at_once_neither_clash_nor_skip(pg_ledger, config):
    """Tariff versions and card serials are numbered on from the newest: writers at once take turns
    for that one name (Backend.lock), so every one gets its own number and none fails."""
    writers = [operations(pg_ledger, config, f"admin:{i}") for i in range(4)]
    versions = side_by_side(4, lambda i: writers[i].ledger.set_tariff("basic", {"price": i}))
    assert sorted(versions) == [1, 2, 3, 4]
    batches = side_by_side(4, lambda i: writers[i].generate_cards(5, "1.00"))
    serials = sorted(c["serial"] for batch in batches for c in batch)
    assert serials == [f"{n:08d}" for n in range(1, 21)]
    for w in writers:
        w.ledger.close()


def test_gateways_starting_at_once_name_the_zones_once(pg_ledger):
    ledgers = [Ledger.open(pg_ledger) for _ in range(4)]
    assert side_by_side(4, lambda i: ledgers[i].set_zones(["local", "national", "world"])) == [None] * 4
    assert ledgers[0].zones() == {0: "local", 1: "national", 2: "world"}
    for led in ledgers:
        led.close()


def test_one_rollup_at_a_time(pg_ledger):
    """A second process's rollup, while one runs, is skipped and says so: it would do the same work."""
    first, second = Ledger.open(pg_ledger), Ledger.open(pg_ledger)
    try:
        with first.db.exclusive("rollup") as mine:
            assert mine
            summary = roll_up(second, 10**18, "UTC")
            assert summary.skipped and "skipped" in summary.text()
        assert not roll_up(second, 10**18, "UTC").skipped  # the first is done: the second's turn
    finally:
        first.close()
        second.close()
