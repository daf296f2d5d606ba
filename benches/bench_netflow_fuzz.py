#!/usr/bin/env python3
"""The NetFlow/IPFIX collector under hostile input: how many datagrams a second
it gets through, and whether any crashed it or hung it.

Two kinds of datagrams, both handed to the source's own handler
(``NetflowSource.handle``) with a real engine, the compiled one and the
pure-Python twin:

* ``structured``: drawn by hypothesis from the strategies of
  ``tests/unit/test_netflow_fuzz.py`` (v5, v9 and IPFIX headers, template,
  options template and data sets, counters, lengths and ids at the edges, then
  damaged), a fresh random seed each run, generated first, then replayed timed;
* ``mutated``: valid datagrams from the same strategies, mutated at random
  (bytes set to 0, 0xFF or anything, 16-bit fields set to edge values,
  truncation, splices of two datagrams) for ``--seconds``.

A *crash* is an exception out of the handler, or one it had to catch as a bug
(``malformed_exception``, ``rating_errors``). A *hang* is a datagram that took
more work steps than it has bytes (the collector's own bound), or longer than
``--hang-ms`` (60 s: a datagram may carry up to 4 TiB, 4M engine aggregates,
about 0.5 s for the compiled engine and 45 s for the pure-Python one). The slowest datagram is reported as measured, and the most
engine aggregates one datagram took (at most ``MAX_ENTRIES_PER_DATAGRAM``).

* ``coverage-guided`` (``--atheris SECONDS``, if atheris is installed:
  ``pip install atheris``): libFuzzer through atheris, the collector and
  ``ext/batch.py`` instrumented, seeded with valid datagrams from the same
  strategies, the invariants of the unit test's harness checked after every
  input (a broken one is a crash), libFuzzer's ``-timeout`` of 60 s a hang.

    .venv/bin/python benches/bench_netflow_fuzz.py                       # 3,000 structured, 20 s mutated
    .venv/bin/python benches/bench_netflow_fuzz.py --structured 500 --seconds 5
    .venv/bin/python benches/bench_netflow_fuzz.py --engines c --structured 0 --seconds 0 --atheris 120
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

import logging  # noqa: E402

EXPORTERS = ["192.0.2.1", "192.0.2.2", "2001:db8::1"]


def atheris_child(argv: list) -> None:
    """Run under libFuzzer (never returns): the first byte picks the exporter."""
    import atheris

    with atheris.instrument_imports(include=["gateway.sources.netflow", "ext.batch"]):
        import ext.batch  # noqa: F401
        import gateway.sources.netflow  # noqa: F401
    from test_netflow_fuzz import Harness

    logging.getLogger("tollgate").setLevel(logging.ERROR)
    engine = "c"
    if "--engine" in argv:
        at = argv.index("--engine")
        engine = argv[at + 1]
        del argv[at:at + 2]
    harness = Harness(engine)
    # the collector's own budget (the unit test lowers it for the pure-Python engine)
    harness.source.collector.max_entries_per_datagram = gateway.sources.netflow.MAX_ENTRIES_PER_DATAGRAM

    def one_input(data: bytes) -> None:
        if data:
            harness.feed(data[1:], EXPORTERS[data[0] % len(EXPORTERS)])  # a broken invariant raises: a crash

    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__" and "--atheris-child" in sys.argv:
    atheris_child([a for a in sys.argv if a != "--atheris-child"])

from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings  # noqa: E402

import ext  # noqa: E402
from gateway.sources import netflow  # noqa: E402
from test_netflow_fuzz import Harness, hostile_datagrams, valid_datagrams  # noqa: E402

EDGE_16 = [b"\x00\x00", b"\x00\x01", b"\x00\x04", b"\x01\x00", b"\xff\xff"]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def draw(strategy, n: int, seed: int) -> list:
    """``n`` examples of a hypothesis strategy (generation only, no shrinking)."""
    out = []

    @hypothesis_seed(seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(case):
        out.append(case)

    collect()
    return out


def mutate(rng: random.Random, pool: list) -> bytes:
    data = bytearray(rng.choice(pool))
    for _ in range(rng.randint(1, 4)):
        how = rng.randrange(6)
        if how == 0 and data:
            data[rng.randrange(len(data))] = rng.choice([0, 0xFF, rng.randrange(256)])
        elif how == 1 and len(data) >= 2:
            at = rng.randrange(len(data) - 1)
            data[at:at + 2] = rng.choice(EDGE_16)
        elif how == 2 and data:
            del data[rng.randrange(len(data)):]
        elif how == 3:
            other = rng.choice(pool)
            data[rng.randrange(len(data) + 1):] = other[rng.randrange(len(other) + 1):]
        elif how == 4:
            data += rng.randbytes(rng.randrange(1, 32))
        else:
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randrange(1, 8))
    return bytes(data)


def run_atheris(engine: str, seconds: float, pool: list) -> str:
    """libFuzzer for ``seconds`` in a child process; a markdown row of what it did."""
    with tempfile.TemporaryDirectory(prefix="tollgate-netflow-atheris-") as work:
        corpus = Path(work, "corpus")
        corpus.mkdir()
        for k, data in enumerate(pool):
            (corpus / f"seed{k}").write_bytes(bytes([k % len(EXPORTERS)]) + data)
        cmd = [sys.executable, __file__, "--atheris-child", "--engine", engine, str(corpus),
               f"-max_total_time={int(seconds)}", "-timeout=60", "-rss_limit_mb=4096", "-max_len=2048",
               f"-artifact_prefix={work}/", "-print_final_stats=1"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env={**os.environ})
        wall = time.perf_counter() - t
        out = proc.stderr
        stat = dict(re.findall(r"stat::(\w+):\s*(\d+)", out))
        cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
        crashes = len(list(Path(work).glob("crash-*"))) + len(list(Path(work).glob("oom-*")))
        hangs = len(list(Path(work).glob("timeout-*")))
        if proc.returncode != 0 or crashes or hangs:
            say(out[-4000:])
        runs = int(stat.get("number_of_executed_units", 0))
        say(f"atheris: exit {proc.returncode}, {runs} runs in {wall:.0f} s, cov {cov[-1] if cov else '?'}")
        edges = f"{int(cov[-1][0]):,} edges, {int(cov[-1][1]):,} features" if cov else "?"
        return (f"| {engine} | coverage-guided (atheris: {edges}, peak RSS {int(stat.get('peak_rss_mb', 0))} MB) "
                f"| {runs:,} | {runs / wall:,.0f} | {int(stat.get('average_exec_per_sec', 0)):,} "
                f"| {crashes + (proc.returncode != 0)} | {hangs} | - | - | - | - | - |")


class Run:
    def __init__(self, engine: str, hang_ms: float) -> None:
        self.harness = Harness(engine)
        self.source = self.harness.source
        # the collector's own budget, for both engines (the unit test lowers it for the pure-Python one)
        self.source.collector.max_entries_per_datagram = netflow.MAX_ENTRIES_PER_DATAGRAM
        self.most_entries = 0
        self.hang_ns = hang_ms * 1e6
        self.tried = self.crashes = self.hangs = 0
        self.slowest_ns = 0
        self.busy_ns = 0
        self.steps_per_byte = 0.0

    def feed(self, data: bytes, exporter: str) -> None:
        t = time.perf_counter_ns()
        try:
            self.source.handle(data, exporter)
        except Exception as exc:  # noqa: BLE001 - this is what the bench counts
            self.crashes += 1
            say(f"CRASH {exc!r} on {data.hex()}")
        took = time.perf_counter_ns() - t
        self.harness.engine.drain()
        self.tried += 1
        self.busy_ns += took
        self.slowest_ns = max(self.slowest_ns, took)
        steps = self.source.collector.last_steps
        collector = self.source.collector
        self.most_entries = max(self.most_entries, collector.max_entries_per_datagram - collector._budget)
        self.steps_per_byte = max(self.steps_per_byte, steps / max(1, len(data)))
        if took > self.hang_ns or steps > len(data):
            self.hangs += 1
            say(f"HANG {took / 1e6:.1f} ms, {steps} steps on {len(data)} bytes: {data.hex()}")

    def row(self, engine: str, kind: str, wall: float) -> str:
        if not self.tried:
            return ""
        stats = self.source.stats()
        caught = stats["malformed_exception"] + stats["rating_errors"]
        per_second = self.tried / self.busy_ns * 1e9
        return (f"| {engine} | {kind} | {self.tried:,} | {self.tried / wall:,.0f} | {per_second:,.0f} "
                f"| {self.crashes + caught} | {self.hangs} | {self.slowest_ns / 1e6:.1f} | {self.steps_per_byte:.2f} "
                f"| {self.most_entries:,} | {stats['malformed']:,} | {stats['records']:,} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structured", type=int, default=3000, help="hypothesis datagrams (default 3000)")
    ap.add_argument("--seconds", type=float, default=20.0, help="random mutation per engine (default 20 s)")
    ap.add_argument("--hang-ms", type=float, default=60000.0,
                    help="a datagram slower than this is a hang (default 60 s: the most a datagram may carry, "
                         "4 TiB in 4M aggregates, takes the pure-Python engine some 45 s, the compiled one 0.5 s)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--engines", default=",".join(sorted(ext.ENGINES)))
    ap.add_argument("--atheris", type=float, default=0.0, metavar="SECONDS",
                    help="also run libFuzzer through atheris for this long per engine (needs atheris)")
    args = ap.parse_args()
    logging.getLogger("tollgate").setLevel(logging.ERROR)  # the collector's per-reason warnings, thousands of them
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    say(f"seed {seed}: drawing {args.structured} structured datagrams")
    t = time.perf_counter()
    structured = draw(hostile_datagrams(), args.structured, seed) if args.structured else []
    pool = [d for d, _e, _r in draw(valid_datagrams(), 200, seed + 1)]
    say(f"drawn in {time.perf_counter() - t:.1f} s")
    rows = []
    for engine in args.engines.split(","):
        if args.atheris:
            rows.append(run_atheris(engine, args.atheris, pool))
            say(rows[-1])
        if not args.structured and not args.seconds:
            continue
        run = Run(engine, args.hang_ms)
        t = time.perf_counter()
        for data, exporter in structured:
            run.feed(data, exporter)
        rows.append(run.row(engine, "structured (hypothesis)", time.perf_counter() - t))
        run.harness.close()
        run = Run(engine, args.hang_ms)
        rng = random.Random(seed)
        exporters = ["192.0.2.1", "192.0.2.2", "2001:db8::1"]
        t = time.perf_counter()
        stop = t + args.seconds
        while time.perf_counter() < stop:
            for _ in range(100):
                run.feed(mutate(rng, pool), rng.choice(exporters))
        rows.append(run.row(engine, "mutated (random)", time.perf_counter() - t))
        run.harness.close()
        say(rows[-2])
        say(rows[-1])
    print(f"seed {seed}; a hang is > {args.hang_ms:.0f} ms or more steps than bytes\n")
    print("| engine | datagrams | tried | per second (wall) | per second (handler) | crashes | hangs "
          "| slowest (ms) | steps per byte, max | aggregates in one datagram, max | malformed | records |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(r for r in rows if r))


if __name__ == "__main__":
    main()
