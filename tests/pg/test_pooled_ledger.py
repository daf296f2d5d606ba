"""The request threads' ledger on PostgreSQL: one pool (accounting/thread_ledgers.py), a real server.

Thirty-two threads (a web server's request threads) top up, read pages and write audit rows through
one ThreadLedgers of four connections: every change lands once, the server never sees more than
four connections of it (counted in pg_stat_activity while they run), and a server restart costs at
most the calls already on a dropped connection. On SQLite every thread has its own connection.
"""

from __future__ import annotations

import threading

import pytest

from accounting.audit import AuditLog
from accounting.ledger import Ledger
from accounting.operations import Operations
from accounting.thread_ledgers import ThreadLedgers
from gateway.config import load_config

psycopg = pytest.importorskip("psycopg")

CONFIG = """
[gateway]
currency = "EUR"
local_networks = ["100.64.0.0/10"]

[[tariff]]
name = "basic"
price_unit = "MB"
[tariff.prices]
external = "1"
"""
EUR = 10**9


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(CONFIG)
    return load_config(path)


def connections_to(conninfo: str, admin) -> int:
    dbname = psycopg.conninfo.conninfo_to_dict(conninfo)["dbname"]
    return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                         (dbname,)).fetchone()[0]


def test_thirty_two_threads_share_four_connections(pg_ledger, config):
    ledgers = ThreadLedgers(pg_ledger, pool_size=4)
    setup = Operations(Ledger.open(pg_ledger), config, "setup")
    for i in range(8):
        setup.add(f"s{i}", "basic", [f"100.64.0.{i + 1}/32"])
    setup.ledger.close()  # from here on only the pool is connected
    barrier = threading.Barrier(32)
    errors: list = []
    seen: list[int] = []
    done = threading.Event()

    def request(i: int) -> None:
        barrier.wait()
        try:
            ops = Operations(ledgers.get(), config, f"api:{i}")
            for k in range(10):
                ops.topup(f"s{i % 8}", "0.01", f"t{i}-{k}")  # a transaction with its audit row
                page = ops.list(limit=5)  # reads outside a transaction borrow a connection
                assert page["total"] == 8 and len(page["items"]) == 5
        except Exception as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(exc)

    admin = psycopg.connect(pg_ledger, autocommit=True)
    try:
        def sample() -> None:
            while not done.is_set():
                seen.append(connections_to(pg_ledger, admin))
                done.wait(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        threads = [threading.Thread(target=request, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        done.set()
        sampler.join(10)
    finally:
        admin.close()
    assert errors == []
    assert seen and max(seen) <= 4, max(seen)
    led = ledgers.get()
    assert all(ledgers.get() is led for _ in range(3))  # one ledger for every thread
    assert sum(led.balance(f"s{i}") for i in range(8)) == 320 * EUR // 100
    assert sum(1 for r in AuditLog(led).rows(limit=1000) if r["action"] == "payment.add") == 320
    assert AuditLog(led).verify() == (True, None)
    ledgers.close()


def test_a_restarted_server_costs_only_the_calls_on_dropped_connections(pg_cluster, pg_ledger, config):
    ledgers = ThreadLedgers(pg_ledger, pool_size=2)
    ops = Operations(ledgers.get(), config, "api")
    ops.add("a", "basic", ["100.64.0.1/32"])
    pg_cluster.restart()
    failures = 0
    for k in range(4):  # the pool's connections died with the server: each fails once, then it makes new ones
        try:
            ops.topup("a", "1.00", f"after-{k}")
        except psycopg.OperationalError:
            failures += 1
    assert failures <= 2
    ops.topup("a", "1.00", "last")
    assert ops.ledger.balance("a") == (4 - failures + 1) * EUR
    ledgers.close()


def test_on_sqlite_each_thread_has_its_own_connection(tmp_path):
    ledgers = ThreadLedgers(tmp_path / "ledger.db")
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(ledgers.get())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(led) for led in got}) == 3 and ledgers.get() not in got
    for led in got:
        led.close()
