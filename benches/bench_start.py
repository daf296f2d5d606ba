#!/usr/bin/env python3
"""The Accountant's start at N subscribers: the ledger into the engine, billing opened (issue 12).

The stages of ``gateway/daemon/gateway.py`` ``Gateway.start`` that hold the
subscribers, in its order, on a ledger of N subscribers and without the
kernel (no nft, no lab, no root): the ledger's rows into the engine
(``load``), ``start_billing``, ``bill(now)`` and ``resume_from_ledger``.
Each size runs in a fresh process (``--child``), which prints per stage its
seconds, CPU seconds (steadier than the wall clock on a shared machine) and
resident memory after it, and the process's peak (VmHWM).

The ledger is ``benches/bench_scale.py``'s ``build_ledger`` (bulk subscriber
i: an IPv4 /32, and for 80% an IPv6 prefix: 1.8M prefixes at 1M), built in
--workdir as ledger-N.db unless it is there already, or the one given with
--ledger. The config is the lab's (``gateway.lab.lab_config``: one tariff,
one config subscriber). ``--spread``: a copy whose subscribers were created
over two years, as a real ledger's restart is (each account walked through
the months since it joined) rather than all of them a moment ago.

    .venv/bin/python benches/bench_start.py                         # 200k and 1M
    .venv/bin/python benches/bench_start.py --sizes 1000000 --runs 3 --markdown
    .venv/bin/python benches/bench_start.py --ledger /tmp/l.db --spread

The machine is shared: run sizes one after the other, read times as +-30%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benches"))

STAGES = ("load", "start_billing", "bill", "resume")
SPREAD_S = 2 * 365 * 86400  # created_ns spread over two years


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` figure (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def child(db: str, config: str, engine: str) -> dict:
    """The start's stages in this process: ``{stage: [seconds, RSS MB after]}``, peak, counts."""
    from accounting.ledger import Ledger
    from gateway.config import load_config
    from gateway.runtime import Accountant, iter_ledger_chunks, kept_for_life

    cfg = load_config(config)
    ledger = Ledger.open(db)
    acct = Accountant(cfg, ledger, engine)
    out: dict = {"stages": {}, "rss_start_mb": status_mb("VmRSS")}

    def stage(name, call):
        t0, c0 = time.perf_counter(), time.process_time()
        result = call()
        out["stages"][name] = [time.perf_counter() - t0, status_mb("VmRSS"), time.process_time() - c0]
        return result

    # as Gateway.start does it (no [cluster]: every row is served), streamed
    with kept_for_life():
        events = stage("load", lambda: acct.load_chunks(  # as Gateway.load_from_ledger (no credit grants)
            iter_ledger_chunks(ledger, cluster=cfg.cluster)))
        now = time.time_ns()
        acct.ensure_timeline(now, since_ns=now)
        events += stage("start_billing", lambda: acct.start_billing(now))[1]
        events += stage("bill", lambda: acct.bill(now))[1]
        events += stage("resume", lambda: acct.resume_from_ledger(now))
    out["peak_mb"] = status_mb("VmHWM")
    out["subscribers"] = len(acct.subscribers)
    if hasattr(acct.subscribers, "nbytes"):  # the columns' bytes (gateway/subscriber_table.py) after the start
        out["columns_mb"] = {k: v / 2 ** 20 for k, v in
                             {**acct.subscribers.nbytes(), "terms": acct.terms.nbytes()}.items()}
    out["accounts"] = acct.biller.accounts.nbytes()  # the billing accounts: rows and objects (account_book.py)
    out["events"] = len(events)
    return out


def spread_copy(db: Path) -> Path:
    """A copy of ``db`` whose subscribers were created over two years (made once)."""
    spread = db.with_name(db.stem + "-spread.db")
    if not spread.exists():
        shutil.copy(db, spread)
        con = sqlite3.connect(spread)
        con.execute("UPDATE subscribers SET created_ns = ? - (id * 7919 % ?) * 1000000000 - id",
                    (time.time_ns(), SPREAD_S))
        con.commit()
        con.close()
    return spread


def ledger_for(n: int, args) -> Path:
    from accounting.money import parse_amount
    from bench_scale import build_ledger

    db = Path(args.workdir) / f"ledger-{n}.db"
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        print(f"building {db} ({n:,} subscribers)", file=sys.stderr, flush=True)
        build_ledger(db, n, parse_amount("100.00", "EUR"))
    return db


def run_child(db: Path, config: Path, engine: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(db), str(config), "--engine", engine],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the start failed on {db}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def table(results: list[tuple[str, dict]], markdown: bool) -> str:
    head = ["run", *STAGES, "all", "peak RSS"]
    lines = []
    for name, r in results:
        cells = [f"{r['stages'][s][0]:.2f} s (cpu {r['stages'][s][2]:.2f}), {r['stages'][s][1]:,.0f} MB"
                 for s in STAGES]
        total, cpu = (sum(r["stages"][s][k] for s in STAGES) for k in (0, 2))
        lines.append([name, *cells, f"{total:.2f} s (cpu {cpu:.2f})", f"{r['peak_mb']:,.0f} MB"])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [head, *lines])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200000,1000000", help="comma-separated subscriber counts")
    ap.add_argument("--ledger", metavar="DB", help="an existing SQLite ledger to start from instead (--sizes ignored)")
    ap.add_argument("--workdir", default="/var/tmp/tollgate-bench-start", help="where ledger-N.db are built and kept")
    ap.add_argument("--spread", action="store_true", help="subscribers created over two years (a copy of the ledger)")
    ap.add_argument("--runs", type=int, default=1, help="fresh processes per size")
    ap.add_argument("--engine", default="c", choices=("c", "py"), help="the compiled engine or its Python twin")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--json", metavar="FILE", help="write the results to FILE")
    ap.add_argument("--child", nargs=2, metavar=("DB", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.engine)))
        return 0
    from gateway.lab import lab_config

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    config = work / "tollgate.toml"
    config.write_text(lab_config(1))
    if args.ledger:
        dbs = [Path(args.ledger)]
    else:
        dbs = [ledger_for(int(s.replace("_", "")), args) for s in args.sizes.split(",") if s.strip()]
    results = []
    for db in dbs:
        if args.spread:
            db = spread_copy(db)
        for i in range(args.runs):
            r = run_child(db, config, args.engine)
            name = f"{r['subscribers']:,}" + (" spread" if args.spread else "") + (f" #{i + 1}" if args.runs > 1 else "")
            print(f"{name}: " + ", ".join(f"{s} {r['stages'][s][0]:.2f} s" for s in STAGES)
                  + f", peak {r['peak_mb']:,.0f} MB", file=sys.stderr, flush=True)
            if "columns_mb" in r:
                print("  subscriber table columns: " + ", ".join(f"{k} {v:,.1f} MB" for k, v in r["columns_mb"].items()),
                      file=sys.stderr, flush=True)
            a = r["accounts"]
            print(f"  billing accounts: {a['resting']:,} resting as rows ({a['rows'] / 2 ** 20:,.1f} MB of columns), "
                  f"{a['live']:,} objects", file=sys.stderr, flush=True)
            results.append((name, r))
    out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    print(f"commit {out.stdout.strip()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPUs, engine {args.engine}\n")
    print(table(results, args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
