"""accounting/credit/pg.py on a real PostgreSQL: each operation, its
idempotency, the invariant held by the database, the change feed's order."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from accounting.credit import pg as credit
from accounting.credit.pg import CreditError, CreditStore

S = 1_000_000_000  # ns
EUR = 1_000_000_000  # nano-units


@pytest.fixture
def store(pg_db):
    s = CreditStore.open(pg_db, pool_size=2, retry_for=5)
    try:
        yield s
    finally:
        s.close()


def test_migrations_apply_once_and_a_newer_schema_is_refused(pg_db):
    with CreditStore.open(pg_db, pool_size=1) as s:  # the template was migrated: nothing to do
        pass
    with psycopg.connect(pg_db, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM credit.schema_version").fetchall() == [(1,)]
        assert credit.migrate(conn) == 1
        conn.execute("INSERT INTO credit.schema_version VALUES (99, 0)")
        with pytest.raises(CreditError, match="version 99"):
            credit.migrate(conn)
    assert s.pool.closed


def test_a_fresh_database_is_migrated_by_open(pg_cluster):
    conninfo = pg_cluster.create_database("fresh_migrate")
    with CreditStore.open(conninfo, pool_size=1) as s:
        assert s.open_account(1, 5)
        assert s.account(1)["balance"] == 5


def test_reserve_grants_at_most_balance_plus_credit_then_the_final_unit(store):
    store.open_account(1, 10 * EUR, credit_limit=2 * EUR)
    a = store.reserve(1, "gw1", 8 * EUR, 30 * S, now=0)
    assert (a.granted, a.final, a.valid_until_ns) == (8 * EUR, False, 30 * S)
    b = store.reserve(1, "gw2", 8 * EUR, 30 * S, now=0)
    assert (b.granted, b.final) == (4 * EUR, True)  # what is left of balance + credit: the final unit
    c = store.reserve(1, "gw3", 1, 30 * S, now=0)
    assert (c.id, c.granted, c.final) == (None, 0, True)
    assert store.account(1) == {"id": 1, "opening": 10 * EUR, "balance": 10 * EUR, "credit_limit": 2 * EUR,
                                "reserved": 12 * EUR, "available": 0}
    assert store.check() == []


def test_reserve_is_idempotent_by_request_id(store):
    store.open_account(1, 100)
    a = store.reserve(1, "gw1", 60, S, now=0, request_id="req-1")
    again = store.reserve(1, "gw1", 60, S, now=0, request_id="req-1")
    assert again == a
    assert store.account(1)["reserved"] == 60
    assert len(store.grants(1)) == 1


def test_bad_input_changes_nothing(store):
    store.open_account(1, 100)
    for amount in (0, -5, 1.5, True, "10", 2 ** 63):
        with pytest.raises(CreditError):
            store.reserve(1, "gw1", amount, S)
    with pytest.raises(CreditError, match="no account 2"):
        store.reserve(2, "gw1", 10, S)
    with pytest.raises(CreditError, match="no grant"):
        store.report(999, "r", 1)
    with pytest.raises(CreditError, match="opening balance"):
        store.open_account(1, 101)
    assert store.open_account(1, 100) is False
    assert store.grants() == [] and store.account(1)["reserved"] == 0


def test_the_database_itself_refuses_outstanding_grants_beyond_balance_and_credit(store, pg_db):
    store.open_account(1, 100, credit_limit=10)
    store.reserve(1, "gw1", 110, S)
    with psycopg.connect(pg_db) as conn, pytest.raises(psycopg.errors.CheckViolation, match="grants_covered"):
        conn.execute("UPDATE credit.accounts SET reserved = reserved + 1 WHERE id = 1")
    with pytest.raises(CreditError, match="refused by the database"):
        store.set_credit_limit(1, 9)  # outstanding 110 > 100 + 9
    store.set_credit_limit(1, 10)


def test_report_charges_once_per_report_id(store):
    store.open_account(1, 100)
    g = store.reserve(1, "gw1", 60, S, now=0)
    r = store.report(g.id, "gw1:1", 25, now=1)
    assert (r.charged, r.unpaid, r.returned, r.replay) == (25, 0, 0, False)
    replay = store.report(g.id, "gw1:1", 25, now=2)
    assert replay.replay and (replay.charged, replay.unpaid) == (25, 0)
    with pytest.raises(CreditError, match="other contents"):
        store.report(g.id, "gw1:1", 26)
    assert store.account(1) | {} == {"id": 1, "opening": 100, "balance": 75, "credit_limit": 0, "reserved": 35,
                                     "available": 40}
    assert store.check() == []


def test_final_report_returns_the_unused_part(store):
    store.open_account(1, 100)
    g = store.reserve(1, "gw1", 60, S, now=0)
    store.report(g.id, "r1", 10)
    r = store.report(g.id, "r2", 15, final=True)
    assert (r.charged, r.returned) == (15, 35)
    assert store.account(1)["balance"] == 75 and store.account(1)["reserved"] == 0
    assert store.grants(1)[0]["state"] == "final"
    assert store.expire(now=10 * S) == []  # closed already
    with pytest.raises(CreditError, match="nothing more"):
        store.report(g.id, "r3", 0, final=True, more=5)


def test_usage_beyond_the_grant_is_charged_from_the_spare_balance_then_unpaid(store):
    store.open_account(1, 100)
    g = store.reserve(1, "gw1", 50, S, now=0)
    other = store.reserve(1, "gw2", 30, S, now=0)  # spare now 20
    r = store.report(g.id, "r1", 80)  # 50 from the grant, 20 from the spare, 10 unpaid
    assert (r.charged, r.unpaid) == (70, 10)
    acc = store.account(1)
    assert (acc["balance"], acc["reserved"], acc["available"]) == (30, 30, 0)  # gw2's grant still covered
    assert store.report(other.id, "r2", 30, final=True).charged == 30
    assert store.account(1)["balance"] == 0
    assert store.check() == []


def test_report_with_more_extends_in_the_same_round_trip(store):
    store.open_account(1, 100)
    g = store.reserve(1, "gw1", 40, S, now=0)
    r = store.report(g.id, "r1", 30, more=40, validity_ns=5 * S, now=S)
    assert (r.charged, r.granted) == (30, 40)
    row = store.grants(1)[0]
    assert (row["amount"], row["used"], row["valid_until_ns"]) == (80, 30, 6 * S)
    r = store.report(g.id, "r2", 20, more=1000)
    assert r.granted == 20  # balance 50, grant has 30 left: 20 spare
    assert store.account(1)["available"] == 0


def test_extend_adds_to_an_open_grant_only_and_is_idempotent(store):
    store.open_account(1, 100)
    g = store.reserve(1, "gw1", 10, S, now=0)
    e = store.extend(g.id, 30, validity_ns=10 * S, now=S, request_id="x1")
    assert (e.granted, e.valid_until_ns) == (30, 11 * S)
    assert store.extend(g.id, 30, now=S, request_id="x1") == e
    assert store.account(1)["reserved"] == 40
    store.report(g.id, "f", 0, final=True)
    assert store.extend(g.id, 30).granted == 0
    assert store.account(1)["reserved"] == 0


def test_expire_returns_what_a_dead_gateway_held_after_its_validity(store):
    store.open_account(1, 100)
    store.open_account(2, 100)
    a = store.reserve(1, "dead", 60, 10 * S, now=0)
    store.report(a.id, "d1", 20)
    b = store.reserve(2, "alive", 50, 30 * S, now=0)
    assert store.expire(now=10 * S - 1) == []
    assert store.expire(now=10 * S) == [(a.id, 1, 40)]
    assert store.expire(now=10 * S) == []
    assert store.account(1) | {} == {"id": 1, "opening": 100, "balance": 80, "credit_limit": 0, "reserved": 0,
                                     "available": 80}
    assert store.account(2)["reserved"] == 50
    # the dead gateway, back, reports late: charged from what is spare
    late = store.report(a.id, "d2", 90)
    assert (late.charged, late.unpaid) == (80, 10)
    assert store.account(1)["balance"] == 0
    assert [g["state"] for g in store.grants()] == ["expired", "open"] and b.id
    assert store.check() == []


def test_release_all_closes_only_that_gateways_grants(store):
    store.open_account(1, 100)
    a = store.reserve(1, "gw1", 30, S, now=0)
    store.reserve(1, "gw1", 20, S, now=0)
    c = store.reserve(1, "gw2", 10, S, now=0)
    store.report(a.id, "a1", 5)
    assert sorted(back for _, _, back in store.release_all("gw1")) == [20, 25]
    assert store.account(1)["reserved"] == 10
    assert [g["id"] for g in store.grants(open_only=True)] == [c.id]
    assert store.release_all("gw1") == []


def test_payments_are_idempotent_by_key(store):
    store.open_account(1, 0)
    p = store.pay(1, 5 * EUR, "bank:1")
    assert p.new
    again = store.pay(1, 5 * EUR, "bank:1")
    assert (again.id, again.new) == (p.id, False)
    with pytest.raises(CreditError, match="was used"):
        store.pay(1, 6 * EUR, "bank:1")
    with pytest.raises(CreditError, match="no account"):
        store.pay(7, 1, "bank:2")
    assert store.account(1)["balance"] == 5 * EUR
    assert store.reserve(1, "gw1", 6 * EUR, S).granted == 5 * EUR


def test_a_top_up_wakes_a_follower_at_once(store):
    store.open_account(1, 0)
    follower = store.follower()
    try:
        def pay_soon():
            time.sleep(0.2)
            store.pay(1, 100, "top-up")

        t = threading.Thread(target=pay_soon)
        t0 = time.monotonic()
        t.start()
        rows = follower.poll(timeout=10)
        waited = time.monotonic() - t0
        t.join()
        assert [(r["account"], r["what"]) for r in rows] == [(1, "payment")]
        assert waited < 5  # woken by NOTIFY, not by the 10 s timeout
        assert follower.poll(timeout=0.05) == []
    finally:
        follower.close()


def test_the_change_feed_is_in_commit_order(store, pg_db):
    """A feed writer whose transaction is still open holds the next writer
    back, so a reader never sees change 2 while change 1 may still commit
    (with a sequence it would: 2 visible, 1 later, and "id > 2" misses 1)."""
    store.open_account(1, 0)
    start = store.last_change_id()
    with psycopg.connect(pg_db) as slow:
        with slow.cursor() as cur:
            first = CreditStore._feed(cur, 1, "slow", 0)  # in an open transaction
        done = threading.Event()
        t = threading.Thread(target=lambda: (store.pay(1, 1, "p"), done.set()))
        t.start()
        time.sleep(0.3)
        assert not done.is_set()  # the payment waits for the slow writer's commit
        assert store.changes_since(start)[1] == []
        slow.commit()
        t.join(10)
    last, rows = store.changes_since(start)
    assert [(r["change"], r["what"]) for r in rows] == [(first, "slow"), (first + 1, "payment")]
    assert last == first + 1
