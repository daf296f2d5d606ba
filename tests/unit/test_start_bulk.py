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
@given(flush_rows, postings, st.lists(st.integers(0, 12_000), min_size=4, max_size=4),
       st.lists(st.integers(0, 3), min_size=4, max_size=4), st.integers(0, 13_000), st.integers(0, 5),
       st.lists(st.booleans(), min_size=4, max_size=4))
def test_period_totals_equal_the_per_subscriber_queries(ledger_target, sqlite_ledger_template, rows, posts, starts_s,
                                                         start_of, until_s, scanned, wanted):
    """Shared and distinct period starts, summed by scans of the minutes (up to ``scanned`` distinct starts)
    or by the join; a fifth subscriber with usage and postings that is not asked for; the prevailing charges
    of some (``prevailing_of``) or all."""
    target = ledger_target()
    if "dbname=" not in target:  # a SQLite path: a copy of the migrated empty ledger is a fresh one, as on PostgreSQL
        shutil.copyfile(sqlite_ledger_template, target)
    ledger = Ledger.open(target)
    ledger._PERIOD_STARTS_SCANNED = scanned
    try:
        sids = [ledger.add_subscriber(f"s{i}", "basic", "EUR") for i in range(5)]
        minute_rows = [(sids[i], zone, d, minute * 60, nbytes, 1, 0) for i, zone, d, minute, nbytes in rows]
        minute_rows += [(sids[4], zone, d, minute * 60, nbytes, 1, 0) for _i, zone, d, minute, nbytes in rows[:3]]
        if minute_rows:
            ledger.apply_flush("f1", minute_rows, 1)
        for n, (i, kind, amount, ts_s) in enumerate(posts):
            ledger.add_posting(sids[i if n % 4 else 4], kind, amount, ts_s * NS + n, f"k{n}")
        since = {sid: starts_s[start_of[i]] * NS + (start_of[i] * 7) for i, sid in enumerate(sids[:4])}
        until = until_s * NS
        some = [sid for sid, w in zip(sids, wanted) if w]
        for prevailing_of in (None, some):
            volumes, prevailing = ledger.period_totals(since, until, prevailing_of)
            assert set(volumes) <= set(since) and set(prevailing) <= set(prevailing_of or since)
            for sid in since:
                want = {(u["zone"], u["direction"]): u["bytes"] for u in
                        ledger.usage(sid, since=since[sid] // NS, until=until // NS + 60, group_by=("zone", "direction"))}
                assert volumes.get(sid, {}) == want
                if prevailing_of is None or sid in prevailing_of:
                    assert prevailing.get(sid, 0) == sum(p["amount"] for p in ledger.postings(
                        sid, since=since[sid], until=until) if p["kind"] == "prevailing")
    finally:
        ledger.close()
