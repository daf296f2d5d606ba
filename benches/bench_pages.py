"""Operations at scale (issue 12): a ledger of 10k, 100k and 1M subscribers built through the bulk import,
then what people run against it, each the median of a few runs.

    .venv/bin/python benches/bench_pages.py [--sizes 10000,100000,1000000] [--runs 5] [--dir /tmp/tg-pages]

Subscribers have an IPv4 /32 and, 4 in 5, an IPv6 /64 (as in the issue). Usage: the busiest 1% of the
subscribers have 60 minutes of traffic in 2 zones and both directions (what an hour of a busy network
leaves); `top` asks for that hour, `usage` for one of them over it.

Columns: import of the whole file (`Operations.import_subscribers`: parse, check, sweep, one transaction
with the change feed's rows), the same file again (idempotent: nothing written), `subscriber list --limit
50` (first page, and page 10,000 by cursor), `show` (one subscriber by name), `top` (10 of the hour),
`top` of its last 5 minutes, `usage` (one subscriber, by zone and direction), and the admin API's `GET /api/v1/subscribers?limit=50`
and `?after_id=` page through the real FastAPI app (TestClient, no network). Times are in-process: the
command line adds about 0.15 s of interpreter start and imports to each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = """
[gateway]
currency = "EUR"
timezone = "UTC"
local_networks = ["100.64.0.0/10", "2001:db8:100::/40"]
admin_networks = ["127.0.0.0/8"]

[[tariff]]
name = "basic"
price_unit = "MB"
[tariff.prices]
external = "1"

[[tariff]]
name = "premium"
price_unit = "MB"
[tariff.prices]
external = "0.5"
"""


def subscriber_line(i: int) -> str:
    """Subscriber ``i`` (1-based) of the bench's files: 100.64.0.0/10 holds 4M /32s, 2001:db8:100::/40 16M /64s."""
    v4 = 0x64400000 + i
    addresses = [f"{v4 >> 24}.{(v4 >> 16) & 255}.{(v4 >> 8) & 255}.{v4 & 255}/32"]
    if i % 5:
        addresses.append(f"2001:db8:{0x100 + (i >> 16):x}:{i & 0xFFFF:x}::/64")
    return json.dumps({"name": f"sub-{i:07d}", "tariff": "premium" if i % 10 == 0 else "basic",
                       "balance": f"{i % 100}.{i % 97:02d}", "addresses": addresses}, separators=(",", ":")) + "\n"


def write_file(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for start in range(1, n + 1, 10_000):
            f.write("".join(subscriber_line(i) for i in range(start, min(n, start + 9_999) + 1)))
    return path


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def bench(n: int, runs: int, folder: Path) -> dict:
    from fastapi.testclient import TestClient

    from accounting.ledger import Ledger
    from accounting.operations import Operations
    from api.app import LedgerView, create_app
    from api.auth import TokenStore
    from gateway.config import load_config

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.toml").write_text(CONFIG)
    cfg = load_config(folder / "bench.toml")
    db = folder / f"ledger-{n}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    data = write_file(folder / f"subscribers-{n}.jsonl", n)
    ledger = Ledger.open(db)
    ops = Operations(ledger, cfg, "cli:bench")
    t = time.perf_counter()
    with open(data, "rb") as f:
        done = ops.import_subscribers(f, "jsonl", data.name)
    import_s = time.perf_counter() - t
    assert done["added"] == n, done
    t = time.perf_counter()
    with open(data, "rb") as f:
        again = ops.import_subscribers(f, "jsonl", data.name)
    rerun_s = time.perf_counter() - t
    assert again["added"] == 0 and again["unchanged"] == n, again
    changes = ledger.db.execute("SELECT count(*) FROM changes").fetchone()[0]

    # an hour of traffic of the busiest 1%: 60 minutes x 2 zones x 2 directions each
    hour = 1_800_000_000 - 1_800_000_000 % 3600
    busy = list(range(1, n + 1, 100))
    rows = [(sid, zone, direction, hour + 60 * m, 1000 * sid % 7919 + m + 1, 3, 0)
            for sid in busy for m in range(60) for zone in (0, 1) for direction in (0, 1)]
    ledger.apply_flush("bench-hour", rows, hour * 10**9)

    token = TokenStore(ledger).create("bench", "operator")
    client = TestClient(create_app(LedgerView(cfg, db)), client=("127.0.0.1", 50000))
    auth = {"Authorization": f"Bearer {token}"}
    deep = ops.list(1, offset=min(n - 50, 500_000) - 1)["items"][0]["id"]  # a cursor deep in the table
    name = f"sub-{n // 2:07d}"
    out = {
        "n": n, "import_s": import_s, "rerun_s": rerun_s, "changes": changes,
        "list_ms": median_ms(lambda: ops.list(50), runs),
        "list_deep_ms": median_ms(lambda: ops.list(50, after_id=deep), runs),
        "list_tariff_ms": median_ms(lambda: ops.list(50, tariff="premium", after_id=deep), runs),
        "show_ms": median_ms(lambda: ops.get(name), runs),
        "top_ms": median_ms(lambda: ops.top(10, hour, hour + 3600), runs),
        "top5_ms": median_ms(lambda: ops.top(10, hour + 3300, hour + 3600), runs),
        "usage_ms": median_ms(lambda: ops.usage(busy[len(busy) // 2], hour, hour + 3600), runs),
        "api_ms": median_ms(lambda: client.get("/api/v1/subscribers?limit=50", headers=auth).raise_for_status(),
                            runs),
        "api_deep_ms": median_ms(lambda: client.get(f"/api/v1/subscribers?limit=50&after_id={deep}",
                                                    headers=auth).raise_for_status(), runs),
        "db_mb": os.path.getsize(db) / 1e6,
    }
    ledger.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/tg-pages")
    args = ap.parse_args()
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        r = bench(n, args.runs, Path(args.dir))
        print(f"# {n}: {r}", file=sys.stderr, flush=True)
        results.append(r)
    print("| N subscribers | import | import again | list 50 | list 50 by cursor deep | list 50 tariff+cursor "
          "| show | top 10 of an hour | top 10 of 5 min | usage of one | API page | API page by cursor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['n']:,} | {r['import_s']:.1f} s | {r['rerun_s']:.1f} s | {r['list_ms']:.1f} ms "
              f"| {r['list_deep_ms']:.1f} ms | {r['list_tariff_ms']:.1f} ms | {r['show_ms']:.1f} ms "
              f"| {r['top_ms']:.1f} ms | {r['top5_ms']:.1f} ms | {r['usage_ms']:.1f} ms | {r['api_ms']:.1f} ms | {r['api_deep_ms']:.1f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
