"""What a start reads in bulk equals what it read one subscriber at a time:
``Ledger.period_totals`` against ``usage`` and ``postings`` per subscriber,
each over its own period (the restart path of ``Accountant.resume_from_ledger``), on both backends
(``[sqlite]``, ``[pg]``: a fresh ledger per example)."""

from __future__ import annotations

import shutil

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounting.ledger import Ledger

NS = 1_000_000_000
flush_rows = st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3), st.integers(0, 1), st.integers(0, 200),
                                st.sampled_from([0, 1, 2**32, 2**48])), max_size=30)
postings = st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["prevailing", "fee", "settlement"]),
                              st.integers(-10**12, 10**12), st.integers(0, 12_000)), max_size=15)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flush_rows, postings, st.lists(st.integers(0, 12_000), min_size=4, max_size=4), st.integers(0, 13_000))
def test_period_totals_equal_the_per_subscriber_queries(ledger_target, sqlite_ledger_template, rows, posts, starts_s,
                                                         until_s):
    target = ledger_target()
    if "dbname=" not in target:  # a SQLite path: a copy of the migrated empty ledger is a fresh one, as on PostgreSQL
        shutil.copyfile(sqlite_ledger_template, target)
    ledger = Ledger.open(target)
    try:
        sids = [ledger.add_subscriber(f"s{i}", "basic", "EUR") for i in range(4)]
        minute_rows = [(sids[i], zone, d, minute * 60, nbytes, 1, 0) for i, zone, d, minute, nbytes in rows]
        if minute_rows:
            ledger.apply_flush("f1", minute_rows, 1)
        for n, (i, kind, amount, ts_s) in enumerate(posts):
            ledger.add_posting(sids[i], kind, amount, ts_s * NS + n, f"k{n}")
        since = {sid: starts_s[i] * NS + (i * 7) for i, sid in enumerate(sids)}
        until = until_s * NS
        volumes, prevailing = ledger.period_totals(since, until)
        for sid in sids:
            want = {(u["zone"], u["direction"]): u["bytes"] for u in
                    ledger.usage(sid, since=since[sid] // NS, until=until // NS + 60, group_by=("zone", "direction"))}
            assert volumes.get(sid, {}) == want
            assert prevailing.get(sid, 0) == sum(p["amount"] for p in ledger.postings(sid, since=since[sid], until=until)
                                                 if p["kind"] == "prevailing")
    finally:
        ledger.close()
