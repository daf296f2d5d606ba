"""Credit grants in the ledger (schema 22), SQLite and PostgreSQL side by side in one run: reserves
per second and flush reports (``apply_flush(..., grants=True)``) per second.

* PostgreSQL: a throwaway cluster of its own (accounting/store/pgcluster.py: Unix socket, fsync off,
  synchronous_commit on), one database; SQLite: one ledger file in a temporary directory (WAL, as the
  daemon opens it). Each backend gets the same subscribers (``--subscribers``, a balance that never
  runs out) and the same calls.
* ``reserve``: ``Ledger.reserve({subscriber: asked}, valid_until)``: one transaction, per subscriber
  the conditional UPDATE of its row and the gateway's grant grown; 1 subscriber per call (a refill at
  the threshold) or 100 (a gateway's start, a burst of refills).
* ``flush report``: ``Ledger.apply_flush(id, rows, grants=True)``: the flush id inserted once, usage,
  charges, the balance and the gateway's grant charged; 1 subscriber per flush or 100 (a gateway's
  flush every second with 100 active subscribers).
* ``gateways``: that many threads at once, each its own connection and gateway name (on SQLite they
  queue on its one writer; on PostgreSQL they run beside each other, on different subscribers).
* ``bulk reserve`` (``--bulk``): a grant gateway's start, one ``reserve`` of every subscriber of a
  ledger of that many (1k and 100k by default), each call by a gateway of a new name (so each takes
  a grant anew); grants per second, the best of ``--repeat`` calls. ``bulk release``: its clean
  stop, ``release_grants()`` of them all.

    .venv/bin/python benches/bench_grants.py [--seconds 2] [--subscribers 1000] [--bulk 1000,100000]
                                             [--repeat 3] [--no-calls] [--markdown]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accounting.ledger import Ledger  # noqa: E402
from accounting.store.pgcluster import PgCluster  # noqa: E402

BALANCE = 10 ** 15
LATER = 2 * 10 ** 18
M = 60


def run(threads: int, seconds: float, make_op) -> tuple[int, float]:
    """``make_op(n)`` -> ``op(i)`` for thread n; calls in ``seconds``, and the time they took."""
    counts = [0] * threads
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)

    def work(n: int) -> None:
        try:
            op = make_op(n)
            start.wait()
            stop = time.monotonic() + seconds
            i = 0
            while time.monotonic() < stop:
                op(i)
                i += 1
            counts[n] = i
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            start.abort()

    ts = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for t in ts:
        t.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.monotonic()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts), time.monotonic() - t0


def bench_backend(target: str, subs: list[int], seconds: float, gateways: tuple[int, ...]) -> dict:
    """``{(operation, per call, gateways): (calls, seconds)}`` on one ledger."""
    out = {}
    flush_ids = itertools.count()
    ledgers: dict[str, Ledger] = {}

    def ledger(n: int) -> Ledger:  # one connection per gateway thread, opened before the clock starts
        led = ledgers.get(f"g{n}")
        if led is None:
            led = ledgers[f"g{n}"] = Ledger.open(target)
            led.gateway = f"g{n}"
        return led

    for threads in gateways:
        share = len(subs) // threads  # each gateway its own subscribers: no two threads on one row
        for per in (1, 100):
            def reserve(n: int, per=per, threads=threads):
                led, mine = ledger(n), subs[n * (len(subs) // threads):(n + 1) * (len(subs) // threads)]

                def op(i: int) -> None:
                    first = (i * per) % len(mine)
                    led.reserve({sid: 1000 for sid in (mine + mine)[first:first + per]}, LATER)
                return op

            def report(n: int, per=per, threads=threads):
                led, mine = ledger(n), subs[n * (len(subs) // threads):(n + 1) * (len(subs) // threads)]

                def op(i: int) -> None:
                    first = (i * per) % len(mine)
                    rows = [(sid, 0, 1, M, 1500, 2, 500) for sid in (mine + mine)[first:first + per]]
                    led.apply_flush(f"g{n}:{next(flush_ids)}", rows, i, grants=True)
                return op

            assert share >= per, "--subscribers too few for the gateways"
            out[("reserve", per, threads)] = run(threads, seconds, reserve)
            out[("flush report", per, threads)] = run(threads, seconds, report)
    for led in ledgers.values():
        led.release_grants()
    with Ledger.open(target) as led:
        problems = led.check_invariants()
        if problems:
            raise SystemExit(f"{target}: inconsistent after the bench: {problems[:3]}")
    for led in ledgers.values():
        led.close()
    return out


def seed(target: str, n: int) -> list[int]:
    """``n`` subscribers with a balance that never runs out, written in bulk (100k in seconds)."""
    now = time.time_ns()
    terms = (None,) * (len(Ledger.BULK_COLUMNS) - 10)
    with Ledger.open(target) as led:
        first = led.max_subscriber_id() + 1
        ids = list(range(first, first + n))
        with led.transaction(), led.bulk_cache(n):
            led.insert_subscribers([(i, f"s{i}", None, "t", "EUR", BALANCE, BALANCE, 0, 1, now, *terms) for i in ids], [])
    return ids


def bench_bulk(target: str, subs: list[int], repeat: int) -> tuple[int, float, float]:
    """A gateway's start and its clean stop: ``(grants, seconds, seconds)`` of the fastest of ``repeat``
    reserves of every subscriber in one call, each by a new gateway, and of the fastest release of them
    all (``release_grants()``)."""
    best, best_release = None, None
    with Ledger.open(target) as led:
        for k in range(repeat):
            led.gateway = f"bulk{k}"
            t0 = time.perf_counter()
            taken = led.reserve({sid: 1000 for sid in subs}, LATER)
            t1 = time.perf_counter()
            assert len(taken) == len(subs) and set(taken.values()) == {1000}, "a bulk reserve fell short"
            assert len(led.release_grants()) == len(subs)
            t2 = time.perf_counter()
            best = t1 - t0 if best is None else min(best, t1 - t0)
            best_release = t2 - t1 if best_release is None else min(best_release, t2 - t1)
        problems = led.check_invariants()
        if problems:
            raise SystemExit(f"{target}: inconsistent after the bulk bench: {problems[:3]}")
    return len(subs), best, best_release


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per row and backend")
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--gateways", default="1,3", help="comma-separated numbers of gateway threads")
    ap.add_argument("--bulk", default="1000,100000", help="comma-separated ledger sizes of the bulk reserve ('' none)")
    ap.add_argument("--repeat", type=int, default=3, help="bulk reserves per size and backend (the best is shown)")
    ap.add_argument("--no-calls", action="store_true", help="only the bulk reserve rows")
    ap.add_argument("--markdown", action="store_true", help="a markdown table (for benches/README.md)")
    args = ap.parse_args()
    gateways = tuple(int(g) for g in args.gateways.split(","))
    sizes = [int(n) for n in args.bulk.split(",") if n]
    results = {"SQLite": {}, "PostgreSQL": {}}
    bulk = {"SQLite": {}, "PostgreSQL": {}}
    with tempfile.TemporaryDirectory(prefix="bench-grants-") as tmp:
        target = str(Path(tmp) / "ledger.db")
        if not args.no_calls:
            results["SQLite"] = bench_backend(target, seed(target, args.subscribers), args.seconds, gateways)
        for n in sizes:
            target = str(Path(tmp) / f"bulk-{n}.db")
            bulk["SQLite"][n] = bench_bulk(target, seed(target, n), args.repeat)
    with PgCluster() as cluster:
        if not args.no_calls:
            target = cluster.create_database("bench_grants")
            results["PostgreSQL"] = bench_backend(target, seed(target, args.subscribers), args.seconds, gateways)
        for n in sizes:
            target = cluster.create_database(f"bench_bulk_{n}")
            bulk["PostgreSQL"][n] = bench_bulk(target, seed(target, n), args.repeat)
    load = os.getloadavg()[0]
    keys = list(results["SQLite"])
    if args.markdown:
        print(f"{args.seconds:g} s per cell, {args.subscribers:,} subscribers, load average {load:.1f} on "
              f"{os.cpu_count()} CPUs\n")
        print("| operation | subscribers per call | gateways (threads) | SQLite calls/s | SQLite subscribers/s "
              "| PostgreSQL calls/s | PostgreSQL subscribers/s | ms per call, SQLite / PostgreSQL |")
        print("|---|---|---|---|---|---|---|---|")
    else:
        print(f"{'operation':<14}{'per call':>9}{'gateways':>9}{'SQLite/s':>12}{'PostgreSQL/s':>14}"
              f"   (load {load:.1f})")
    for key in keys:
        name, per, threads = key
        cells = []
        for backend in ("SQLite", "PostgreSQL"):
            calls, took = results[backend][key]
            cells.append((calls / took, calls * per / took, 1000 * took * threads / max(calls, 1)))
        (s_rate, s_subs, s_ms), (p_rate, p_subs, p_ms) = cells
        if args.markdown:
            print(f"| {name} | {per} | {threads} | {s_rate:,.0f} | {s_subs:,.0f} | {p_rate:,.0f} | {p_subs:,.0f} "
                  f"| {s_ms:.2f} / {p_ms:.2f} |")
        else:
            print(f"{name:<14}{per:>9}{threads:>9}{s_rate:>12,.0f}{p_rate:>14,.0f}")
    for n in sizes:  # grants per second of one start-sized reserve, and of the stop's release
        (s_n, *s_times), (p_n, *p_times) = bulk["SQLite"][n], bulk["PostgreSQL"][n]
        for name, s_took, p_took in zip(("bulk reserve", "bulk release"), s_times, p_times):
            if args.markdown:
                print(f"| {name} (grants/s) | {n:,} | 1 | {1 / s_took:,.2f} | {s_n / s_took:,.0f} | {1 / p_took:,.2f} "
                      f"| {p_n / p_took:,.0f} | {1000 * s_took:.0f} / {1000 * p_took:.0f} |")
            else:
                print(f"{name:<14}{n:>9}{1:>9}{s_n / s_took:>12,.0f}{p_n / p_took:>14,.0f}"
                      f"   grants/s ({1000 * s_took:.0f} / {1000 * p_took:.0f} ms per call)")


if __name__ == "__main__":
    main()
