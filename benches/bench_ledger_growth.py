"""Ledger growth per active subscriber-day, before and after rollups (issue 12).

N active subscribers flush into a real ledger (``Ledger.apply_flush``, the
gateway's own write path, synthetic timestamps) for one simulated local day;
each flush holds, per subscriber, a few of its (zone, direction) pairs. Then
the ledger is rolled up as the daemon would over the following days
(``accounting.rollup.roll_up``): first into local hours, then into local days
with the day's flushes pruned. After each stage the bench prints the file size
after ``VACUUM INTO`` a copy and dbstat's bytes per table and index, less
the same for the ledger holding only the subscribers, per active
subscriber-day.

The gateway flushes every second; simulating that for 1,000 subscribers
writes 86.4 million charge rows, so the default simulates a flush every
``--interval`` seconds (60; some 10 minutes on a shared 2-vCPU VM). Usage rows (one per subscriber, zone, direction
and minute) do not depend on the interval; charges and flushes do, in
proportion: the "at 1 s flushes" line scales their measured bytes by the
interval. After rollups nothing depends on it.

    .venv/bin/python benches/bench_ledger_growth.py [--subscribers 1000] [--interval 60] [--cache-mib 128]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accounting import rollup  # noqa: E402
from accounting.ledger import Ledger  # noqa: E402

NS = 10 ** 9
PAIRS = [(z, d) for z in range(3) for d in (0, 1)]
PER_FLUSH = ("charges", "charges_subscriber", "charges_flush", "flushes", "sqlite_autoindex_flushes_1")


def sizes(path: Path) -> tuple[int, dict[str, int]]:
    """(bytes of a VACUUMed copy, {table or index: bytes of its pages} from dbstat, or {} without dbstat)."""
    copy = path.with_suffix(".vacuumed")
    if copy.exists():
        copy.unlink()
    con = sqlite3.connect(path)
    con.execute("VACUUM INTO ?", (str(copy),))
    con.close()
    size = copy.stat().st_size
    con = sqlite3.connect(copy)
    try:
        pages = dict(con.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"))
    except sqlite3.OperationalError:  # SQLite built without SQLITE_ENABLE_DBSTAT_VTAB
        pages = {}
    con.close()
    copy.unlink()
    return size, pages


def report(stage: str, path: Path, base: tuple[int, dict], n: int, interval: int | None) -> None:
    size, pages = sizes(path)
    net = size - base[0]
    print(f"{stage:<34} file {size / 2 ** 20:9.1f} MiB   {net / n / 1024:9.2f} KiB per active subscriber-day")
    if pages:
        grown = {k: v - base[1].get(k, 0) for k, v in pages.items() if v - base[1].get(k, 0) > 0}
        top = sorted(grown.items(), key=lambda kv: -kv[1])[:6]
        print(" " * 36 + ", ".join(f"{k} {v / n:,.0f} B" for k, v in top))
        if interval:
            per_flush = sum(v for k, v in grown.items() if k in PER_FLUSH)
            at_1s = net - per_flush + per_flush * interval
            print(f"{'  the same at 1 s flushes (scaled)':<34} {'':14}   {at_1s / n / 1024:9.2f} KiB per active "
                  f"subscriber-day ({per_flush / n / 1024 * interval:.0f} KiB of it charges and flushes)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--interval", type=int, default=60, help="simulated seconds between flushes (the gateway: 1)")
    p.add_argument("--cache-mib", type=int, default=128, help="the rollup's SQLite page cache")
    p.add_argument("--timezone", default="Europe/Berlin")
    p.add_argument("--day", default="2026-03-10")
    p.add_argument("--keep", help="write the ledger here instead of a temporary directory")
    args = p.parse_args()
    n, tz = args.subscribers, args.timezone
    day = dt.date.fromisoformat(args.day)
    start = int(dt.datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(tz)).timestamp())
    nxt = day + dt.timedelta(days=1)
    end = int(dt.datetime(nxt.year, nxt.month, nxt.day, tzinfo=ZoneInfo(tz)).timestamp())
    folder = Path(args.keep or tempfile.mkdtemp(prefix="tollgate-growth-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ledger.db"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(str(path) + suffix):
            os.unlink(str(path) + suffix)
    led = Ledger.open(path)
    sids = [led.add_subscriber(f"s{i}", "t", "EUR", opening_balance=10 ** 18) for i in range(n)]
    led.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    base = sizes(path)
    print(f"{n} active subscribers, one flush every {args.interval} s for the local day {day} ({tz}), "
          f"{(end - start) // args.interval} flushes; ledger {path}")
    rng = random.Random(12)
    t0 = time.monotonic()
    seq = 0
    for t in range(start, end, args.interval):
        seq += 1
        minute = t - t % 60
        rows = []
        for sid in sids:
            for z, d in rng.sample(PAIRS, 3):  # a subscriber uses a few zones and directions at a time
                nbytes = rng.randrange(100, 200_000) * args.interval
                rows.append((sid, z, d, minute, nbytes, nbytes // 700 + 1, nbytes * (z + 1)))
        led.apply_flush(f"bench:{seq}", rows, t * NS)
    written = time.monotonic() - t0
    led.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    usage, charges = (led.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("usage", "charges"))
    print(f"written in {written:.0f} s: {usage} usage rows, {charges} charges, {seq} flushes")
    totals = led.db.execute("SELECT sum(bytes), sum(packets), sum(amount) FROM usage").fetchone()
    charged = led.db.execute("SELECT sum(amount) FROM charges").fetchone()[0]
    report("minutes (as written)", path, base, n, args.interval)

    # The daemon's rollups the next day: minute rows an hour old become hours ...
    t0 = time.monotonic()
    s = rollup.roll_up(led, (end + 3600) * NS, tz, minute_window=3600, hour_window=30 * 86400,
                       cache_mib=args.cache_mib)
    led.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    took = time.monotonic() - t0
    print(f"rolled into hours in {took:.1f} s, {took / (s.usage_rows_replaced + s.charge_rows_replaced) * 1e6:.1f} us"
          f" per row replaced: {s.text()}")
    report("hours", path, base, n, None)
    # ... and, past the hour window, days; the day's flushes are past any retry: pruned.
    t0 = time.monotonic()
    s = rollup.roll_up(led, (end + 31 * 86400) * NS, tz, minute_window=3600, hour_window=30 * 86400,
                       flush_horizon=3600, cache_mib=args.cache_mib)
    led.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(f"rolled into days in {time.monotonic() - t0:.1f} s: {s.text()}")
    report("days (what stays per day)", path, base, n, None)
    after = led.db.execute("SELECT sum(bytes), sum(packets), sum(amount) FROM usage").fetchone()
    after_charged = led.db.execute("SELECT sum(amount) FROM charges").fetchone()[0]
    exact = after == totals and after_charged == charged
    print(f"totals before and after: bytes {totals[0]} / {after[0]}, packets {totals[1]} / {after[1]}, "
          f"amount {totals[2]} / {after[2]}, charges {charged} / {after_charged}: {'equal' if exact else 'DIFFER'}")
    problems = led.check_invariants()
    print("ledger check:", "ok" if not problems else problems[:5])
    led.close()
    return 0 if exact and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
