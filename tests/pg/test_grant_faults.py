"""The ledger's credit grants (schema 22) on the real server, under concurrency and faults (what the
tests of the older, separate credit store showed, before it was retired, on the ledger's grants that
replaced it):

- three gateways reserving, charging their grants (``apply_flush(grants=True)``) and taking 100
  payments between them at once lose no update;
- PostgreSQL stopped with ``pg_ctl stop -m immediate`` while three gateways reserve and flush, then
  started again: each gateway repeats what failed with the same ids, as the daemon's outbox does, and
  then replays every flush it ever sent: each flush applied once, each payment once, a reserve whose
  commit was lost is there whole or not at all (the subscriber's ``reserved`` is the sum of the
  grants), and balance = opening + payments - charges to the unit.

Amounts are worked out here from what was fed in, never read back to be trusted. The server is the
session's (tests/conftest.py ``pg_cluster``): a test that stops it starts it again, whatever happens.
"""

from __future__ import annotations

import threading
import time

from accounting.ledger import Ledger
from ext.errors import LedgerError

M = 60
LATER = 2 * 10 ** 18  # a validity far ahead


def at(target: str, gateway: str) -> Ledger:
    led = Ledger.open(target)
    led.gateway = gateway
    return led


def rows(sid: int, charged: int) -> list[tuple]:
    return [(sid, 0, 1, M, charged, 1, charged)]


def test_three_gateways_reserving_flushing_and_100_payments_lose_no_update(pg_ledger):
    with Ledger.open(pg_ledger) as led:
        subs = [led.add_subscriber(f"s{k}", "t", "EUR", opening_balance=10_000, credit_limit=500) for k in range(2)]
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []
    charged = [0, 0, 0]
    paid = [0, 0, 0]

    def gateway(n: int) -> None:
        try:
            with at(pg_ledger, f"g{n}") as g:
                g.reserve({sid: 200 for sid in subs}, LATER)
                barrier.wait(timeout=60)
                for i in range(34 if n < 2 else 32):  # 34 + 34 + 32 = 100 payments
                    g.add_payment(subs[(i + n) % 2], 7, idempotency_key=f"g{n}:pay:{i}")
                    paid[n] += 7
                    for sid in subs:
                        assert g.apply_flush(f"g{n}:{sid}:{i}", rows(sid, 5), i, grants=True)
                        charged[n] += 5
                        g.reserve({sid: 5}, LATER)  # the threshold refill, as the grant keeper asks
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=gateway, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and not any(t.is_alive() for t in threads)
    with Ledger.open(pg_ledger) as led:
        assert sum(paid) == 700 and len(led.payments()) == 100
        assert sum(charged) == 100 * 2 * 5
        balances = {sid: led.balance(sid) for sid in subs}
        assert sum(balances.values()) == 2 * 10_000 + 700 - sum(charged)  # 0 lost updates
        for sid in subs:
            row = led.get_subscriber(sid)
            granted = led.db.scalar("SELECT coalesce(sum(amount), 0) FROM grants WHERE subscriber_id = ?", (sid,))
            assert row["reserved"] == granted
            assert balances[sid] == 10_000 + sum(p["amount"] for p in led.payments(sid)) \
                - sum(c["amount"] for c in led.charges(sid))
        assert led.check_invariants() == []


class Outbox:
    """A gateway's calls, each repeated until it goes through, over a connection opened again when the
    server took it away: what the daemon does (Ledger.reconnect_if_lost, the outbox of flushes)."""

    def __init__(self, target: str, gateway: str) -> None:
        self.target, self.gateway = target, gateway
        self.led: Ledger | None = None
        self.failures = 0

    def call(self, fn, deadline: float):
        while True:
            try:
                if self.led is None:
                    self.led = at(self.target, self.gateway)
                return fn(self.led)
            except LedgerError as exc:
                if "refused by the database" in str(exc):
                    raise
                self._lost(deadline)
            except Exception as exc:  # psycopg's OperationalError: the server went away
                if "psycopg" not in type(exc).__module__:
                    raise
                self._lost(deadline)

    def _lost(self, deadline: float) -> None:
        self.failures += 1
        if self.led is not None:
            try:
                self.led.close()
            except Exception:
                pass
            self.led = None
        if time.monotonic() > deadline:
            raise TimeoutError(f"{self.gateway}: the ledger did not come back")
        time.sleep(0.05)

    def close(self) -> None:
        if self.led is not None:
            self.led.close()


def test_an_immediate_stop_mid_way_loses_nothing_and_counts_nothing_twice(pg_cluster, pg_ledger):
    """The stop comes with a call of every gateway in the air, for certain: at round ``STOP_AT`` the
    test holds the subscriber's row lock (a reserve, a flush and a payment each lock it first) and lets
    the gateways go on, g0 into a reserve and g1, g2 into a flush; once the three wait on the lock,
    ``pg_ctl stop -m immediate``: their transactions die uncommitted, and are repeated after the restart."""
    import psycopg

    n_ops, stop_at = 120, 40
    arrived, go = threading.Barrier(4, timeout=60), threading.Barrier(4, timeout=60)
    with Ledger.open(pg_ledger) as led:
        sid = led.add_subscriber("a", "t", "EUR", opening_balance=1_000_000, credit_limit=1000)
    progress = [0, 0, 0]
    errors: list[BaseException] = []
    sent: dict[str, int] = {}  # flush id -> amount, every flush any gateway sent
    paid: dict[str, int] = {}
    boxes = [Outbox(pg_ledger, f"g{n}") for n in range(3)]

    def gateway(n: int) -> None:
        box = boxes[n]
        deadline = time.monotonic() + 120
        try:
            for i in range(n_ops):
                if i == stop_at and n == 0:
                    arrived.wait()
                    go.wait()  # g0 goes into its reserve with the row locked
                box.call(lambda g: g.reserve({sid: 9}, LATER), deadline)  # a lost commit: taken whole or not
                if i == stop_at and n > 0:
                    arrived.wait()
                    go.wait()  # g1 and g2 into their flush
                fid, amount = f"g{n}:{i}", 3 + n
                sent[fid] = amount
                box.call(lambda g: g.apply_flush(fid, rows(sid, amount), i, grants=True), deadline)
                if i % 3 == 0:
                    key = f"g{n}:pay:{i}"
                    paid[key] = 10
                    box.call(lambda g: g.add_payment(sid, 10, idempotency_key=key), deadline)
                progress[n] = i + 1
            # the whole outbox again, same ids: a gateway that cannot tell which of its calls committed
            for i in range(n_ops):
                fid = f"g{n}:{i}"
                assert box.call(lambda g: g.apply_flush(fid, rows(sid, sent[fid]), i, grants=True),
                                deadline) is False
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=gateway, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    try:
        arrived.wait()  # every gateway at round stop_at
        locker = psycopg.connect(pg_ledger)
        locker.execute("SELECT id FROM subscribers WHERE id = %s FOR UPDATE", (sid,))
        go.wait()
        deadline = time.monotonic() + 30
        while locker.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                             " AND datname = current_database()").fetchone()[0] < 3:
            assert time.monotonic() < deadline, "the gateways' calls never reached the lock"
            time.sleep(0.01)
        at_stop = list(progress)
        assert at_stop == [stop_at] * 3
        pg_cluster.stop("immediate")
        try:
            locker.close()
        except Exception:  # the server is gone under it
            pass
        time.sleep(1.0)
        assert all(p <= s + 1 for p, s in zip(progress, at_stop)), "calls went through a stopped server"
        pg_cluster.start()
        for t in threads:
            t.join(timeout=120)
        assert errors == [] and not any(t.is_alive() for t in threads), errors
        assert all(box.failures > 0 for box in boxes), [box.failures for box in boxes]  # all met the outage
    finally:
        if not pg_cluster.running:
            pg_cluster.start()
        for t in threads:
            t.join(timeout=60)
        for box in boxes:
            box.close()
    with Ledger.open(pg_ledger) as led:
        assert len(sent) == 3 * n_ops
        charges = led.charges(sid)
        assert sorted(c["flush_id"] for c in charges) == sorted(sent)  # each flush applied, and once
        assert sum(c["amount"] for c in charges) == sum(sent.values())
        assert led.usage(sid, group_by=())[0]["bytes"] == sum(sent.values())
        assert len(led.payments(sid)) == len(paid)
        row = led.get_subscriber(sid)
        assert row["balance"] == 1_000_000 + sum(paid.values()) - sum(sent.values())
        grants = {g: led.db.scalar("SELECT amount FROM grants WHERE gateway = ? AND subscriber_id = ?", (g, sid))
                  for g in ("g0", "g1", "g2")}
        assert row["reserved"] == sum(grants.values())  # no reserve half there: the row and the grants agree
        # each gateway took 9 per round and charged its grant 3 + n; a lost reserve commit is 9 fewer, never 4
        for n in range(3):
            taken = grants[f"g{n}"] + (3 + n) * n_ops
            assert taken % 9 == 0 and n_ops * 9 <= taken <= (n_ops + 1) * 9, (n, grants)
        assert led.check_invariants() == []
