"""Concurrency and faults on the real server: three gateways (each with its
own pool) paying and reporting at once lose no update; PostgreSQL stopped
with ``pg_ctl stop -m immediate`` mid-way and started again loses nothing and
counts nothing twice, the client repeating its transactions with the same ids
(and then replaying every one of them, as a gateway that does not know which
of its calls committed would)."""

from __future__ import annotations

import threading
import time

import pytest

from accounting.credit.pg import CreditStore

S = 1_000_000_000


def test_three_gateways_at_once_lose_no_update(pg_db):
    setup = CreditStore.open(pg_db, pool_size=1)
    setup.open_account(1, 10_000)
    setup.open_account(2, 0, credit_limit=500)
    stores = [CreditStore.open(pg_db, pool_size=2, retry_for=20) for _ in range(3)]
    barrier = threading.Barrier(3)
    errors, charged, paid = [], [0, 0, 0], [0, 0, 0]

    def gateway(n: int, store: CreditStore):
        try:
            grants = {acc: store.reserve(acc, f"gw{n}", 200, 3600 * S).id for acc in (1, 2)}
            barrier.wait()
            for i in range(34 if n < 2 else 32):  # 34 + 34 + 32 = 100 payments
                acc = 1 + (i + n) % 2
                store.pay(acc, 7, f"gw{n}:pay:{i}")
                paid[n] += 7
                for acc_, gid in grants.items():
                    r = store.report(gid, f"gw{n}:{acc_}:{i}", 5, more=5)
                    charged[n] += r.charged
        except Exception as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=gateway, args=(n, s)) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        assert sum(paid) == 700 and len(setup.payments()) == 100
        a, b = setup.account(1), setup.account(2)
        # every report charged its 5 (the grants were refilled by ``more``): 100 rounds x 2 accounts
        assert sum(charged) == (34 + 34 + 32) * 2 * 5
        assert a["balance"] + b["balance"] == 10_000 + 700 - sum(charged)
        assert setup.check() == []
        _, feed = setup.changes_since(0)
        assert sum(1 for r in feed if r["what"] == "payment") == 100
        assert [r["change"] for r in feed] == list(range(1, len(feed) + 1))
    finally:
        for s in (*stores, setup):
            s.close()


def test_immediate_stop_mid_way_loses_nothing_and_counts_nothing_twice(pg_cluster, pg_db):
    n_ops = 80
    setup = CreditStore.open(pg_db, pool_size=1, retry_for=60)
    setup.open_account(1, 1_000)
    store = CreditStore.open(pg_db, pool_size=2, retry_for=60)
    grant = store.reserve(1, "gw1", 10, 3600 * S, request_id="g1").id
    follower = setup.follower()
    progress, done, errors = [0], threading.Event(), []
    seen_payments: list[dict] = []

    def ops():
        for i in range(n_ops):
            store.pay(1, 10, f"pay:{i}")
            store.report(grant, f"rep:{i}", 3, more=3)
            progress[0] = i + 1

    def work():
        try:
            ops()
            before = store.account(1)
            ops()  # the whole outbox again, same ids: nothing may move
            assert store.account(1) == before
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            done.set()

    def follow():
        deadline = time.monotonic() + 90
        while len(seen_payments) < n_ops and time.monotonic() < deadline:
            try:
                seen_payments.extend(r for r in follower.poll(timeout=0.5) if r["what"] == "payment")
            except Exception:  # noqa: BLE001 - the server is down; the next poll reconnects
                time.sleep(0.1)

    worker = threading.Thread(target=work)
    watcher = threading.Thread(target=follow)
    worker.start()
    watcher.start()
    try:
        deadline = time.monotonic() + 30
        while progress[0] < n_ops // 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert progress[0] < n_ops, "the worker finished before the stop: nothing was tested"
        pg_cluster.stop("immediate")
        stopped_at = progress[0]
        time.sleep(1.0)
        assert progress[0] <= stopped_at + 1  # nothing gets through while the server is down
        pg_cluster.start()
        assert done.wait(90), "the worker did not finish after the restart"
        watcher.join(90)
        assert not errors, errors
        assert store.retries > 0  # the outage was met and repeated through
        acc = setup.account(1)
        assert acc["balance"] == 1_000 + 10 * n_ops - 3 * n_ops
        assert acc["reserved"] == 10  # 10 granted, each report used 3 and asked 3 back
        assert len(setup.payments()) == n_ops
        assert setup.check() == []
        assert sorted(int(r["change"]) for r in seen_payments) == sorted({int(r["change"]) for r in seen_payments})
        assert len(seen_payments) == n_ops  # every top-up reached the follower, across the restart
    finally:
        if not pg_cluster.running:
            pg_cluster.start()
        done.wait(60)
        follower.close()
        store.close()
        setup.close()


@pytest.mark.parametrize("mode", ["immediate"])
def test_a_store_gives_up_after_retry_for_with_credit_unavailable(pg_cluster, pg_db, mode):
    from accounting.credit.pg import CreditUnavailable

    store = CreditStore.open(pg_db, pool_size=1, retry_for=1.0)
    store.open_account(1, 5)
    try:
        pg_cluster.stop(mode)
        t0 = time.monotonic()
        with pytest.raises(CreditUnavailable):
            store.pay(1, 1, "k")
        assert time.monotonic() - t0 < 10
    finally:
        pg_cluster.start()
    store.retry_for = 30  # the pool's reconnect backs off (from 1 s): give it time
    assert store.pay(1, 1, "k").new  # the same call, repeated later, is carried out once
    assert store.account(1)["balance"] == 6
    store.close()
