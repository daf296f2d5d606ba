#!/usr/bin/env python3
"""The HTTP service under abuse, measured in one run (no root needed).

``tollgate api`` serves a real ledger on loopback (one uvicorn worker, as
in the gateway). Meanwhile:

1. an attacker sends 1,000 bad portal logins within a minute (16.7 per
   second), from one address, at one account: which attempt is the first to
   get 429, and how many of the 1,000 got it;
2. it sends 10 MB bodies to the admin API: refused (413) and how fast;
3. honest clients (an admin reading a subscriber, a cashier taking a
   payment) keep calling: their latency p50/p99 before and during the
   attack, and any error they saw.

    .venv/bin/python benches/bench_api.py [--seconds 60] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from accounting.ledger import Ledger  # noqa: E402
from api.auth import PortalPasswords, TokenStore  # noqa: E402
from gateway.lab import lab_config  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def honest(base: str, token: str, stop: threading.Event, out: list, errors: list) -> None:
    """Alternate a read and a payment, 20 a second; record each latency."""
    h = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, timeout=10) as c:
        k = 0
        while not stop.is_set():
            k += 1
            start = time.perf_counter()
            if k % 2:
                r = c.get("/api/v1/subscribers/1", headers=h)
            else:
                r = c.post("/api/v1/subscribers/1/payments", json={"amount": "0.01"},
                           headers={**h, "Idempotency-Key": f"bench-{time.time_ns()}"})
            out.append(time.perf_counter() - start)
            if r.status_code >= 400:
                errors.append(r.status_code)
            stop.wait(0.05)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="the attack's length (1,000 logins spread over it)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tollgate-api-bench-"))
    (work / "t.toml").write_text(lab_config(2))
    ledger = Ledger.open(work / "l.db")
    token = TokenStore(ledger).create("bench-cashier", "cashier")
    sid = ledger.add_subscriber("alice", "lab", "EUR", 10**10, contract="C-1001", addresses=["100.64.1.2/32"])
    PortalPasswords(ledger).set(sid, "correct horse battery")
    ledger.close()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "gateway.cli", "api", "--config", str(work / "t.toml"), "--db",
                               str(work / "l.db"), "--port", str(port)], cwd=REPO)
    try:
        for _ in range(100):
            try:
                httpx.get(base + "/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        stop = threading.Event()
        before, during, errors = [], [], []
        t = threading.Thread(target=honest, args=(base, token, stop, before, errors))
        t.start()
        time.sleep(5)
        stop.set()
        t.join()

        stop = threading.Event()
        t = threading.Thread(target=honest, args=(base, token, stop, during, errors))
        t.start()
        statuses = []
        refused_big = []
        with httpx.Client(base_url=base, timeout=10) as attacker:
            start = time.monotonic()
            for i in range(1000):
                r = attacker.post("/portal/login", data={"login": "C-1001", "password": f"guess-{i}"},
                                  headers={"Origin": base})
                statuses.append(r.status_code)
                if i % 100 == 0:  # and now and then a 10 MB body at the admin API
                    t0 = time.perf_counter()
                    big = attacker.post("/api/v1/subscribers", content=b"x" * (10 << 20),
                                        headers={"Authorization": f"Bearer {token}",
                                                 "Content-Type": "application/json"})
                    refused_big.append((big.status_code, time.perf_counter() - t0))
                pause = start + (i + 1) * args.seconds / 1000 - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
        stop.set()
        t.join()
    finally:
        server.terminate()
        server.wait(10)
    first_429 = statuses.index(429) + 1 if 429 in statuses else None
    result = {
        "bad_logins": len(statuses), "first_429_at_attempt": first_429, "answered_429": statuses.count(429),
        "answered_401": statuses.count(401), "other": sorted(set(statuses) - {401, 429}),
        "big_bodies": len(refused_big), "big_bodies_413": sum(1 for s, _ in refused_big if s == 413),
        "big_body_ms_max": round(max(d for _, d in refused_big) * 1000, 1),
        "honest_before": {"n": len(before), "p50_ms": round(percentile(before, .5), 1),
                          "p99_ms": round(percentile(before, .99), 1)},
        "honest_during": {"n": len(during), "p50_ms": round(percentile(during, .5), 1),
                          "p99_ms": round(percentile(during, .99), 1), "max_ms": round(max(during) * 1000, 1)},
        "honest_errors": errors,
    }
    if args.markdown:
        r = result
        print(f"| attack ({args.seconds:g} s) | result |\n|---|---|\n"
              f"| 1,000 bad portal logins, one address, one account | first 429 at attempt {r['first_429_at_attempt']};"
              f" {r['answered_429']} answered 429, {r['answered_401']} answered 401 |\n"
              f"| {r['big_bodies']} bodies of 10 MB at the admin API | {r['big_bodies_413']} refused with 413,"
              f" slowest refusal {r['big_body_ms_max']} ms |\n\n"
              f"| honest clients (a read and a payment, 20/s) | requests | p50 | p99 | errors |\n|---|---:|---:|---:|---|\n"
              f"| before the attack | {r['honest_before']['n']} | {r['honest_before']['p50_ms']} ms |"
              f" {r['honest_before']['p99_ms']} ms | |\n"
              f"| during the attack | {r['honest_during']['n']} | {r['honest_during']['p50_ms']} ms |"
              f" {r['honest_during']['p99_ms']} ms | {r['honest_errors'] or 'none'} |")
    else:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
