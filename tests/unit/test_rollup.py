"""Rollups (accounting/rollup.py, issue 12) against a real ledger, SQLite and PostgreSQL (``[sqlite]``,
``[pg]``: tests/conftest.py's ledger_target).

Twelve days of flushes of two subscribers (three zones, both directions,
random sizes) in a zone with a DST change (Europe/Berlin, 29 March 2026) and
in one with a :30 offset and a DST change (Australia/Adelaide, 5 April 2026),
rolled up twice as the daemon would. Every total is computed here from the
rows as they were generated, never read back from the ledger, and the
invoices and usage answers of every day are required equal to the byte and
the nano-unit before and after.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import os
import random
import sqlite3
import threading
from zoneinfo import ZoneInfo

import psycopg
import pytest

from accounting import rollup
from accounting.invoice import build_invoice
from accounting.ledger import Ledger, LedgerError

NS = 10 ** 9
PRICE = {0: 0, 1: 7, 2: 3}  # nano-units per byte by zone: zone 0 free (no charge row for it alone)
STEP = 600  # a flush every ten simulated minutes (a gateway flushes every second: same rows, fewer of them)
TZS = ("Europe/Berlin", "Australia/Adelaide")


def local(tzname: str, text: str) -> int:
    """Epoch seconds of a local wall time (fold 0)."""
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tzname)).timestamp())


def day_of(tzname: str, t: int) -> dt.date:
    return dt.datetime.fromtimestamp(t, ZoneInfo(tzname)).date()


class World:
    """A ledger and what was put into it, kept independently of it."""

    def __init__(self, target: str, tzname: str) -> None:
        self.tz = tzname
        self.target = target
        self.led = Ledger.open(target)
        self.a = self.led.add_subscriber("alice", "t", "EUR", opening_balance=10 ** 15)
        self.b = self.led.add_subscriber("bob", "t", "EUR", opening_balance=10 ** 15)
        self.usage: dict[tuple, list[int]] = {}  # (sid, zone, direction, local day) -> [bytes, packets, amount]
        self.minutes: dict[int, list[int]] = {}  # minute -> [bytes, packets, amount] of everyone
        self.charged: dict[tuple, int] = {}  # (sid, local day of the flush) -> amount
        self.flushes = 0
        self.boot = "gw1"
        self.charge_rows = 0
        self.rng = random.Random(f"rollup-{tzname}")
        self.ids: list[tuple[str, int]] = []  # (flush id, ts in seconds)

    def flush(self, t: int) -> None:
        rows = []
        minute = t - t % 60
        for sid in (self.a, self.b):
            for zone in (0, 1, 2):
                for direction in (0, 1):
                    if self.rng.random() < 0.4:
                        continue
                    nbytes = self.rng.randrange(40, 3_000_000)
                    packets = self.rng.randrange(1, nbytes // 40 + 1)
                    rows.append((sid, zone, direction, minute, nbytes, packets, nbytes * PRICE[zone]))
        self.flushes += 1
        fid = f"{self.boot}:{self.flushes}"
        assert self.led.apply_flush(fid, rows, t * NS + self.rng.randrange(NS))
        self.ids.append((fid, t))
        self.charge_rows += len({r[0] for r in rows if r[6]})  # one charge per subscriber charged by the flush
        for sid, zone, direction, m, nbytes, packets, amount in rows:
            acc = self.usage.setdefault((sid, zone, direction, day_of(self.tz, m)), [0, 0, 0])
            acc[0] += nbytes
            acc[1] += packets
            acc[2] += amount
            acc = self.minutes.setdefault(m, [0, 0, 0])
            acc[0] += nbytes
            acc[1] += packets
            acc[2] += amount
            self.charged[(sid, day_of(self.tz, t))] = self.charged.get((sid, day_of(self.tz, t)), 0) + amount

    def run(self, start: int, end: int) -> None:
        for t in range(start, end, STEP):
            self.flush(t + self.rng.randrange(STEP))

    # ---- what the readers say ----

    def days(self) -> list[dt.date]:
        return sorted({k[3] for k in self.usage})

    def day_start(self, day: dt.date) -> int:
        return local(self.tz, day.isoformat() + "T00:00")

    def by_day(self) -> dict:
        """Usage per subscriber, zone, direction and local day as the portal reads it: rows by bucket start."""
        out: dict[tuple, list[int]] = {}
        for r in self.led.usage(group_by=("subscriber_id", "zone", "direction", "minute")):
            acc = out.setdefault((r["subscriber_id"], r["zone"], r["direction"], day_of(self.tz, r["minute"])),
                                 [0, 0, 0])
            acc[0] += r["bytes"]
            acc[1] += r["packets"]
            acc[2] += r["amount"]
        return out

    def charges_by_day(self) -> dict:
        out: dict[tuple, int] = {}
        for day in self.days():
            since, until = self.day_start(day) * NS, self.day_start(day + dt.timedelta(days=1)) * NS
            for c in self.led.charges(since=since, until=until):
                out[(c["subscriber_id"], day)] = out.get((c["subscriber_id"], day), 0) + c["amount"]
        return out

    def answers(self) -> dict:
        """Everything a reader can ask with aligned ranges: per day and per period, invoices included."""
        led, days = self.led, self.days()
        out = {"by_day": self.by_day(), "charges_by_day": self.charges_by_day(),
               "total": led.usage(group_by=("subscriber_id", "zone", "direction")),
               "balances": [led.balance(s) for s in (self.a, self.b)]}
        for day in days:
            since, until = self.day_start(day), self.day_start(day + dt.timedelta(days=1))
            out[("day", day)] = led.usage(since=since, until=until)
            for sid in (self.a, self.b):
                out[("invoice", sid, day)] = build_invoice(led, sid, since * NS, until * NS, self.tz)
        # a "period" of a week and the whole time, as invoices ask them (local midnights)
        week = self.day_start(days[0] + dt.timedelta(days=7))
        for sid in (self.a, self.b):
            out[("invoice", sid, "week")] = build_invoice(led, sid, self.day_start(days[0]) * NS, week * NS, self.tz)
            out[("invoice", sid, "all")] = build_invoice(led, sid, self.day_start(days[0]) * NS,
                                                         self.day_start(days[-1] + dt.timedelta(days=1)) * NS, self.tz)
        return out


def dump(led: Ledger) -> dict:
    """The rows rollups touch, without charge ids (which number inserts)."""
    q = {"usage": "SELECT * FROM usage ORDER BY 1, 2, 3, 4",
         "charges": "SELECT subscriber_id, flush_id, amount, ts_ns, span_ns, flush_count FROM charges"
                    " ORDER BY 1, 4, 5, 2",
         "flushes": "SELECT * FROM flushes ORDER BY id", "marks": "SELECT * FROM flush_watermarks ORDER BY boot",
         "state": "SELECT * FROM rollup_state", "balances": "SELECT id, balance FROM subscribers ORDER BY id"}
    return {k: led.db.execute(v).fetchall() for k, v in q.items()}


START = "2026-03-26T00:00"
MIDDLE = "2026-03-31T12:00"  # a rollup here: Berlin's short day in the hourly window
END = "2026-04-07T12:00"  # and here: Adelaide's long day in the hourly window, Berlin's in the daily one
WINDOWS = {"minute_window": 6 * 3600, "hour_window": 3 * 86400, "flush_horizon": 3600}


def build_world(target: str, tzname: str) -> World:
    w = World(target, tzname)
    w.run(local(tzname, START), local(tzname, MIDDLE))
    # late at night the gateway restarts: a new boot, seqs from 1 again
    w.boot, w.flushes = "gw2", 0
    w.mid = rollup.roll_up(w.led, local(tzname, MIDDLE) * NS, tzname, **WINDOWS)
    assert w.led.check_invariants() == []
    w.run(local(tzname, MIDDLE), local(tzname, END) - 3600)
    # the last hour flushes every minute, as (by the minute) a live gateway's recent usage is
    for t in range(local(tzname, END) - 3600, local(tzname, END), 60):
        w.flush(t + 1)
    return w


@pytest.fixture(scope="module")
def built_worlds(tmp_path_factory):
    """Each (backend, time zone) world is built once per module (~1,800 flushes: seconds, most of this file's time)
    and kept closed, as a SQLite file or a PostgreSQL database; every test gets a copy of it (the file's pages, or
    ``CREATE DATABASE ... TEMPLATE``) and a deep copy of what was put into it. The flushes are the same ones (the
    generator is seeded by the time zone), so each test starts from the very ledger and bookkeeping it built itself
    before, and changes only its own copy."""
    made: dict[tuple[str, str], tuple[str, dict]] = {}
    pg = []
    yield made, pg, tmp_path_factory.mktemp("worlds")
    if pg:
        cluster, names = pg[0], pg[1:]
        if cluster.running:
            with psycopg.connect(cluster.conninfo, autocommit=True) as conn:
                for name in names:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_copies = itertools.count(1)


@pytest.fixture(params=TZS)
def world(request, ledger_target, built_worlds):
    tzname = request.param
    backend = request.node.callspec.params["ledger_target"]
    made, pg, folder = built_worlds
    key = (backend, tzname)
    tag = "berlin" if tzname == "Europe/Berlin" else "adelaide"
    if key not in made:
        if backend == "sqlite":
            target = str(folder / f"{tag}.db")
        else:
            cluster = request.getfixturevalue("pg_cluster")
            name = f"rollup_{os.getpid()}_{tag}"
            pg[:] = pg or [cluster]
            pg.append(name)
            target = cluster.create_database(name, template=request.getfixturevalue("pg_ledger_template"))
        w = build_world(target, tzname)
        w.led.close()  # no connection may stay on a template
        state = {k: v for k, v in vars(w).items() if k not in ("led", "target")}
        made[key] = (target, state)
    source, state = made[key]
    if backend == "sqlite":
        target = str(request.getfixturevalue("tmp_path") / "world.db")
        with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
            src.backup(dst)
        src.close()
        dst.close()
        copy_name = None
    else:
        cluster = pg[0]
        copy_name = f"rollup_{os.getpid()}_{tag}_{next(_copies)}"
        target = cluster.create_database(copy_name, template=psycopg.conninfo.conninfo_to_dict(source)["dbname"])
    w = World.__new__(World)
    vars(w).update(copy.deepcopy(state))
    w.target = target
    w.led = Ledger.open(target)
    yield w
    w.led.close()
    if copy_name and pg[0].running:
        with psycopg.connect(pg[0].conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{copy_name}" WITH (FORCE)')


def test_buckets_by_hand():
    # Berlin, 29 March 2026: 02:00 CET becomes 03:00 CEST, a day of 23 hours, from 23:00 UTC the day before
    start = int(dt.datetime(2026, 3, 28, 23, tzinfo=dt.timezone.utc).timestamp())
    assert rollup.day_bounds(start + 5, "Europe/Berlin") == (start, start + 23 * 3600)
    assert rollup.hour_bounds(start + 2 * 3600 + 60, "Europe/Berlin") == (start + 2 * 3600, start + 3 * 3600)
    # Adelaide is +10:30 in summer: local hours start at half past a UTC hour; 14:00 local on 1 April is 03:30 UTC
    t = int(dt.datetime(2026, 4, 1, 3, 30, tzinfo=dt.timezone.utc).timestamp())
    assert rollup.hour_bounds(t + 1799, "Australia/Adelaide") == (t, t + 3600)
    # 5 April 03:00 ACDT becomes 02:00 ACST: a day of 25 hours, from 13:30 UTC the day before
    start = int(dt.datetime(2026, 4, 4, 13, 30, tzinfo=dt.timezone.utc).timestamp())
    assert rollup.day_bounds(start + 80000, "Australia/Adelaide") == (start, start + 25 * 3600)
    # Kathmandu is +5:45: its day starts at 18:15 UTC
    start = int(dt.datetime(2026, 4, 4, 18, 15, tzinfo=dt.timezone.utc).timestamp())
    assert rollup.day_bounds(start, "Asia/Kathmandu") == (start, start + 86400)
    assert rollup.hour_bounds(start + 3600 + 1, "Asia/Kathmandu") == (start + 3600, start + 7200)


def test_rollup_keeps_every_answer(world):
    w = world
    assert w.mid.usage_rows_replaced > w.mid.usage_rows_written > 0  # the first rollup did something
    # the readers agree with what was generated, before the last rollup
    assert w.by_day() == w.usage
    assert w.charges_by_day() == w.charged
    before = w.answers()
    rows_before = dump(w.led)
    s = rollup.roll_up(w.led, local(w.tz, END) * NS, w.tz, **WINDOWS)
    assert w.led.check_invariants() == []
    assert s.usage_rows_replaced > s.usage_rows_written > 0 and s.charge_rows_replaced > s.charge_rows_written > 0
    assert (len(rows_before["usage"]) - s.usage_rows_replaced + s.usage_rows_written,
            len(rows_before["charges"]) - s.charge_rows_replaced + s.charge_rows_written) == (
        len(dump(w.led)["usage"]), len(dump(w.led)["charges"]))
    after = w.answers()
    assert after == before
    assert after["by_day"] == w.usage and after["charges_by_day"] == w.charged
    # the shape: days before the day cutoff, hours before the hour cutoff, minutes after
    spans = w.led.db.execute("SELECT minute, span FROM usage").fetchall()
    assert all(span > rollup.HOUR_MAX for m, span in spans if m < s.day_cutoff)
    assert all(60 < span <= rollup.HOUR_MAX for m, span in spans if s.day_cutoff <= m < s.hour_cutoff)
    assert all(span == 60 for m, span in spans if m >= s.hour_cutoff)
    assert {span for m, span in spans if m < s.day_cutoff} >= {86400}
    if w.tz == "Europe/Berlin":  # the short day of 29 March is a daily bucket of 23 hours
        assert 23 * 3600 in {span for m, span in spans if m < s.day_cutoff}
    else:  # the long day of 5 April is in the hourly window: 25 local hours; and local hours start at :30 UTC
        d0, d1 = local(w.tz, "2026-04-05T00:00"), local(w.tz, "2026-04-06T00:00")
        assert d1 - d0 == 25 * 3600
        hours = {(m, span) for m, span in spans if d0 <= m < d1}
        assert len(hours) == 25 and sum(span for _m, span in hours) == 25 * 3600
        assert {m % 3600 for m, span in spans if m < s.hour_cutoff} == {1800}
    charges = w.led.charges()
    assert all(c["flush_id"] is None and c["span_ns"] > 0 for c in charges if c["ts_ns"] < s.hour_cutoff * NS)
    assert sum(c["flush_count"] for c in charges) == w.charge_rows  # every flush's charge is counted
    # the file holds a few rows per subscriber-day where it held one per flush
    assert len(dump(w.led)["charges"]) < len(rows_before["charges"]) / 5


def test_replayed_flush_ids_change_nothing(world):
    w = world
    rollup.roll_up(w.led, local(w.tz, END) * NS, w.tz, **WINDOWS)
    oldest, _t = w.ids[0]
    assert w.led.db.execute("SELECT 1 FROM flushes WHERE id = ?", (oldest,)).fetchone() is None  # pruned
    assert w.led.has_flush(oldest)
    recent, _t = w.ids[-1]
    state = dump(w.led)
    late = [(w.a, 1, 0, local(w.tz, START) + 3 * 3600 + 420, 10 ** 6, 1000, 7 * 10 ** 6)]  # inside a rolled day
    for fid in (oldest, w.ids[len(w.ids) // 2][0], recent):
        assert w.led.apply_flush(fid, late, local(w.tz, END) * NS) is False
    assert dump(w.led) == state
    # an id the gateway never sent is no replay, even far below a watermark of another boot
    assert not w.led.has_flush("gw3:1") and not w.led.has_flush(f"gw2:{w.flushes + 1}")
    # a flush with old traffic (a late file, a replay) is charged, lands in its day, and is rolled again
    assert w.led.apply_flush("replay:abc:1", late, local(w.tz, END) * NS) is True
    assert w.by_day()[(w.a, 1, 0, day_of(w.tz, local(w.tz, START)))] == [
        x + y for x, y in zip(w.usage[(w.a, 1, 0, day_of(w.tz, local(w.tz, START)))], (10 ** 6, 1000, 7 * 10 ** 6))]
    assert w.led.check_invariants() == []
    rollup.roll_up(w.led, local(w.tz, END) * NS, w.tz, **WINDOWS)
    rows = w.led.db.execute("SELECT minute, span FROM usage WHERE subscriber_id = ? AND zone = 1 AND direction = 0"
                            " AND minute >= ? AND minute < ?", (w.a, local(w.tz, START), local(w.tz, START) + 86400))
    assert rows.fetchall() == [(local(w.tz, START), 86400)]  # folded into its day
    assert w.by_day()[(w.a, 1, 0, day_of(w.tz, local(w.tz, START)))] == [
        x + y for x, y in zip(w.usage[(w.a, 1, 0, day_of(w.tz, local(w.tz, START)))], (10 ** 6, 1000, 7 * 10 ** 6))]
    assert w.led.has_flush("replay:abc:1")  # not of the daemon's form: never pruned
    assert w.led.check_invariants() == []


def test_rollup_twice_is_once(world):
    w = world
    now = local(w.tz, END) * NS
    rollup.roll_up(w.led, now, w.tz, **WINDOWS)
    once = dump(w.led)
    s = rollup.roll_up(w.led, now, w.tz, **WINDOWS)
    assert dump(w.led) == once
    assert (s.usage_rows_replaced, s.charge_rows_replaced, s.flushes_pruned) == (0, 0, 0)


@pytest.fixture
def copy_ledger(request, tmp_path):
    """A callable: ``copy_ledger(world)`` -> the target of a copy of the world's ledger as it is now."""
    made = []

    def copy(w: World) -> str:
        if w.led.db.dialect == "sqlite":  # sqlite3's online backup, page by page
            target = str(tmp_path / "copy.db")
            with sqlite3.connect(target) as dst:
                w.led.db.conn.backup(dst)
            return target
        # PostgreSQL copies a database as the template of a new one, with no connection to it meanwhile
        cluster = request.getfixturevalue("pg_cluster")
        name = f"{psycopg.conninfo.conninfo_to_dict(w.target)['dbname']}_copy"
        w.led.close()
        made.append(name)
        target = cluster.create_database(name, template=psycopg.conninfo.conninfo_to_dict(w.target)["dbname"])
        w.led = Ledger.open(w.target)
        return target

    yield copy
    if made:
        cluster = request.getfixturevalue("pg_cluster")
        with psycopg.connect(cluster.conninfo, autocommit=True) as conn:
            for name in made:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("fail_at", [1, 40, 333])
def test_interrupted_rollup_leaves_a_consistent_ledger(world, copy_ledger, fail_at):
    w = world
    now = local(w.tz, END) * NS
    before = w.answers()
    copy = copy_ledger(w)
    seen = []

    def progress(*unit):
        seen.append(unit)
        if len(seen) == fail_at:
            raise KeyboardInterrupt  # what a Ctrl-C or a dying daemon does mid-transaction

    with pytest.raises(KeyboardInterrupt):
        rollup.roll_up(w.led, now, w.tz, batch_rows=200, progress=progress, **WINDOWS)
    assert w.led.check_invariants() == []
    assert w.answers() == before
    rollup.roll_up(w.led, now, w.tz, batch_rows=200, **WINDOWS)  # finishing it is doing it at once
    with Ledger.open(copy) as ref:
        rollup.roll_up(ref, now, w.tz, **WINDOWS)
        assert dump(w.led) == dump(ref)
    assert w.answers() == before


def test_a_range_inside_a_rolled_bucket_is_refused(world):
    w = world
    s = rollup.roll_up(w.led, local(w.tz, END) * NS, w.tz, **WINDOWS)
    day = day_of(w.tz, s.day_cutoff) - dt.timedelta(days=2)
    d0, d1 = w.day_start(day), w.day_start(day + dt.timedelta(days=1))
    with pytest.raises(LedgerError, match="inside the day .* ask from or until"):
        w.led.usage(since=d0 + 3600)
    with pytest.raises(LedgerError, match="inside the day"):
        w.led.charges(until=d1 * NS - 1)
    assert w.led.exact_range(d0 + 3600, d1 - 60) == (d0, d1)
    # in the hourly window an hour is a bound; a minute inside it is not
    h0 = rollup.hour_bounds(s.hour_cutoff - 5 * 3600, w.tz)[0]
    want = [sum(v[i] for m, v in w.minutes.items() if h0 <= m < s.hour_cutoff) for i in range(3)]
    assert want[0] > 0
    assert w.led.usage(since=h0, until=s.hour_cutoff, group_by=()) == [dict(zip(("bytes", "packets", "amount"), want))]
    with pytest.raises(LedgerError, match="inside the hour"):
        w.led.usage(since=h0 + 600)
    assert w.led.exact_range(h0 + 600, None) == (h0, None)
    # recent minutes: any bound, counted by the minute's start as always
    t = s.hour_cutoff + 3 * 3600 + 17
    assert w.led.usage(since=t, group_by=()) == w.led.usage(since=t - 17 + 60, group_by=())
    # a rollup in another time zone would cut the buckets: refused, nothing changed
    other = "Asia/Kolkata"
    with pytest.raises(LedgerError, match="rolled up by the local days of"):
        rollup.roll_up(w.led, local(w.tz, END) * NS, other, **WINDOWS)


def test_checks_find_a_bucket_that_is_no_local_day(world):
    w = world
    rollup.roll_up(w.led, local(w.tz, END) * NS, w.tz, **WINDOWS)
    assert w.led.check_invariants() == []
    w.led.db.execute("UPDATE usage SET span = span - 3600 WHERE (subscriber_id, zone, direction, minute) IN"
                     " (SELECT subscriber_id, zone, direction, minute FROM usage WHERE span > 7200 LIMIT 1)")
    problems = w.led.check_invariants()
    assert any("is not a local day" in p for p in problems), problems


def test_main_is_what_the_command_line_runs(world):
    w = world
    w.led.close()
    path = w.target
    s = rollup.main(path, w.tz, now_ns=local(w.tz, END) * NS, **WINDOWS)
    assert s.usage_rows_replaced > s.usage_rows_written and s.flushes_pruned > 0
    assert s.text().startswith(f"rolled up ({w.tz}): usage rows {s.usage_rows_replaced} -> {s.usage_rows_written}")
    w.led = Ledger.open(path)
    assert w.by_day() == w.usage and w.charges_by_day() == w.charged
    with pytest.raises(LedgerError, match="minute window"):
        rollup.main(path, w.tz, minute_window=60)
    with pytest.raises(LedgerError, match="unknown time zone"):
        rollup.main(path, "Mars/Olympus")


def test_a_flush_landing_in_a_bucket_being_rolled_is_counted(ledger_target, monkeypatch):
    """On PostgreSQL flushes do not wait for a rollup (Ledger.apply_flush runs beside other writers), so a late
    flush may land in the bucket being rolled between two statements of the rollup. Here one does, from another
    connection, before every statement of the rollup that reads one-minute usage rows: each byte is in the
    ledger once after (the rows summed are the rows deleted, by one statement)."""
    target = ledger_target()
    with Ledger.open(target) as led, Ledger.open(target) as other:
        if led.db.dialect == "sqlite":
            pytest.skip("SQLite has one writer at a time: no flush commits inside the rollup's transaction")
        a = led.add_subscriber("a", "t", "EUR")
        day = 1_700_000_000 // 86400 * 86400
        led.apply_flush("f0", [(a, 1, 0, day + 60 * m, 100, 1, 0) for m in range(3)], day * NS)
        late = []  # minutes of the same day no row holds yet: a flush into them waits for nobody
        execute = led.db.execute

        def racing(sql, params=()):
            if "span = 60" in sql:
                minute = day + 60 * (3 + len(late))
                flush = threading.Thread(target=other.apply_flush,
                                         args=(f"late{len(late)}", [(a, 1, 0, minute, 1, 1, 0)], day * NS))
                flush.start()
                flush.join(10)
                assert not flush.is_alive(), "a flush waited for the rollup"
                late.append(minute)
            return execute(sql, params)

        monkeypatch.setattr(led.db, "execute", racing)
        s = rollup.roll_up(led, (day + 40 * 86400) * NS, "UTC")
        monkeypatch.undo()
        assert s.usage_rows_replaced >= 3 and len(late) >= 3
        assert led.usage(group_by=()) == [{"bytes": 300 + len(late), "packets": 3 + len(late), "amount": 0}]
        assert led.check_invariants() == []


def test_a_late_flush_between_the_day_and_the_hour_stage(ledger_target, monkeypatch):
    """Between two stages of a rollup a flush may commit on either backend (each stage is transactions of its own),
    here one into the first hour of a day the day stage has just rolled: the hour stage leaves it to the next run's
    day stage (that hour's row would have the key of the day's row), and nothing is lost."""
    with Ledger.open(ledger_target()) as led:
        a = led.add_subscriber("a", "t", "EUR")
        day = 1_700_000_000 // 86400 * 86400
        led.apply_flush("f0", [(a, 1, 0, day + 600, 100, 1, 0)], day * NS)
        with_rows = rollup._with_rows

        def flush_first(db, stage, s):
            if stage == "usage-hour":
                led.apply_flush("late", [(a, 1, 0, day + 60, 5, 1, 0)], day * NS)
            return with_rows(db, stage, s)

        monkeypatch.setattr(rollup, "_with_rows", flush_first)
        now = (day + 40 * 86400) * NS
        rollup.roll_up(led, now, "UTC")
        monkeypatch.undo()
        assert led.usage(group_by=("minute",)) == [{"minute": day, "span": 86400, "bytes": 100, "packets": 1,
                                                    "amount": 0},
                                                   {"minute": day + 60, "span": 60, "bytes": 5, "packets": 1, "amount": 0}]
        assert led.check_invariants() == []
        rollup.roll_up(led, now, "UTC")  # the next run folds it into its day
        assert led.usage(group_by=("minute",)) == [{"minute": day, "span": 86400, "bytes": 105, "packets": 2,
                                                    "amount": 0}]
