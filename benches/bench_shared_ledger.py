#!/usr/bin/env python3
"""The gateway's traffic rate on a shared PostgreSQL ledger against SQLite, side by side in one run
(issue 13; root: builds its own lab and a throwaway PostgreSQL cluster).

The one-gateway lab (2 subscribers), ``tollgate run`` in the gateway (nfqueue, 1 queue), the same
traffic each way:

* **SQLite**: the embedded ledger, a file (no ``[cluster]``): the engine spends the balance itself;
* **PostgreSQL, grant G**: a fresh database on the throwaway cluster and ``[cluster] gateway = "g1"``,
  ``grant = G``: the engine spends credit grants reserved in the ledger
  (gateway/daemon/credit.py), one row per ``--grants`` value (default ``100.00``, ``20.00`` and ``1.00``,
  ``[cluster]``'s default).

Traffic, with bench_dataplane.py's helpers (imported, not copied: its ``PREFIX`` and ``BLAST`` are
set to this bench's own): TCP bulk from subscriber 1 (iperf3, Gbit/s at the receiver) and 64-byte
IP packets (benches/udpblast.c, sendmmsg, counted in the upstream namespace). Figures per path:

* throughput and packets per second received upstream (UDP lost % against what was sent);
* the gateway's CPU: user + system time of the ``tollgate run`` process (all its threads, from
  /proc/<pid>/stat) per second of traffic, in % of one CPU, during the TCP and the UDP runs;
* flush lag: /healthz ``flush_lag_seconds`` sampled every 0.25 s during the traffic, the largest
  (the flush interval is 1 s: ~1 s is on time);
* credit grant round trips: /healthz's ``credit`` section has the money reserved since start and the
  failures but no count, so the round trips are counted by the server: ``pg_stat_statements``
  (loaded into the throwaway cluster by this bench) calls of the reserve's conditional UPDATE (one
  per subscriber per reserve; one subscriber sends here) and of the renewal, added up, with the
  server's mean time per reserve UPDATE;
* blocks: ``tollgate_blocks`` from /metrics (a subscriber with money blocked because its grant ran
  out before the refill shows here).

Each figure ``--repeat`` times per path, the paths interleaved round by round (median, min-max).

    sudo .venv/bin/python benches/bench_shared_ledger.py [--seconds 3] [--repeat 2] [--grants 100.00,20.00,1.00] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benches"))

import bench_dataplane as dp  # noqa: E402
from gateway.lab import lab_config, lab_down, lab_up  # noqa: E402

PREFIX = dp.PREFIX = "tgshl"  # dp's helpers name the lab's namespaces by its module's PREFIX
dp.BLAST = Path(tempfile.gettempdir()) / f"tollgate-udpblast-shl-{os.getpid()}"  # our own binary
BALANCES = {1: "1000000", 2: "1000000"}
RESERVE_SQL = "UPDATE subscribers SET last_reserve%"
RENEW_SQL = "UPDATE grants SET valid_until_ns%"


def pg_cluster_class():
    """The throwaway PostgreSQL cluster helper (accounting/store/pgcluster.py)."""
    from accounting.store.pgcluster import PgCluster

    return PgCluster


def cpu_seconds(pid: int) -> float:
    """User + system time of a process and all its threads (/proc/<pid>/stat utime, stime)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / dp.HZ


def fresh_iperf3(lab) -> None:
    """A new iperf3 server on the upstream before each TCP run: one whose client was cut off mid-test
    (a subscriber blocked when its grant ran out resets its connections) answers "busy" for a while."""
    from gateway.lab import _alive, _wait_port, spawn

    pidfile = lab.run_dir / "iperf3.pid"
    if pidfile.exists():
        pid = int(pidfile.read_text())
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    spawn(lab, "iperf3", lab.up, "iperf3", "-s")
    _wait_port(lab.up, 5201)


def metric_sum(name: str) -> float:
    text = dp.ns("gw", "curl", "-s", "-m", "2", "http://127.0.0.1:8080/metrics").stdout
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:_total)?(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


class LagSampler:
    """/healthz ``flush_lag_seconds`` every 0.25 s while the traffic runs."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stopping.wait(0.25):
            h = dp.health()
            if h and h.get("flush_lag_seconds") is not None:
                self.lags.append(float(h["flush_lag_seconds"]))

    def __enter__(self) -> "LagSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)


class Ledger_:
    """One way to keep the ledger: a gateway started on it, measured, stopped."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tcp: list[float] = []
        self.udp: list[dict] = []
        self.cpu_tcp: list[float] = []
        self.cpu_udp: list[float] = []
        self.lag: list[float] = []
        self.trips: list[int] = []  # reserve and renew UPDATEs during the traffic
        self.reserve_ms: list[float] = []
        self.blocks: list[float] = []
        self.credit: dict | None = None
        self.gw: subprocess.Popen | None = None

    def config(self) -> str:
        return lab_config(2, BALANCES)

    def db(self, work: Path, rnd: int) -> str:
        return str(work / f"sqlite{rnd}.db")

    def before(self) -> None:
        pass

    def after(self) -> None:
        pass

    def measure(self, lab, work: Path, rnd: int, args) -> None:
        fresh_iperf3(lab)
        self.gw = dp.start_gateway(work, self.config(), self.db(work, rnd))
        try:
            self.before()
            with LagSampler() as lag:
                for run, cpu in ((lambda: self.tcp.append(dp.tcp_gbps(args.seconds) or 0.0), self.cpu_tcp),
                                 (lambda: self.udp.append(dp.udp_pps(args.seconds)), self.cpu_udp)):
                    if self.gw.poll() is not None:
                        raise RuntimeError(f"{self.label}: the gateway is gone: "
                                           f"{(work / 'gw.log').read_text()[-1500:]}")
                    c0, t0 = cpu_seconds(self.gw.pid), time.monotonic()
                    run()
                    cpu.append(100.0 * (cpu_seconds(self.gw.pid) - c0) / (time.monotonic() - t0))
                    time.sleep(1.5)  # a flush and a refill: a subscriber blocked by the run before starts unblocked
            self.lag.append(max(lag.lags) if lag.lags else float("nan"))
            self.blocks.append(metric_sum("tollgate_blocks"))
            self.credit = (dp.health() or {}).get("credit")
            self.after()
        finally:
            try:
                dp.stop(self.gw)
            finally:
                dp.ns("gw", "sh", "-c", dp.CLEAN_NFQ)


class Sqlite(Ledger_):
    pass


class Postgres(Ledger_):
    def __init__(self, label: str, pg, grant: str) -> None:
        super().__init__(label)
        self.pg, self.grant = pg, grant
        self.conninfo = ""

    def config(self) -> str:
        return (lab_config(2, BALANCES) + f'[cluster]\ngateway = "g1"\ngrant = "{self.grant}"\n'
                'grant_validity = 60\non_failure = "retry_and_terminate"\n')

    def db(self, work: Path, rnd: int) -> str:
        self.conninfo = self.pg.create_database(f"bench_{re.sub(r'[^0-9a-z]', '_', self.grant)}_{rnd}")
        with self._conn() as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        return self.conninfo

    def _conn(self):
        import psycopg

        return psycopg.connect(self.conninfo, autocommit=True)

    def before(self) -> None:  # the start's grants (every subscriber) are not the traffic's
        with self._conn() as conn:
            conn.execute("SELECT pg_stat_statements_reset()")

    def after(self) -> None:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT query, calls, mean_exec_time FROM pg_stat_statements WHERE dbid = "
                "(SELECT oid FROM pg_database WHERE datname = current_database()) AND "
                "(query LIKE %s OR query LIKE %s)", (RESERVE_SQL, RENEW_SQL)).fetchall()
        reserve = [(c, t) for q, c, t in rows if q.startswith(RESERVE_SQL[:-1])]
        self.trips.append(sum(c for c, _ in reserve) + sum(c for q, c, _ in rows if q.startswith(RENEW_SQL[:-1])))
        if reserve:
            self.reserve_ms.append(sum(c * t for c, t in reserve) / max(1, sum(c for c, _ in reserve)))


def med(xs):
    xs = [x for x in xs if x == x]  # not NaN
    return statistics.median(xs) if xs else None


def span(xs, fmt) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "-"
    return f"{fmt(med(xs))} ({fmt(min(xs))}-{fmt(max(xs))})" if len(xs) > 1 else fmt(xs[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each traffic run")
    ap.add_argument("--repeat", type=int, default=2, help="rounds: each ledger measured this many times, interleaved")
    ap.add_argument("--grants", default="100.00,20.00,1.00", help="[cluster] grant of each PostgreSQL row (EUR)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (namespaces)")
    work = Path(tempfile.mkdtemp(prefix="tollgate-bench-shl-"))
    subprocess.run(["gcc", "-O2", "-o", str(dp.BLAST), str(REPO / "benches" / "udpblast.c")], check=True)
    load0 = Path("/proc/loadavg").read_text().split()[0]
    pg = pg_cluster_class()()
    lab_down(PREFIX)
    try:
        pg.init()
        with open(pg.data / "postgresql.conf", "a") as conf:  # count the grant round trips at the server
            conf.write("shared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track = all\n")
        pg.start()
        paths: list[Ledger_] = [Sqlite("SQLite ledger (file)")]
        paths += [Postgres(f"PostgreSQL, [cluster] grant {g}", pg, g) for g in args.grants.split(",") if g]
        lab = lab_up(2, PREFIX)
        for rnd in range(args.repeat):
            for p in paths:
                dp.say(f"round {rnd + 1}/{args.repeat}: {p.label}")
                p.measure(lab, work, rnd, args)
    finally:
        try:
            lab_down(PREFIX)
        finally:
            pg.close()
            dp.BLAST.unlink(missing_ok=True)
    base = paths[0]
    b_tcp, b_pps = med(base.tcp), med([u["pps"] for u in base.udp])
    head = ["ledger", "TCP Gbit/s", "vs SQLite", "64-byte kpps", "vs SQLite", "UDP lost %",
            "gateway CPU % (TCP)", "gateway CPU % (UDP)", "flush lag max s", "blocks",
            "grant round trips", "server ms per reserve UPDATE"]
    lines = []
    for p in paths:
        pps = [u["pps"] for u in p.udp]
        trips = span(p.trips, lambda v: f"{v:.0f}") if isinstance(p, Postgres) else "-"
        lines.append([p.label, span(p.tcp, lambda v: f"{v:.2f}"), f"{med(p.tcp) / b_tcp:.0%}" if b_tcp else "-",
                      span(pps, lambda v: f"{v / 1e3:.0f}"), f"{med(pps) / b_pps:.0%}" if b_pps else "-",
                      f"{med([u['lost'] for u in p.udp]):.1f}", span(p.cpu_tcp, lambda v: f"{v:.0f}"),
                      span(p.cpu_udp, lambda v: f"{v:.0f}"), span(p.lag, lambda v: f"{v:.2f}"),
                      span(p.blocks, lambda v: f"{v:.0f}"), trips,
                      span(p.reserve_ms, lambda v: f"{v:.3f}") if p.reserve_ms else "-"])
    if args.markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        for line in [head] + lines:
            print("  ".join(f"{c:>20}" for c in line))
    print(f"\n{args.repeat} rounds of {args.seconds:g} s TCP + {args.seconds:g} s UDP per ledger, interleaved; "
          "median (min-max). Grant round trips: reserve and renew UPDATEs (pg_stat_statements) over both runs. "
          f"Load average (1 min) {load0} before, {Path('/proc/loadavg').read_text().split()[0]} after "
          f"on {os.cpu_count()} CPUs.")
    for p in paths:
        if isinstance(p, Postgres) and p.credit:
            print(f"/healthz credit of the last {p.label} run: {p.credit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
