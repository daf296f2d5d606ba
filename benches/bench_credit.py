"""Credit grants on PostgreSQL: grants per second and report round trips per
second against a local throwaway cluster (accounting/credit/pgcluster.py:
Unix socket, fsync off, synchronous_commit on), with pools of 1 and 4
connections (as many client threads as connections).

* grants: ``CreditStore.reserve`` (one transaction: the request id looked up,
  the conditional UPDATE of the account, the grant and request rows), each
  thread on its own accounts ("spread") or every thread on one account ("one
  hot account": every reserve queues on the same row lock).
* reports: ``CreditStore.report(..., more=...)``: the grant locked, the report
  row, the account charged and the grant extended, one round trip per call as a
  gateway's threshold report would be.

    .venv/bin/python benches/bench_credit.py [--seconds 2] [--accounts 1000]
"""

from __future__ import annotations

import argparse
import os
import itertools
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accounting.credit.pg import CreditStore  # noqa: E402
from accounting.credit.pgcluster import PgCluster  # noqa: E402

S = 1_000_000_000
BALANCE = 10 ** 15


def run(threads: int, seconds: float, op) -> tuple[int, float]:
    counts = [0] * threads
    stop = time.monotonic() + seconds
    start = threading.Barrier(threads + 1)

    def work(n):
        start.wait()
        i = 0
        while time.monotonic() < stop:
            op(n, i)
            i += 1
        counts[n] = i

    ts = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for t in ts:
        t.start()
    t0 = time.monotonic()
    start.wait()
    for t in ts:
        t.join()
    return sum(counts), time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--accounts", type=int, default=1000)
    args = ap.parse_args()
    rows = []
    with PgCluster() as cluster:
        for pool in (1, 4):
            db = f"bench_{pool}"
            store = CreditStore.open(cluster.create_database(db), pool_size=pool)
            for a in range(1, args.accounts + 1):
                store.open_account(a, BALANCE)
            ids = itertools.count()

            def spread(n, i):
                store.reserve(1 + (n * 7919 + i) % args.accounts, f"gw{n}", 1000, 60 * S)

            def hot(n, i):
                store.reserve(1, f"gw{n}", 1000, 60 * S)

            grants = [store.reserve(1 + n * 97 % args.accounts, f"gw{n}", 10 ** 9, 3600 * S).id for n in range(pool)]

            def report(n, i):
                store.report(grants[n], f"gw{n}:{next(ids)}", 500, more=500)

            for name, op in (("report round trips (with more)", report), ("grants (spread)", spread),
                             ("grants (one hot account)", hot)):
                done, took = run(pool, args.seconds, op)
                rows.append((name, pool, done, took))
            problems = store.check()
            store.close()
            if problems:
                raise SystemExit(f"inconsistent after the bench: {problems[:3]}")
    load = os.getloadavg()
    print(f"load average during the run: {load[0]:.1f} (1 min) on {os.cpu_count()} CPUs; {args.seconds:g} s per row")
    print()
    print("| operation | pool (= threads) | calls | per second | ms per call (per thread) |")
    print("|---|---|---|---|---|")
    for name, pool, done, took in rows:
        print(f"| {name} | {pool} | {done:,} | {done / took:,.0f} | {1000 * took * pool / done:.2f} |")


if __name__ == "__main__":
    main()
