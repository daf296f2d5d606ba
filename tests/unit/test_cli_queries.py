"""The queries behind the daily commands cost a page, not the table (issue 12: list, show, top and usage at a
million subscribers): every statement `subscriber list`, `subscriber show`, `top` and `usage` run, as SQLite
plans it. No timings: a plan that reads a whole table is what takes the time at a million rows.

The ledger here is small, and SQLite plans it as it plans a large one: no ANALYZE statistics are kept, so the
planner's choice depends on the schema and the query, not on the number of rows."""

from __future__ import annotations

import contextlib
import io
import sqlite3

import pytest

from gateway import cli

CONFIG = """
[gateway]
currency = "EUR"
local_networks = ["100.64.0.0/10"]

[[tariff]]
name = "basic"
price_unit = "MB"
[tariff.prices]
external = "0.01"
"""

# What may read a whole table or index, and why it is left so:
# the "1-50 of N" of a page: one pass over the smallest index of subscribers (at 1M: 14 MB, 5-9 ms warm); an
# exact total without it needs a count kept by triggers (a schema change of its own)
COUNT = "SCAN subscribers USING COVERING INDEX subscribers_active"
# top over all time reads every usage row there is (the covering index, not the table); with --since it is a
# range of that index. Rollups bound the rows; a top over all time at any size needs totals kept per subscriber.
ALL_TIME = "SCAN usage USING COVERING INDEX usage_minute_totals"
ROLLUP = "SCAN rollup_state"  # one row: the rollup's bounds


@pytest.fixture
def ledger_args(tmp_path):
    from accounting.ledger import Ledger
    from accounting.operations import Operations
    from gateway.config import load_config

    (tmp_path / "t.toml").write_text(CONFIG)
    cfg = load_config(str(tmp_path / "t.toml"))
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        ops = Operations(ledger, cfg, "cli:test")
        for i in range(3):
            ops.add(f"s{i}", "basic", [f"100.64.0.{i + 2}/32"], "10.00")
        ops.update("s1", tariff="basic", effective_ns=2 ** 61)  # a pending change, which show prints
        ops.block("s2", "a test")
        ledger.db.execute("INSERT INTO usage (subscriber_id, zone, direction, minute, bytes, packets, amount)"
                          " VALUES (2, 1, 1, 1764633600, 1000, 2, 3), (3, 1, 0, 1764633660, 10, 1, 1)")
    return ["-c", str(tmp_path / "t.toml"), "--db", str(tmp_path / "ledger.db")], tmp_path / "ledger.db"


def _statements(monkeypatch, argv) -> list[str]:
    """Every statement ``tollgate ARGV`` runs (in this process), in order."""
    ran: list[str] = []
    connect = sqlite3.connect

    def traced(*args, **kwargs):
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(ran.append)
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli.main(argv) == 0
    assert out.getvalue()
    return ran


@pytest.mark.parametrize("command, allowed", [
    (["subscriber", "list", "--limit", "2"], {COUNT}),
    (["subscriber", "show", "s1"], set()),
    (["top"], {ALL_TIME, ROLLUP}),
    (["top", "--since", "2025-12-02"], {ROLLUP}),
    (["usage", "s1"], {ROLLUP}),
    (["usage", "s1", "--by", "day", "--since", "2025-12-02"], {ROLLUP}),
])
def test_the_daily_commands_search_and_never_scan_but_where_said(monkeypatch, ledger_args, command, allowed):
    args, db = ledger_args
    ran = _statements(monkeypatch, [*command, *args])
    plans = sqlite3.connect(db)
    scans = set()
    for sql in ran:
        if sql.startswith(("PRAGMA", "BEGIN", "COMMIT", "ROLLBACK")) or "sqlite_master" in sql:
            continue
        for *_, detail in plans.execute("EXPLAIN QUERY PLAN " + sql):
            if detail.startswith("SCAN"):
                scans.add(detail)
    assert scans <= allowed, (command, scans)
    if command[:2] == ["subscriber", "show"]:
        assert any("FROM tariff_changes" in sql for sql in ran)  # the query this guards did run
