"""Rollups: the ledger grows with active subscriber-days, not with seconds.

The gateway flushes every second: one charge row per active subscriber per
flush and one usage row per subscriber, zone, direction and minute. Kept as
they are, that is kilobytes per active subscriber-minute. :func:`roll_up`
replaces, in short transactions:

- usage minute rows older than ``minute_window`` by one row per *local hour*,
  and hourly rows older than ``hour_window`` by one row per *local day*;
- one-flush charges likewise: per subscriber per local hour, then per day
  (by the flush's ``ts_ns``);
- flushes older than ``flush_horizon`` by a watermark per boot (below).

Every sum is kept: a rolled row holds exactly the bytes, packets, amounts (and
number of flushes) of the rows it replaces, in the same transaction that
deletes them.

Buckets. A day is a local day of the ledger's time zone, from the instant its
local date begins (``datetime(y, m, d, tzinfo=tz)``, as
:mod:`accounting.billing` starts periods) to the next: 23, 24 or 25 hours
across DST. An hour is the time between two *local* hour starts (an instant
whose local time is hh:00:00) within one day, the day start being one too: in
a whole-hour zone these are the UTC hours; in a :30 or :45 zone (Asia/Kolkata,
Australia/Adelaide, Asia/Kathmandu) they are local hours, so a local range
such as "from 14:00" stays exact; a DST change makes one hour shorter or
longer (Lord Howe's 30-minute change: 90 minutes, never more than 2 hours).
Days are unions of hours, hours of minutes, so a coarser bucket never cuts a
finer one, and billing periods (unions of local days) are unions of buckets.

Readers (``Ledger.usage``, ``Ledger.charges``) are exact for any range whose
bounds are bucket bounds where buckets are coarse: before the ledger's
``day_cutoff`` a bound must be a local day start, before ``hour_cutoff`` a
local hour start; anything else is refused with a LedgerError naming the
bucket and the two bounds to ask instead (``Ledger.exact_range`` widens a range
to them). Invoices, balances at a period start and the portal's days ask only
day starts, so they are exact whatever has been rolled.

Flushes and idempotency. A flush id seen before must change nothing, for every
id a gateway might still send. The daemon's ids are ``<boot>:<seq>``; it
applies them in seq order and retries only its one pending flush, whose seq is
above every seq of its boot already applied. So a flush ``<boot>:<seq>`` older
than ``flush_horizon`` may be deleted if the boot's watermark ``pruned_seq``
becomes at least ``seq``, in the same transaction; ``apply_flush`` treats any
``<boot>:<seq>`` with ``seq <= pruned_seq`` as applied. Ids of another form
(``replay:<digest>:<n>``, whose replays are made idempotent by the capture's
digest too), flushes a spool file's record names, and flushes whose own
charges are not rolled up yet are never pruned.

Cost. Work is in proportion to the rows rolled: each row is read once through
a partial index and deleted, plus two index lookups per subscriber per run.
Each transaction touches about ``batch_rows`` rows (default 5000: a few ms),
so a flush waits at most that long for SQLite's write lock.

Writers beside it. On SQLite a flush waits for the rollup's transaction (one
writer); between two of them it may commit. On PostgreSQL flushes do not wait
(row locks only), so a flush may write into a bucket being rolled at any
moment: a bucket's sums are those of the rows its ``DELETE ... RETURNING``
removed, never of an earlier read, and minutes landing before the day cutoff
after the day stage are left for the next run's day stage.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import time
from bisect import bisect_right
from dataclasses import asdict, dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ext.errors import LedgerError

__all__ = ["DEFAULT_FLUSH_HORIZON", "DEFAULT_HOUR_WINDOW", "DEFAULT_MINUTE_WINDOW", "HOUR_MAX", "RollupSummary",
           "day_bounds", "hour_bounds", "main", "roll_up"]

NS = 1_000_000_000
HOUR_MAX = 7200  # seconds: no local hour is longer (see the module doc); every local day is
DEFAULT_MINUTE_WINDOW = 2 * 86400  # minute rows kept two days: the live gateway and recent graphs
DEFAULT_HOUR_WINDOW = 35 * 86400  # hourly rows kept a month and some: hour-by-hour questions of the last period
DEFAULT_FLUSH_HORIZON = 86400  # a day: a gateway retries only the flush of its last seconds
ENGINE_ID = re.compile(r"([^:]+):([0-9]{1,18})")  # "<boot>:<seq>", the daemon's flush ids


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise LedgerError(f"unknown time zone {name!r} (an IANA name such as Europe/Berlin)") from None


@functools.lru_cache(maxsize=4096)
def _day(tzname: str, day: dt.date) -> tuple[int, ...]:
    """The bucket bounds of one local day: its start, every local hour start
    after it, and (last) the next day's start; epoch seconds."""
    tz = ZoneInfo(tzname)
    start = int(dt.datetime(day.year, day.month, day.day, tzinfo=tz).timestamp())
    nxt = day + dt.timedelta(days=1)
    end = int(dt.datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz).timestamp())
    if start % 60 or end % 60:  # a local mean time of the 19th century: no ledger has minutes there
        raise LedgerError(f"{tzname}: {day} does not start on a whole minute; cannot roll up there")
    bounds = [start]
    # every offset in use is a multiple of 15 minutes: local hour starts are among the UTC quarters
    t = start - start % 900 + 900
    while t < end:
        if dt.datetime.fromtimestamp(t, tz).minute == 0:
            bounds.append(t)
        t += 900
    bounds.append(end)
    return tuple(bounds)


def _local_day(tzname: str, t: int) -> tuple[int, ...]:
    bounds = _day(tzname, dt.datetime.fromtimestamp(t, ZoneInfo(tzname)).date())
    if not bounds[0] <= t < bounds[-1]:  # cannot happen with tzdata as it is; refuse rather than misfile
        raise LedgerError(f"{tzname}: {t} is not inside its own local day {bounds[0]}..{bounds[-1]}")
    return bounds


def day_bounds(t: int, tzname: str) -> tuple[int, int]:
    """``[start, end)`` (epoch seconds) of the local day holding second ``t``."""
    bounds = _local_day(tzname, t)
    return bounds[0], bounds[-1]


def hour_bounds(t: int, tzname: str) -> tuple[int, int]:
    """``[start, end)`` (epoch seconds) of the local hour bucket holding second ``t``."""
    bounds = _local_day(tzname, t)
    i = bisect_right(bounds, t)
    return bounds[i - 1], bounds[i]


def bucket(t: int, tzname: str, level: str) -> tuple[int, int]:
    return hour_bounds(t, tzname) if level == "hour" else day_bounds(t, tzname)


@dataclass
class RollupSummary:
    timezone: str
    hour_cutoff: int  # epoch seconds: before it, usage and charges are at most hourly
    day_cutoff: int  # before it, daily
    # rows replaced and the rows that replaced them (not the tables' sizes: counting years of rows every run
    # would cost more than the run)
    usage_rows_replaced: int = 0
    usage_rows_written: int = 0
    charge_rows_replaced: int = 0
    charge_rows_written: int = 0
    flushes_pruned: int = 0
    transactions: int = 0
    seconds: float = 0.0
    skipped: bool = False  # another process was rolling the ledger up: nothing done, that one does it

    def text(self) -> str:
        def when(t):
            return dt.datetime.fromtimestamp(t, ZoneInfo(self.timezone)).strftime("%Y-%m-%d %H:%M %Z")
        if self.skipped:
            return "rollup skipped: another process (a gateway sharing the ledger, a command) is rolling it up"
        return (f"rolled up ({self.timezone}): usage rows {self.usage_rows_replaced} -> {self.usage_rows_written}, "
                f"charges {self.charge_rows_replaced} -> {self.charge_rows_written}, {self.flushes_pruned} flushes "
                f"pruned, in {self.transactions} transactions, {self.seconds:.1f} s; hours before "
                f"{when(self.hour_cutoff)}, days before {when(self.day_cutoff)}")


def roll_up(ledger, now_ns: int, timezone: str, minute_window: int = DEFAULT_MINUTE_WINDOW,
            hour_window: int = DEFAULT_HOUR_WINDOW, flush_horizon: int = DEFAULT_FLUSH_HORIZON,
            batch_rows: int = 5000, progress=None, cache_mib: int = 128) -> RollupSummary:
    """Roll ``ledger`` up as of ``now_ns``: minute rows older than
    ``minute_window`` seconds into local hours, hourly rows older than
    ``hour_window`` into local days of ``timezone`` (the ledger's: the first
    rollup records it, another is refused), charges likewise, flushes older
    than ``flush_horizon`` seconds pruned (module doc).

    Each transaction rolls whole buckets of one or more subscribers, about
    ``batch_rows`` rows; an exception (or a kill) between or inside them
    leaves a consistent ledger, and running again finishes the work.
    Running twice is running once. ``progress(stage, subscriber, start,
    end)`` is called inside the transaction after each bucket (stage
    ``usage-day``, ``usage-hour``, ``charges-day``, ``charges-hour``, or
    ``flushes`` with the number pruned). ``cache_mib``: SQLite's page cache
    for the run (restored after): the rows deleted are spread over every
    index of usage and charges, and with the default 2 MiB cache a large
    ledger is read from the OS again and again (the gain is not measured
    apart yet: benches/README.md). PostgreSQL's cache is the server's
    shared buffers: nothing is set there (``Backend.page_cache``).
    """
    from .ledger import _int

    t0 = time.monotonic()
    now = _int(now_ns, "now (integer nanoseconds)", 0) // NS
    _int(minute_window, "minute window (seconds)", 3600)  # the live gateway reads the last minutes by minute
    _int(hour_window, "hour window (seconds)", minute_window)
    _int(flush_horizon, "flush horizon (seconds)", 60)
    _int(batch_rows, "batch rows", 1)
    zone(timezone)
    hour_cut = hour_bounds(now - minute_window, timezone)[0]
    day_cut = min(day_bounds(now - hour_window, timezone)[0], hour_cut)
    _int(cache_mib, "cache (MiB)", 1)
    db = ledger.db
    # One rollup at a time: gateways sharing a ledger each run theirs, and two of them would do the same
    # work twice over (each bucket's sums would still be right: every DELETE ... RETURNING takes rows
    # the other's cannot, and coarse rows are added into).
    with db.exclusive("rollup") as mine, db.page_cache(cache_mib * 1024):
        if not mine:
            return RollupSummary(timezone, hour_cut, day_cut, skipped=True)
        return _roll_up(ledger, db, now, timezone, hour_cut, day_cut, flush_horizon, batch_rows, progress, t0)


def _roll_up(ledger, db, now, timezone, hour_cut, day_cut, flush_horizon, batch_rows, progress, t0) -> RollupSummary:
    s = RollupSummary(timezone, hour_cut, day_cut)
    # The cutoffs first, in their own transaction: readers refuse ranges cutting the buckets about to be written.
    with ledger.transaction():
        row = db.execute("SELECT timezone, hour_cutoff, day_cutoff FROM rollup_state").fetchone()
        if row and row[0] != timezone:
            raise LedgerError(f"this ledger is rolled up by the local days of {row[0]}, not {timezone}: "
                              "buckets of another time zone would cut through them (set the config's timezone back)")
        if row:
            s.hour_cutoff, s.day_cutoff = max(row[1], hour_cut), max(row[2], day_cut)
        db.execute("INSERT INTO rollup_state (id, timezone, hour_cutoff, day_cutoff) VALUES (1, ?, ?, ?)"
                   " ON CONFLICT (id) DO UPDATE SET hour_cutoff = excluded.hour_cutoff,"
                   " day_cutoff = excluded.day_cutoff", (timezone, s.hour_cutoff, s.day_cutoff))
    s.transactions += 1
    # days first: old minute rows (a late replay, a first rollup) go to their day at once, not through hours
    for stage in ("usage-day", "usage-hour", "charges-day", "charges-hour"):
        n, replaced, written = _batched(ledger, _units(db, stage, _with_rows(db, stage, s), s), batch_rows, progress)
        s.transactions += n
        if stage.startswith("usage"):
            s.usage_rows_replaced += replaced
            s.usage_rows_written += written
        else:
            s.charge_rows_replaced += replaced
            s.charge_rows_written += written
    s.flushes_pruned, n = _prune_flushes(ledger, now - flush_horizon, batch_rows, progress)
    s.transactions += n
    s.seconds = time.monotonic() - t0
    return s


# What each stage rolls: (table, level, (index, where) of the rows finer than the level, time unit).
# Each WHERE matches one partial index (migration 0016), so a subscriber's years of daily rows are never read.
# INDEXED BY (db.index_hint, SQLite's): schema 15's usage (subscriber_id, minute) would serve too, and read the
# years of daily rows first. PostgreSQL takes no hints: its planner picks the partial index whose WHERE is the query's.
_FINER = {
    "usage-day": ("usage", "day", (("usage_fine", "span = 60"), ("usage_hourly", "span > 60 AND span <= 7200")), 1),
    "usage-hour": ("usage", "hour", (("usage_fine", "span = 60"),), 1),
    "charges-day": ("charges", "day", (("charges_fine", "span_ns = 0"),
                                       ("charges_hourly", f"span_ns > 0 AND span_ns <= {HOUR_MAX * NS}")), NS),
    "charges-hour": ("charges", "hour", (("charges_fine", "span_ns = 0"),), NS),
}


def _span(stage: str, s: RollupSummary) -> tuple[int, int]:
    """``[from, to)`` (in the table's time unit) of the rows a stage rolls: a day stage everything before the day
    cutoff, an hour stage what lies between the two cutoffs. Minutes before the day cutoff that come after the
    day stage (a late flush between two stages, or beside the rollup on PostgreSQL) wait for the next run's
    day stage: an hour starting at a day's start would be the key of that day's row."""
    _table, level, _finer, unit = _FINER[stage]
    return (0, s.day_cutoff * unit) if level == "day" else (s.day_cutoff * unit, s.hour_cutoff * unit)


def _with_rows(db, stage: str, s: RollupSummary) -> list[int]:
    """The subscribers that have rows to roll in this stage, found before any transaction: one scan of the
    finer rows' partial indexes (the recent window: in proportion to the active subscribers), not a look at
    every subscriber (a million subscribers: 95 s, much of it inside the write transactions, before this)."""
    table, level, finer, unit = _FINER[stage]
    start, cutoff = _span(stage, s)
    col = "minute" if table == "usage" else "ts_ns"
    sids: set[int] = set()
    for index, where in finer:
        sids.update(sid for (sid,) in db.execute(f"SELECT DISTINCT subscriber_id FROM {table}{db.index_hint(index)}"
                                                 f" WHERE {where} AND {col} >= ? AND {col} < ?", (start, cutoff)))
    return sorted(sids)


def _units(db, stage: str, sids, s: RollupSummary):
    """(stage, subscriber, start, end) of each bucket with rows to roll, in order; read lazily, so each is
    looked for in the transaction that rolls the one before."""
    table, level, finer, unit = _FINER[stage]
    start, cutoff = _span(stage, s)
    col = "minute" if table == "usage" else "ts_ns"
    for sid in sids:
        pos = start
        while True:
            first = None
            for index, where in finer:
                (m,) = db.execute(f"SELECT min({col}) FROM {table}{db.index_hint(index)} WHERE {where}"
                                  f" AND subscriber_id = ?"
                                  f" AND {col} >= ? AND {col} < ?", (sid, pos, cutoff)).fetchone()
                if m is not None and (first is None or m < first):
                    first = m
            if first is None:
                break
            b0, b1 = bucket(first // unit, s.timezone, level)
            yield stage, sid, b0, b1
            pos = b1 * unit


def _batched(ledger, units, batch_rows: int, progress) -> tuple[int, int, int]:
    """Roll the buckets of ``units``, about ``batch_rows`` rows a transaction; returns the transactions,
    the rows replaced and the rows written (committed ones only)."""
    transactions = replaced = written = 0
    unit = next(units, None)
    while unit is not None:
        with ledger.transaction():
            touched = wrote = 0
            while unit is not None and touched < batch_rows:
                t, w = _roll(ledger.db, *unit)
                touched, wrote = touched + t, wrote + w
                if progress is not None:
                    progress(*unit)
                unit = next(units, None)
        transactions += 1
        replaced, written = replaced + touched, written + wrote
    return transactions, replaced, written


def _roll(db, stage: str, sid: int, b0: int, b1: int) -> int:
    """Replace the finer rows of one subscriber's bucket ``[b0, b1)`` by one row per key (inside the caller's
    transaction); returns the rows replaced and the rows written (a row added into is not one)."""
    table, _level, finer, unit = _FINER[stage]
    lo, hi, span = b0 * unit, b1 * unit, (b1 - b0) * unit
    touched = written = 0
    if table == "usage":
        sums: dict[tuple[int, int], list[int]] = {}
        for index, where in finer:
            # the rows summed are the rows deleted, in one statement: a flush may add into one of them or write
            # another between two statements (on PostgreSQL flushes do not wait for the rollup)
            rows = db.execute(f"DELETE FROM usage{db.index_hint(index)} WHERE {where}"
                              " AND subscriber_id = ? AND minute >= ? AND minute < ?"
                              " RETURNING zone, direction, minute + span, bytes, packets, amount", (sid, lo, hi)).fetchall()
            for z, d, end, nbytes, packets, amount in rows:
                if end > hi:  # a bucket of other bounds: never written by this module in one time zone
                    raise LedgerError(f"usage of subscriber {sid} at {end} crosses the bucket {b0}..{b1}: "
                                      "rolled up in another time zone?")
                acc = sums.setdefault((z, d), [0, 0, 0])
                acc[0] += nbytes
                acc[1] += packets
                acc[2] += amount
            touched += len(rows)
        # a coarse row of this bucket already there (a late flush rolled since): added into
        for (z, d), (nbytes, packets, amount) in sorted(sums.items()):
            prior = db.execute("SELECT span, bytes, packets, amount FROM usage WHERE subscriber_id = ? AND zone = ?"
                               " AND direction = ? AND minute = ?", (sid, z, d, lo)).fetchone()
            if prior is not None and prior[0] != span:
                raise LedgerError(f"usage of subscriber {sid} at {lo} spans {prior[0]} s, not the {span} s of its "
                                  "bucket: rolled up in another time zone?")
            _fits(db, f"usage of subscriber {sid} (zone {z}, direction {d})", b0, b1, nbytes, packets, amount,
                  *(() if prior is None else (nbytes + prior[1], packets + prior[2], amount + prior[3])))
            written += prior is None
            db.execute("INSERT INTO usage (subscriber_id, zone, direction, minute, span, bytes, packets, amount)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (subscriber_id, zone, direction, minute)"
                       " DO UPDATE SET bytes = usage.bytes + excluded.bytes, packets = usage.packets + excluded.packets,"
                       " amount = usage.amount + excluded.amount", (sid, z, d, lo, span, nbytes, packets, amount))
    else:
        amount = flushes = 0
        for index, where in finer:
            rows = db.execute(f"DELETE FROM charges{db.index_hint(index)} WHERE {where}"
                              " AND subscriber_id = ? AND ts_ns >= ? AND ts_ns < ?"
                              " RETURNING ts_ns + span_ns, amount, flush_count", (sid, lo, hi)).fetchall()
            for end, a, n in rows:
                if end > hi:
                    raise LedgerError(f"a charge of subscriber {sid} ending at {end} ns crosses the bucket "
                                      f"{b0}..{b1}: rolled up in another time zone?")
                amount += a
                flushes += n
            touched += len(rows)
        prior = db.execute("SELECT id, amount, flush_count FROM charges WHERE subscriber_id = ? AND span_ns = ?"
                           " AND ts_ns = ?", (sid, span, lo)).fetchone()
        _fits(db, f"charges of subscriber {sid}", b0, b1, amount, flushes,
              *(() if prior is None else (amount + prior[1], flushes + prior[2])))
        if prior is not None:
            db.execute("UPDATE charges SET amount = amount + ?, flush_count = flush_count + ? WHERE id = ?",
                       (amount, flushes, prior[0]))
        elif flushes:
            db.execute("INSERT INTO charges (subscriber_id, flush_id, amount, ts_ns, span_ns, flush_count)"
                       " VALUES (?, NULL, ?, ?, ?, ?)", (sid, amount, lo, span, flushes))
            written += 1
    return touched, written


def _fits(db, what: str, b0: int, b1: int, *sums: int) -> None:
    """Refuse to write a rolled row whose sums a column cannot hold: SQLite would turn ``a + b`` past 2^63-1
    into an inexact float and PostgreSQL refuse it; a bucket that big stays as its finer rows (the caller's
    transaction rolls back)."""
    if not all(-db.INT_MAX - 1 <= v <= db.INT_MAX for v in sums):
        raise LedgerError(f"{what} in the bucket {b0}..{b1} add up to more than a row holds (2^63-1): "
                          "not rolled up, its rows are kept as they are")


def _prune_flushes(ledger, before: int, batch_rows: int, progress) -> tuple[int, int]:
    """Delete flushes written before ``before`` (epoch seconds) that the rule of the module doc lets go;
    returns (pruned, transactions)."""
    db = ledger.db
    pruned = transactions = 0
    last = ""
    while True:
        with ledger.transaction():
            rows = db.execute(
                "SELECT f.id FROM flushes f WHERE f.id > ? AND f.ts_ns < ?"
                " AND NOT EXISTS (SELECT 1 FROM charges c WHERE c.flush_id = f.id)"
                " AND NOT EXISTS (SELECT 1 FROM ingested_files i WHERE i.flush_id = f.id)"
                " ORDER BY f.id LIMIT ?", (last, before * NS, batch_rows)).fetchall()
            marks: dict[str, int] = {}
            gone = []
            for (fid,) in rows:
                m = ENGINE_ID.fullmatch(fid)
                if m:
                    marks[m.group(1)] = max(marks.get(m.group(1), 0), int(m.group(2)))
                    gone.append((fid,))
            db.executemany("DELETE FROM flushes WHERE id = ?", gone)
            db.executemany("INSERT INTO flush_watermarks (boot, pruned_seq) VALUES (?, ?) ON CONFLICT (boot)"
                           f" DO UPDATE SET pruned_seq = {db.GREATEST}(flush_watermarks.pruned_seq, excluded.pruned_seq)",
                           sorted(marks.items()))
            if gone and progress is not None:
                progress("flushes", None, len(gone), 0)
        transactions += 1
        pruned += len(gone)
        if len(rows) < batch_rows:
            return pruned, transactions
        last = rows[-1][0]


def main(db_path, timezone: str, now_ns: int | None = None, **windows) -> RollupSummary:
    """What ``tollgate ledger rollup`` runs: open the ledger at ``db_path``, roll it up as of ``now_ns``
    (default now) in ``timezone`` (the config's), return the summary (``.text()`` for the command line)."""
    from .ledger import Ledger

    with Ledger.open(db_path) as ledger:
        return roll_up(ledger, time.time_ns() if now_ns is None else now_ns, timezone, **windows)


def summary_dict(s: RollupSummary) -> dict:
    return asdict(s)
