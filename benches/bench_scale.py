#!/usr/bin/env python3
"""One gateway, N subscribers: what `tollgate run` costs at 10k, 100k and 1M subscribers (issue 12).

For each N it builds a ledger of N subscribers straight through SQL (after
``Ledger.open`` made the schema, so independently of the CLI), starts the
namespace lab (``gateway.lab.lab_up(4, PREFIX)``) and ``tollgate run`` in its
gateway namespace, and measures:

  * ``tollgate run`` to /healthz, and to a lab subscriber's traffic counted
    (pings from lab subscriber 1, seen in /metrics), checked to the byte
    against our nft table's counters (``nft get element``) and the ledger;
  * peak resident memory (VmHWM) and idle CPU of the gateway (utime+stime
    over --idle-seconds, no traffic, nobody scraping);
  * flush lag (``tollgate_flush_lag_seconds``, sampled), idle and with
    --active bulk subscribers sending (raw UDP from lab subscriber 1's
    namespace with the bulk subscribers' source addresses, bounded in count);
  * a top-up reaching the engine (``tollgate topup``, then /metrics' live
    balance), worst and median of --repeats; a subscriber added by the CLI
    reaching the engine (/healthz's subscriber count) and its traffic counted;
  * our nft table: lines, counters, time of ``nft list table inet tollgate``;
  * ``tollgate subscriber list --limit 50``, ``subscriber show``, ``top``,
    ``usage`` (whole processes) and ``GET /api/v1/subscribers?limit=50``;
  * a restart (SIGTERM, ``tollgate run`` again) to /healthz and to counted;
  * ``tollgate subscriber import`` of the same N, if the CLI has it;
  * the compiled engine's packets per second with N subscribers loaded
    (``benches/bench_engine.py``'s world and packet mix, no traffic generator).

``--source ebpf`` runs the gateway on the tc/eBPF data path instead (entered
with ``nsenter --net`` so that its pins live in the host's bpffs; detached and
unpinned at the end): the kernel's bytes are then the maps' counters, read
through the pins, less the refunds.

Every wait is bounded (--start-timeout, --measure-timeout) and so is each size
(--size-timeout): what does not finish is recorded as "> T s" and the bench
goes on. The lab and the gateway are removed whatever happens.

    sudo .venv/bin/python benches/bench_scale.py                      # 10k, 100k
    sudo .venv/bin/python benches/bench_scale.py --sizes 1000000 --json after.json
    sudo .venv/bin/python benches/bench_scale.py --sizes 1000000 --source ebpf --active 10000 --no-import
    sudo .venv/bin/python benches/bench_scale.py --json after.json --compare before.json --markdown
    .venv/bin/python benches/bench_scale.py --compare before.json --json after.json   # compare two files only

To measure one commit while others edit the work tree, export it and build its extensions there:
    mkdir /var/tmp/tg && git -C /work/main archive HEAD | tar -x -C /var/tmp/tg
    cd /var/tmp/tg && /work/main/.venv/bin/python setup.py -q build_ext --inplace
    sudo TOLLGATE_BENCH_COMMIT=$(git -C /work/main rev-parse --short HEAD) \
        /work/main/.venv/bin/python benches/bench_scale.py --json /var/tmp/after.json

Addresses: bulk subscriber i is ``b<i>`` with the IPv4 /32 100.64.10.1 + i
(skipping .0 and .255, so out of the lab's 100.64.1-9.x), and 80% of them
(i % 5 != 0) an IPv6 prefix in 2001:db8:100::/48 (DESIGN.md keeps local networks
at /48): a /64 from 2001:db8:100:100::/64 up to 2001:db8:100:fffe::/64 (65,279
of them; the lab uses 2001:db8:100:1-ff::), then /128s in 2001:db8:100:ffff::/64.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOLLGATE = [sys.executable, "-m", "gateway.cli"]
LAB_SUBS = 4  # the lab's own subscribers; s1..s3 come from the config, s4 is added by the CLI during the run
V6_64_FIRST, V6_64_LAST = 0x100, 0xFFFE  # /64 indices inside 2001:db8:100::/48 for the bulk subscribers
HZ = os.sysconf("SC_CLK_TCK")
EBPF_PIN = f"/sys/fs/bpf/tollgate-bench-scale-{os.getpid()}"  # --source ebpf: this run's pins, removed at the end


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Deadline:
    """The time bound of one size: every wait takes the smaller of its own bound and what is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, cap: float) -> float:
        return max(0.0, min(cap, self.end - time.monotonic()))

    @property
    def over(self) -> bool:
        return time.monotonic() >= self.end


def wait_until(pred, timeout: float, interval: float = 0.1):
    """Seconds until ``pred()`` is truthy, or None after ``timeout``."""
    t0 = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 >= timeout:
            return None
        time.sleep(interval)


def run(cmd, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 0.1), cwd=REPO, **kw)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, -9, "", f"timed out after {timeout:.0f} s")


def netns(ns: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run(["ip", "netns", "exec", ns, *cmd], timeout=timeout)


# ---- the ledger -------------------------------------------------------------------------


def v4_of(i: int) -> str:
    """The i-th bulk IPv4 address: 100.64.10.1 upwards, .0 and .255 skipped (254 per /24)."""
    a = (100 << 24 | 64 << 16 | 10 << 8) + (i // 254) * 256 + i % 254 + 1
    if a >= (100 << 24 | 128 << 16):
        raise SystemExit("more bulk subscribers than 100.64.0.0/10 holds")
    return f"{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}"


def v6_of(j: int) -> str:
    """The j-th bulk IPv6 prefix (j counts the subscribers that have one)."""
    if j <= V6_64_LAST - V6_64_FIRST:
        return f"2001:db8:100:{V6_64_FIRST + j:x}::/64"
    k = j - (V6_64_LAST - V6_64_FIRST)  # 1, 2, ... inside 2001:db8:100:ffff::/64
    hi, lo = k >> 16, k & 0xFFFF
    return f"2001:db8:100:ffff::{hi:x}:{lo:x}/128" if hi else f"2001:db8:100:ffff::{lo:x}/128"


def bulk_rows(n: int):
    """(id, name, v4, v6 or None) of the n bulk subscribers; ids 1..n (the config's come after)."""
    j = 0
    for i in range(n):
        v6 = None
        if i % 5:
            v6 = v6_of(j)
            j += 1
        yield i + 1, f"b{i}", v4_of(i), v6


def check_addressing() -> None:
    import ipaddress

    for j in (0, 1, 65278, 65279, 65280, 65281, 65535 + 65279, 65536 + 65279, 800_000):
        net = v6_of(j)
        assert str(ipaddress.ip_network(net)) == net, net
        assert ipaddress.ip_network(net).subnet_of(ipaddress.ip_network("2001:db8:100::/48")), net
    for i in (0, 253, 254, 1_000_000):
        a = ipaddress.ip_address(v4_of(i))
        assert a.packed[3] not in (0, 255) and a in ipaddress.ip_network("100.64.0.0/10"), a
        assert a >= ipaddress.ip_address("100.64.10.0"), a


def build_ledger(db: Path, n: int, balance: int) -> float:
    """N subscribers and their addresses, by executemany in one transaction; seconds taken."""
    from accounting.ledger import Ledger

    t0 = time.perf_counter()
    Ledger.open(db).close()  # the schema, every migration
    con = sqlite3.connect(db, isolation_level=None)
    try:
        con.execute("PRAGMA synchronous = OFF")
        con.execute("BEGIN")
        now = time.time_ns()
        subs, addrs = [], []
        for sid, name, v4, v6 in bulk_rows(n):
            subs.append((sid, name, "lab", "EUR", balance, balance, 0, 1, now))
            addrs.append((f"{v4}/32", sid))
            if v6:
                addrs.append((v6, sid))
            if len(subs) >= 100_000:
                _insert(con, subs, addrs)
                subs, addrs = [], []
                say(f"  ledger: {sid:,} subscribers")
        _insert(con, subs, addrs)
        con.execute("COMMIT")
    finally:
        con.close()
    return time.perf_counter() - t0


def _insert(con, subs, addrs) -> None:
    con.executemany("INSERT INTO subscribers (id, name, tariff, currency, opening_balance, balance, credit_limit, "
                    "active, created_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", subs)
    con.executemany("INSERT INTO addresses (network, subscriber_id) VALUES (?, ?)", addrs)


def ledger_bytes(db: Path, name: str) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("SELECT coalesce(sum(u.bytes), 0) FROM usage u JOIN subscribers s "
                           "ON s.id = u.subscriber_id WHERE s.name = ?", (name,)).fetchone()[0]
    finally:
        con.close()


def bulk_upload(db: Path, since: int) -> tuple[int, int]:
    """(bulk subscribers with upload rows, their upload packets) in the ledger's minutes from ``since``."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("SELECT count(DISTINCT u.subscriber_id), coalesce(sum(u.packets), 0) FROM usage u "
                           "JOIN subscribers s ON s.id = u.subscriber_id WHERE u.minute >= ? AND u.direction = 0 "
                           "AND s.name LIKE 'b%'", (since,)).fetchone()
    finally:
        con.close()


def has_import() -> bool:
    return run([*TOLLGATE, "subscriber", "import", "--help"], timeout=30).returncode == 0


def time_import(work: Path, config: Path, n: int, timeout: float) -> str | float:
    """``tollgate subscriber import`` of the same N (JSON lines) into a fresh ledger."""
    help_text = run([*TOLLGATE, "subscriber", "import", "--help"], timeout=30).stdout
    src = work / "import.jsonl"
    with open(src, "w") as f:
        for _sid, name, v4, v6 in bulk_rows(n):
            f.write(json.dumps({"name": name, "tariff": "lab", "balance": "100.00",
                                "addresses": [f"{v4}/32"] + ([v6] if v6 else [])}) + "\n")
    db = work / "import.db"
    t0 = time.perf_counter()
    proc = run([*TOLLGATE, "subscriber", "import", str(src), "-c", str(config), "--db", str(db)], timeout=timeout)
    dt = time.perf_counter() - t0
    src.unlink()
    imported = None
    if proc.returncode == 0:
        con = sqlite3.connect(db)
        try:
            imported = con.execute("SELECT count(*) FROM subscribers").fetchone()[0]
        finally:
            con.close()
    for p in work.glob("import.db*"):
        p.unlink()
    if proc.returncode == -9:
        return f"> {timeout:.0f} s"
    if proc.returncode:
        first = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["?"]
        say(f"  import failed (exit {proc.returncode}): {first[0]}\n{help_text[:600]}")
        return f"failed: exit {proc.returncode}: {first[0][:80]}"
    if imported != n:
        return f"{dt:.1f} s, but {imported} of {n} subscribers in the ledger"
    return dt


# ---- the running gateway ----------------------------------------------------------------


class Gateway:
    def __init__(self, lab, work: Path, config: Path, db: Path, extra=(), n: int = 0, source: str = "nfqueue") -> None:
        self.lab, self.work, self.config, self.db, self.extra = lab, work, config, db, list(extra)
        self.source = source
        self.proc: subprocess.Popen | None = None
        self.t0 = 0.0
        if source == "ebpf":  # the lab's four subscriber interfaces, slots for N and the lab's own, our own pins
            self.extra += ["--source", "ebpf", "--source-option", f"pin_dir={EBPF_PIN}", "--source-option",
                           "interfaces=s1,s2,s3,s4", "--source-option", f"max_slots={n + 64}"]

    def start(self) -> None:
        log = open(self.work / "gateway.log", "a")
        self.t0 = time.monotonic()
        # the eBPF source pins its maps in the host's bpffs: `ip netns exec` would mount a private /sys, so the
        # gateway enters only the lab's network namespace
        enter = ["nsenter", f"--net=/run/netns/{self.lab.gw}"] if self.source == "ebpf" else \
            ["ip", "netns", "exec", self.lab.gw]
        self.proc = subprocess.Popen([*enter, *TOLLGATE, "-v", "run", "-c",
                                      str(self.config), "--db", str(self.db), *self.extra],
                                     cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONFAULTHANDLER": "1"})  # a crash leaves its stacks

    @property
    def pid(self) -> int:
        return self.proc.pid  # `ip netns exec` and nsenter exec the command: the same process

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                say("  gateway did not stop on SIGTERM: SIGKILL")
                self.proc.kill()
                self.proc.wait()

    def log_tail(self) -> str:
        try:
            return (self.work / "gateway.log").read_text()[-1500:]
        except OSError:
            return ""

    def get(self, path: str, token: str | None = None, timeout: float = 30) -> tuple[int, str, float]:
        """(HTTP status, body, seconds) of a GET on the gateway's port, from its own namespace."""
        hdr = ["-H", f"Authorization: Bearer {token}"] if token else []
        proc = netns(self.lab.gw, "curl", "-s", "-m", str(int(max(1, timeout))), *hdr, "-w",
                     "\n%{http_code} %{time_total}", f"http://127.0.0.1:8080{path}", timeout=timeout + 5)
        body, _, tail = proc.stdout.rpartition("\n")
        try:
            code, secs = tail.split()
            return int(code), body, float(secs)
        except ValueError:
            return 0, "", 0.0

    def health(self) -> dict | None:
        code, body, _ = self.get("/healthz", timeout=5)
        if code == 0:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return None

    def metrics(self, timeout: float = 30) -> str:
        return self.get("/metrics", timeout=timeout)[1]

    def status(self) -> dict:
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
        return out

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / HZ  # utime, stime (fields 14, 15), all threads

    def tollgate(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return run([*TOLLGATE, *args, "-c", str(self.config), "--db", str(self.db)], timeout=timeout)


def metric(text: str, name: str, subscriber: str | None = None) -> float | None:
    label = r"\{subscriber=\"" + re.escape(subscriber) + r"\"\}" if subscriber else ""
    m = re.search(rf"^{re.escape(name)}(?:_total)?{label} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def kernel_bytes(gw: "Gateway", i: int) -> int | None:
    """Bytes the kernel counted for lab subscriber i, both ways, IPv4 and IPv6: our nft table's (nfqueue) or
    the eBPF program's maps (ebpf)."""
    if gw.source == "ebpf":
        return map_bytes(gw.db, f"s{i}")
    return nft_bytes(gw.lab, i)


def map_bytes(db: Path, name: str) -> int | None:
    """What the tc program passed for subscriber ``name`` in every zone and direction, less what the kernel
    dropped after it (the refunds), read through the pins: what the ledger must hold once flushed."""
    from ext.bpfmaps import Maps

    con = sqlite3.connect(db)
    try:
        row = con.execute("SELECT id FROM subscribers WHERE name = ?", (name,)).fetchone()
    finally:
        con.close()
    if row is None:
        return None
    with Maps.open(EBPF_PIN) as maps:
        return sum(maps.counter(row[0], z, d).used - maps.refund(row[0], z, d)[0]
                   for z in range(maps.n_zones) for d in (0, 1))


def nft_bytes(lab, i: int) -> int | None:
    """Bytes our nft table counted for lab subscriber i, both ways, IPv4 and IPv6: four elements, read one by one
    (``nft get element``) so that the read does not cost a listing of the whole table."""
    total = 0
    for way in ("up", "down"):
        for slot, key in (("4", lab.sub_addr4(i)), ("6_64", f"2001:db8:100:{i:x}::")):
            proc = netns(lab.gw, "nft", "get", "element", "inet", "tollgate", f"{way}{slot}", f"{{ {key} }}",
                         timeout=60)
            m = re.search(r"counter packets \d+ bytes (\d+)", proc.stdout)
            if proc.returncode or not m:
                return None
            total += int(m.group(1))
    return total


def ping(lab, i: int, count: int = 3) -> None:
    """A few pings from lab subscriber i to the upstream, IPv4 and IPv6 (bounded in count and time)."""
    for fam, dst in (("-4", "198.18.0.2"), ("-6", "2001:db8:198::2")):
        netns(lab.sub(i), "ping", fam, "-q", "-c", str(count), "-i", "0.2", "-W", "1", "-s", "100", dst, timeout=15)


BLASTER = r"""
import socket, struct, sys, time
srcs, rate, seconds = open(sys.argv[1]).read().split(), int(sys.argv[2]), float(sys.argv[3])
dst = socket.inet_aton("198.18.0.2")
payload = bytes(36)
pkts = [struct.pack("!BBHHHBBH4s4s", 0x45, 0, 64, 0, 0x4000, 64, 17, 0, socket.inet_aton(a), dst)
        + struct.pack("!HHHH", 40000 + k % 20000, 9, 44, 0) + payload for k, a in enumerate(srcs)]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
total, k, t0 = int(rate * seconds), 0, time.monotonic()
sent = 0
while sent < total and time.monotonic() - t0 < seconds + 5:
    due = min(total, int((time.monotonic() - t0) * rate) + 1)
    while sent < due:
        s.sendto(pkts[k], ("198.18.0.2", 0))
        k = (k + 1) % len(pkts)
        sent += 1
    time.sleep(0.005)
print(sent)
"""


# ---- one size ---------------------------------------------------------------------------


def measure(n: int, args, out: dict) -> None:
    from accounting.money import parse_amount
    from gateway.lab import lab_config, lab_down, lab_up

    dl = Deadline(args.size_timeout)
    out["source"] = args.source
    out["commit"], dirty = git_commit()  # others' work in progress runs too: say which files differed
    out["dirty_files"] = " ".join(dirty)
    work = Path(tempfile.mkdtemp(prefix=f"tollgate-scale-{n}-", dir=args.workdir))
    config, db = work / "tollgate.toml", work / "ledger.db"
    # s1..s3 from the config (seeded at the first start, as an operator's would be); s4 is added by the CLI later
    config.write_text(lab_config(LAB_SUBS - 1))
    say(f"== {n:,} subscribers (work dir {work})")
    out["build_s"] = build_ledger(db, n, parse_amount("100.00", "EUR"))
    out["ledger_mb"] = db.stat().st_size / 1e6
    say(f"  ledger built in {out['build_s']:.1f} s, {out['ledger_mb']:.0f} MB")
    if not args.import_:
        out["import_s"] = "not run (--no-import)"
    elif has_import():
        say("  timing `tollgate subscriber import`")
        out["import_s"] = time_import(work, config, n, dl.left(args.measure_timeout * 2))
    else:
        out["import_s"] = "not built yet"
    lab = gw = blaster = None
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the lab's progress lines; stdout is for the tables
            lab = lab_up(LAB_SUBS, args.prefix)
        # replies to the bulk subscribers' addresses go back to lab subscriber 1, whose namespace sends for them
        netns(lab.gw, "ip", "route", "add", "100.64.0.0/10", "via", lab.sub_addr4(1), "dev", "s1", timeout=10)
        gw = Gateway(lab, work, config, db, args.run_args, n, args.source)
        start_and_count(gw, lab, args, dl, out, "")
        if not gw.alive() or out.get("healthz_s") is None or isinstance(out.get("healthz_s"), str):
            return
        if not gw.alive():
            return
        if args.source == "ebpf":  # the idle window begins once the loop has granted what the start left
            all_granted(gw, dl, args, out, "")
        settle(gw, 3)
        steps = [lambda: idle_cpu(gw, args, out), lambda: flush_lag(gw, args, out, dl)]
        if args.py_spy:  # after the idle measures, which it would disturb
            steps.append(lambda: spy_done(profile(gw, args, "idle", args.lag_seconds * 2), args, out, "profile_idle"))
        # before the bulk subscribers send: /metrics shows the --metrics-subscribers (1000) busiest only
        steps += [lambda: topups(gw, lab, args, out, dl), lambda: live_add(gw, lab, args, out, dl)]
        held = []
        steps += [lambda: held.append(active_lag(gw, lab, n, args, out, dl, work)),
                  lambda: commands(gw, out, dl, args), lambda: nft_table(lab, out, dl, args)]
        for step in steps:
            if not gw.alive():  # the rest would only wait for a dead gateway
                out["error"] = f"the gateway exited ({gw.proc.returncode}) {time.monotonic() - gw.t0:.0f} s after its start"
                say(f"  {out['error']}: {gw.log_tail()}")
                return
            if dl.over:
                out["error"] = f"the size's time bound ({args.size_timeout:.0f} s) ran out"
                break
            step()
            blaster = held[0] if held else blaster
        if not gw.alive():
            out["error"] = f"the gateway exited ({gw.proc.returncode}) {time.monotonic() - gw.t0:.0f} s after its start"
            return
        out["rss_peak_mb"] = int(gw.status()["VmHWM"].split()[0]) / 1024
        out["rss_now_mb"] = int(gw.status()["VmRSS"].split()[0]) / 1024
        if args.restart and not dl.over:
            say("  restart: SIGTERM, `tollgate run` again")
            gw.stop()
            start_and_count(gw, lab, args, dl, out, "restart_")
            if args.source == "ebpf" and gw.alive():
                all_granted(gw, dl, args, out, "restart_")
            if gw.alive() and not isinstance(out.get("restart_counted_s"), str):
                time.sleep(min(10.0, dl.left(10)))  # a few flush rounds and a drift check after the restart
            if not gw.alive():
                out["restart_alive"] = f"no: exited ({gw.proc.returncode}) after {time.monotonic() - gw.t0:.0f} s"
                say(f"  the restarted gateway exited with {gw.proc.returncode}: {gw.log_tail()}")
            else:
                out["restart_alive"] = "yes"
                out["restart_rss_peak_mb"] = int(gw.status()["VmHWM"].split()[0]) / 1024
    finally:
        if blaster is not None and blaster.poll() is None:
            blaster.kill()
        if gw is not None:
            gw.stop()
            if args.keep:
                say(f"  gateway log: {work / 'gateway.log'}")
        if lab is not None:
            if args.source == "ebpf":  # the program stays attached and pinned without a daemon: take it off
                from ext.bpfmaps import Maps
                from policy import bpf
                try:
                    bpf.detach(None, EBPF_PIN, netns=lab.gw, unpin=False)
                finally:
                    Maps.unpin(EBPF_PIN)
            with contextlib.redirect_stdout(sys.stderr):
                lab_down(args.prefix)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    if args.pps_packets and not dl.over:
        engine_pps(n, args, out)


def start_and_count(gw: Gateway, lab, args, dl: Deadline, out: dict, tag: str) -> None:
    say(f"  {tag or 'first '}start: `tollgate run`, waiting for /healthz (bound {dl.left(args.start_timeout):.0f} s)")
    gw.start()
    spy = profile(gw, args, f"{tag}start")
    bound = dl.left(args.start_timeout)
    up = wait_until(lambda: not gw.alive() or gw.health() is not None, bound, 0.2)
    if spy is not None:
        spy_done(spy, args, out, f"profile_{tag}start")
    if not gw.alive():
        out[f"{tag}healthz_s"] = "exited"
        say(f"  the gateway exited: {gw.log_tail()}")
        return
    if up is None:
        out[f"{tag}healthz_s"] = f"> {bound:.0f} s"
        say(f"  no /healthz within {bound:.0f} s")
        return
    out[f"{tag}healthz_s"] = time.monotonic() - gw.t0
    say(f"  /healthz after {out[f'{tag}healthz_s']:.1f} s")

    def counted() -> bool:
        if not gw.alive():
            return True
        ping(lab, 1, 1)
        return (metric(gw.metrics(), "tollgate_subscriber_bytes", "s1") or 0) > 0

    bound = dl.left(args.measure_timeout)
    got = wait_until(counted, bound, 0.2)
    if not gw.alive():
        out[f"{tag}counted_s"] = f"exited ({gw.proc.returncode}) after {time.monotonic() - gw.t0:.0f} s"
        say(f"  the gateway exited with {gw.proc.returncode}: {gw.log_tail()}")
        return
    if got is None:
        out[f"{tag}counted_s"] = f"> {time.monotonic() - gw.t0:.0f} s"
        return
    out[f"{tag}counted_s"] = time.monotonic() - gw.t0
    say(f"  s1's traffic counted after {out[f'{tag}counted_s']:.1f} s")
    if tag:
        return
    ping(lab, 2, 2)  # s2 appears in /metrics too (its balance is watched for the top-ups)
    # exact to the byte: the ledger against our nft table, once both are still (flushes every second)
    last = [None]

    def still() -> bool:
        pair = (ledger_bytes(gw.db, "s1"), kernel_bytes(gw, 1))
        same = pair == last[0] and pair[0] == pair[1]
        last[0] = pair
        return same

    wait_until(still, dl.left(min(args.measure_timeout, 60)), 1.0)
    led, ker = last[0] or (None, None)
    out["exact"] = f"yes ({led} B)" if led is not None and led == ker else f"no: ledger {led} B, kernel {ker} B"
    say(f"  s1: ledger {led} B, kernel {ker} B")


def profile(gw: Gateway, args, name: str, seconds: float | None = None):
    """py-spy (``--py-spy PATH``, not a dependency) recording the gateway: collapsed stacks at 50 Hz."""
    if not args.py_spy:
        return None
    out = Path(args.workdir) / f"{gw.work.name}-py-spy-{name}.txt"  # beside the work dir, which goes at the end
    cmd = [args.py_spy, "record", "--pid", str(gw.pid), "--format", "raw", "-r", "50", "--nonblocking", "-o", str(out)]
    proc = subprocess.Popen(cmd + ["-d", str(int(seconds or 3600))], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    if seconds:
        try:
            proc.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc, out


def spy_done(spy, args, out: dict, key: str) -> None:
    """Stop a recording (SIGINT: py-spy writes what it has) and keep its top steps: the share of the
    samples each function is on the stack of, the ten largest below the thread's entry points."""
    proc, path = spy
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    shares, total = {}, 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        out[key] = "no py-spy output"
        return
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        for fn in {f.split(" (")[0] for f in stack.split(";")}:
            shares[fn] = shares.get(fn, 0) + int(count)
    skip = {"_run_module_as_main", "_run_code", "<module>", "main", "cmd_run", "run", "Gateway.start",
            "Thread._bootstrap", "Thread._bootstrap_inner", "Thread.run", "Gateway._spawn.<locals>.guarded"}
    top = sorted(((n, fn) for fn, n in shares.items() if fn not in skip), reverse=True)[:10]
    out[key] = ", ".join(f"{fn} {100 * n / max(1, total):.0f}%" for n, fn in top) + f" ({total} samples; {path})"
    say(f"  {key}: {out[key]}")


def all_granted(gw: Gateway, dl: Deadline, args, out: dict, tag: str) -> None:
    """eBPF: seconds from /healthz until the loop has granted every subscriber the start left to it
    (``start_grants_left`` in /healthz, gateway/sources/ebpf.py START_GRANTS). Until then a subscriber's
    first packets are refused, and the loop's work is not idle."""
    bound = dl.left(args.start_timeout)
    t0 = time.monotonic()
    got = wait_until(lambda: not gw.alive() or ((gw.health() or {}).get("queue", {}).get("ebpf", {})
                                                .get("start_grants_left") == 0), bound, 0.5)
    out[f"{tag}granted_s"] = time.monotonic() - t0 if got is not None and gw.alive() else f"> {bound:.0f} s"
    say(f"  every subscriber granted {fmt(out[f'{tag}granted_s'], 's')} after /healthz")


def settle(gw: Gateway, seconds: float) -> None:
    time.sleep(seconds)


def idle_cpu(gw: Gateway, args, out: dict) -> None:
    say(f"  idle CPU over {args.idle_seconds} s")
    c0, t0 = gw.cpu_seconds(), time.monotonic()
    time.sleep(args.idle_seconds)
    out["idle_cpu_pct"] = 100 * (gw.cpu_seconds() - c0) / (time.monotonic() - t0)
    say(f"  idle CPU {out['idle_cpu_pct']:.1f}% of a core")


def sample_lag(gw: Gateway, seconds: float) -> list[float]:
    lags, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        v = metric(gw.metrics(timeout=10), "tollgate_flush_lag_seconds")
        if v is not None:
            lags.append(v)
        time.sleep(0.25)
    return lags


def flush_lag(gw: Gateway, args, out: dict, dl: Deadline) -> None:
    lags = sample_lag(gw, dl.left(args.lag_seconds))
    if lags:
        out["lag_idle_max_s"], out["lag_idle_mean_s"] = max(lags), statistics.mean(lags)
        say(f"  flush lag idle: max {max(lags):.2f} s, mean {statistics.mean(lags):.2f} s ({len(lags)} samples)")


def active_lag(gw: Gateway, lab, n: int, args, out: dict, dl: Deadline, work: Path):
    """--active bulk subscribers sending at --active-pps in all (raw UDP with their source addresses from lab
    subscriber 1's namespace; the gateway routes their replies back there) while the flush lag is sampled."""
    k = min(args.active, n)
    if not k or dl.over:
        return None
    srcs = work / "active.txt"
    step = max(1, n // k)
    srcs.write_text("\n".join(v4_of(i) for i in range(0, step * k, step)))
    m0 = gw.metrics()
    p0 = metric(m0, "tollgate_packets") or 0
    since = int(time.time()) // 60 * 60  # the ledger's minute rows from the blast's first minute
    l0 = bulk_upload(gw.db, since)
    seconds = dl.left(args.lag_seconds)
    say(f"  flush lag with {k:,} subscribers active ({args.active_pps} packets/s for {seconds:.0f} s)")
    blaster = subprocess.Popen(["ip", "netns", "exec", lab.sub(1), sys.executable, "-c", BLASTER, str(srcs),
                                str(args.active_pps), str(seconds)], stdout=subprocess.PIPE, text=True)
    time.sleep(min(2.0, seconds / 4))  # the first flushes with them
    lags = sample_lag(gw, max(0.0, seconds - 2.0))
    try:
        sent = int(blaster.communicate(timeout=30)[0].strip() or 0)
    except (subprocess.TimeoutExpired, ValueError):
        blaster.kill()
        sent = 0
    time.sleep(2.5)
    m1 = gw.metrics()
    seen = len(re.findall(r'^tollgate_subscriber_bytes(?:_total)?\{subscriber="b\d+"\}', m1, re.M))
    out["active_seen"] = seen
    out["active_sent"] = sent
    out["active_rated"] = int((metric(m1, "tollgate_packets") or 0) - p0)
    # every packet sent is one bulk subscriber's upload in the ledger: the whole count, not /metrics' busiest 1000
    l1 = bulk_upload(gw.db, since)
    out["active_ledger_subscribers"], out["active_ledger_packets"] = l1[0], l1[1] - l0[1]
    if lags:
        out["lag_active_max_s"], out["lag_active_mean_s"] = max(lags), statistics.mean(lags)
    say(f"  flush lag active: max {fmt(out.get('lag_active_max_s'), 's')}; sent {sent}, engine packets +{out['active_rated']}, "
        f"{seen} bulk subscribers in /metrics; ledger: +{out['active_ledger_packets']} upload packets of "
        f"{out['active_ledger_subscribers']} bulk subscribers")
    return blaster


def topups(gw: Gateway, lab, args, out: dict, dl: Deadline) -> None:
    say(f"  {args.repeats} top-ups of s2 reaching the engine")
    ping(lab, 2, 2)
    wait_until(lambda: metric(gw.metrics(), "tollgate_subscriber_balance", "s2") is not None,
               dl.left(args.measure_timeout), 0.2)
    times, cli = [], []
    for r in range(args.repeats):
        before = metric(gw.metrics(), "tollgate_subscriber_balance", "s2")
        if before is None:
            out["topup_s"] = "s2 not in /metrics"
            return
        t0 = time.monotonic()
        proc = gw.tollgate("topup", "s2", "1.00", "--key", f"scale-{os.getpid()}-{r}",
                           timeout=dl.left(args.measure_timeout))
        t1 = time.monotonic()
        cli.append(t1 - t0)
        if proc.returncode:
            out["topup_s"] = f"topup failed: {(proc.stderr or proc.stdout).strip()[-80:]}"
            return
        bound = dl.left(args.measure_timeout)
        # 1.00 more, less what s2's own pings cost meanwhile (micro-units: the eBPF path charges them a poll
        # after /metrics showed the balance read as ``before``)
        got = wait_until(lambda: (metric(gw.metrics(), "tollgate_subscriber_balance", "s2") or 0) >= before + 0.99e9,
                         bound, 0.05)
        if got is None:
            times.append(float("inf"))
            break
        times.append(time.monotonic() - t1)
    out["topup_cli_s"] = statistics.median(cli)
    if times:
        worst = max(times)
        out["topup_worst_s"] = worst if worst != float("inf") else f"> {args.measure_timeout:.0f} s"
        out["topup_median_s"] = statistics.median(times) if worst != float("inf") else None
    say(f"  top-ups: {['%.2f' % t for t in times]} s after the CLI, the CLI {out['topup_cli_s']:.2f} s")


def live_add(gw: Gateway, lab, args, out: dict, dl: Deadline) -> None:
    """``tollgate subscriber add s4`` while s4 pings: until /healthz counts one subscriber more (in the engine),
    and until /metrics has its bytes (counted)."""
    health = []
    wait_until(lambda: health.append(gw.health()) or health[-1] is not None, dl.left(args.measure_timeout), 0.2)
    count = (health[-1] or {}).get("subscribers")
    if count is None:
        out["add_engine_s"] = "no /healthz before the add"
        return
    pinger = subprocess.Popen(["ip", "netns", "exec", lab.sub(4), "ping", "-4", "-q", "-i", "0.2", "-W", "1",
                               "-c", str(int(5 * args.measure_timeout) + 50), "198.18.0.2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        say("  `tollgate subscriber add s4` reaching the engine")
        t0 = time.monotonic()
        proc = gw.tollgate("subscriber", "add", "s4", "--tariff", "lab", "--balance", "100.00", "--address",
                           f"{lab.sub_addr4(4)}/32", "2001:db8:100:4::/64", timeout=dl.left(args.measure_timeout))
        t1 = time.monotonic()
        out["add_cli_s"] = t1 - t0
        if proc.returncode:
            out["add_engine_s"] = f"add failed: {(proc.stderr or proc.stdout).strip()[-80:]}"
            return
        bound = dl.left(args.measure_timeout)
        engine = wait_until(lambda: ((gw.health() or {}).get("subscribers") or 0) > count, bound, 0.05)
        out["add_engine_s"] = engine if engine is not None else f"> {bound:.0f} s"
        bound = dl.left(args.measure_timeout)
        counted = wait_until(lambda: (metric(gw.metrics(), "tollgate_subscriber_bytes", "s4") or 0) > 0, bound, 0.1)
        out["add_counted_s"] = (time.monotonic() - t1) if counted is not None else f"> {bound:.0f} s"
        say(f"  s4: CLI {fmt(out['add_cli_s'], 's')}, in the engine {fmt(out['add_engine_s'], 's')}, counted "
            f"{fmt(out['add_counted_s'], 's')} after the CLI")
    finally:
        pinger.kill()
        pinger.wait()


def _best(fn, times: int = 3):
    vals = [fn() for _ in range(times)]
    ok = [v for v in vals if isinstance(v, float)]
    return statistics.median(ok) if len(ok) == len(vals) else next(v for v in vals if not isinstance(v, float))


def commands(gw: Gateway, out: dict, dl: Deadline, args) -> None:
    say("  CLI and API times (median of 3)")

    def cli(*a):
        def go():
            t0 = time.monotonic()
            proc = gw.tollgate(*a, timeout=dl.left(args.measure_timeout))
            return time.monotonic() - t0 if proc.returncode == 0 else f"exit {proc.returncode}"
        return go

    out["cli_list_s"] = _best(cli("subscriber", "list", "--limit", "50"))
    out["cli_show_s"] = _best(cli("subscriber", "show", "b5"))
    out["cli_top_s"] = _best(cli("top"))
    out["cli_usage_s"] = _best(cli("usage", "s1"))
    tok = gw.tollgate("token", "create", f"scale{os.getpid()}", "--role", "admin", timeout=60)
    token = tok.stdout.strip().splitlines()[-1] if tok.returncode == 0 and tok.stdout.strip() else None
    if token is None:
        out["api_list_s"] = f"no token: {tok.stderr.strip()[-80:]}"
    else:
        def api():
            code, body, secs = gw.get("/api/v1/subscribers?limit=50", token, timeout=dl.left(args.measure_timeout))
            return secs if code == 200 else f"HTTP {code}"
        out["api_list_s"] = _best(api)
    out["metrics_s"] = _best(lambda: gw.get("/metrics", timeout=60)[2])
    say("  " + ", ".join(f"{k[:-2]} {fmt(out[k], 's')}" for k in ("cli_list_s", "cli_show_s", "cli_top_s", "cli_usage_s",
                                                                    "api_list_s", "metrics_s")))


def nft_table(lab, out: dict, dl: Deadline, args) -> None:
    bound = dl.left(args.measure_timeout * 2)
    say(f"  `nft list table inet tollgate` (bound {bound:.0f} s)")
    t0 = time.monotonic()
    proc = netns(lab.gw, "nft", "list", "table", "inet", "tollgate", timeout=bound)
    dt = time.monotonic() - t0
    if proc.returncode == -9:
        out["nft_list_s"] = f"> {bound:.0f} s"
        return
    out["nft_list_s"] = dt
    out["nft_lines"] = proc.stdout.count("\n")
    out["nft_counters"] = proc.stdout.count("counter packets")
    say(f"  nft: {out['nft_lines']:,} lines, {out['nft_counters']:,} counters, listed in {dt:.2f} s")


def engine_pps(n: int, args, out: dict) -> None:
    """The compiled engine alone with N subscribers: bench_engine.py's world and random packet mix."""
    import gc
    import random

    sys.path.insert(0, str(REPO / "benches"))
    import bench_engine as be
    from ext import EngineC

    if EngineC is None:
        out["engine_mpps"] = "not built"
        return
    say(f"  engine alone: {n:,} subscribers, {args.pps_packets:,} packets")
    rng = random.Random(1)
    rules = be.zone_rules(rng, 1000)
    engine, _, _ = be.build_engine(EngineC, n, rules)
    batches = be.make_batches(rng, n, rules, args.pps_packets)
    out["engine_mpps"] = be.run(engine, batches, 3) / 1e6
    del engine, batches
    gc.collect()
    say(f"  engine: {out['engine_mpps']:.2f} Mpps")


# ---- tables -----------------------------------------------------------------------------

ROWS = [  # key, label, unit (s: seconds; MB; %; n: a count; text)
    ("commit", "commit measured (+dirty: uncommitted changes in the work tree)", "text"),
    ("source", "data path (--source)", "text"),
    ("build_s", "ledger of N built by this bench (SQL executemany)", "s"),
    ("ledger_mb", "ledger file, MB", "MB"),
    ("import_s", "`tollgate subscriber import` of N", "s"),
    ("healthz_s", "`tollgate run` to /healthz (first start)", "s"),
    ("counted_s", "`tollgate run` to s1's traffic counted", "s"),
    ("granted_s", "eBPF: then every subscriber granted (the start's grants the loop makes)", "s"),
    ("exact", "s1: ledger bytes = the kernel's (nft counters, or the maps less refunds)", "text"),
    ("restart_healthz_s", "restart (SIGTERM, run) to /healthz", "s"),
    ("restart_counted_s", "restart to s1's traffic counted", "s"),
    ("restart_granted_s", "eBPF: then every subscriber granted again", "s"),
    ("restart_alive", "restarted gateway still running 10 s after counting", "text"),
    ("rss_peak_mb", "peak resident memory (VmHWM), MB", "MB"),
    ("rss_now_mb", "resident memory after the measures, MB", "MB"),
    ("restart_rss_peak_mb", "peak resident memory after a restart, MB", "MB"),
    ("idle_cpu_pct", "idle CPU, % of a core", "%"),
    ("lag_idle_max_s", "flush lag idle, max (flush every 1 s)", "s"),
    ("lag_active_max_s", "flush lag with the bulk subscribers active, max", "s"),
    ("active_seen", "bulk subscribers in /metrics after (capped at 1000)", "n"),
    ("active_sent", "their packets sent (UDP, 64 B each)", "n"),
    ("active_rated", "their packets rated by the engine (nfqueue; 0 on ebpf: the kernel meters)", "n"),
    ("active_ledger_packets", "their upload packets in the ledger after", "n"),
    ("active_ledger_subscribers", "bulk subscribers with upload in the ledger after", "n"),
    ("topup_worst_s", "a top-up reaching the engine, worst (after the CLI)", "s"),
    ("topup_median_s", "a top-up reaching the engine, median", "s"),
    ("topup_cli_s", "`tollgate topup` itself", "s"),
    ("add_cli_s", "`tollgate subscriber add` itself", "s"),
    ("add_engine_s", "a subscriber added by the CLI in the engine", "s"),
    ("add_counted_s", "... and its traffic counted", "s"),
    ("nft_lines", "nft table: lines", "n"),
    ("nft_counters", "nft table: counters", "n"),
    ("nft_list_s", "`nft list table inet tollgate`", "s"),
    ("cli_list_s", "`tollgate subscriber list --limit 50`", "s"),
    ("cli_show_s", "`tollgate subscriber show b5`", "s"),
    ("cli_top_s", "`tollgate top`", "s"),
    ("cli_usage_s", "`tollgate usage s1`", "s"),
    ("api_list_s", "`GET /api/v1/subscribers?limit=50`", "s"),
    ("metrics_s", "`GET /metrics`", "s"),
    ("error", "error", "text"),
    ("engine_mpps", "engine alone, Mpps (random mix, 1 core)", "M"),
    ("ledger_growth", "ledger bytes per active subscriber-day", "text"),
    ("profile_start", "py-spy, start: share of samples", "text"),
    ("profile_idle", "py-spy, idle: share of samples", "text"),
    ("profile_restart_start", "py-spy, restart: share of samples", "text"),
]


def fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if unit == "s":
        return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"
    if unit == "MB":
        return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"
    if unit == "%":
        return f"{value:.1f}%"
    if unit == "n":
        return f"{value:,.0f}"
    if unit == "M":
        return f"{value:.2f}"
    return str(value)


def table(head: list[str], lines: list[list[str]], markdown: bool) -> str:
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    return "\n".join(["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
                     + ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(l, widths)))
                        for l in lines])


def result_table(doc: dict, markdown: bool) -> str:
    sizes = list(doc["results"])
    head = ["N subscribers"] + [f"{int(s):,}" for s in sizes]
    lines = [[label] + [fmt(doc["results"][s].get(key), unit) for s in sizes]
             for key, label, unit in ROWS if any(key in doc["results"][s] for s in sizes)]
    return table(head, lines, markdown)


def compare_table(before: dict, after: dict, markdown: bool) -> str:
    sizes = [s for s in after["results"] if s in before["results"]]
    if not sizes:
        return "no size in common between the two runs"
    head = ["row"]
    for s in sizes:
        head += [f"{int(s):,} before", f"{int(s):,} after", "after/before"]
    lines = []
    for key, label, unit in ROWS:
        if not any(key in before["results"][s] or key in after["results"][s] for s in sizes):
            continue
        line = [label]
        for s in sizes:
            b, a = before["results"][s].get(key), after["results"][s].get(key)
            ratio = f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"
            line += [fmt(b, unit), fmt(a, unit), ratio]
        lines.append(line)
    return (f"before: {before.get('commit', '?')} ({before.get('date', '?')}); "
            f"after: {after.get('commit', '?')} ({after.get('date', '?')})\n\n" + table(head, lines, markdown))


def git_commit() -> tuple[str, list[str]]:
    """HEAD, "+dirty" when tracked files differ from it (others' work in progress is what runs), and which."""
    if os.environ.get("TOLLGATE_BENCH_COMMIT"):  # a tree exported with `git archive` (no .git): say which commit
        return os.environ["TOLLGATE_BENCH_COMMIT"], []
    head = run(["git", "rev-parse", "--short", "HEAD"], timeout=10).stdout.strip() or "unknown (no git work tree)"
    dirty = [line[3:] for line in run(["git", "status", "--porcelain", "--untracked-files=no"],
                                      timeout=30).stdout.splitlines() if line.strip()]
    return head + ("+dirty" if dirty else ""), dirty


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated subscriber counts (default 10000,100000;"
                    " 1000000 allowed: about 2 GB of RAM on --source ebpf, 5 GB on nfqueue)")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    ap.add_argument("--json", metavar="FILE", help="write the results (and commit, date, options) to FILE")
    ap.add_argument("--compare", metavar="BEFORE", help="a --json file of an earlier run: print both and the ratio "
                    "(with no --sizes given and an existing --json FILE, compares the two files without running)")
    ap.add_argument("--prefix", default="tscale", help="the lab's prefix (namespaces PREFIX-gw, ...)")
    ap.add_argument("--size-timeout", type=float, default=3600, help="bound on one size, all measures (s)")
    ap.add_argument("--start-timeout", type=float, default=600, help="bound on `tollgate run` to /healthz (s)")
    ap.add_argument("--measure-timeout", type=float, default=300, help="bound on each other wait (s)")
    ap.add_argument("--idle-seconds", type=float, default=10, help="window of the idle CPU measure")
    ap.add_argument("--lag-seconds", type=float, default=10, help="window of each flush-lag sampling")
    ap.add_argument("--active", type=int, default=1000, help="bulk subscribers sending during the active flush lag")
    ap.add_argument("--active-pps", type=int, default=2000, help="their packets per second, in all")
    ap.add_argument("--repeats", type=int, default=5, help="top-ups timed")
    ap.add_argument("--no-restart", dest="restart", action="store_false", help="skip the restart measure")
    ap.add_argument("--no-import", dest="import_", action="store_false", help="skip `tollgate subscriber import`")
    ap.add_argument("--pps-packets", type=int, default=200_000, help="packets for the engine-alone pps (0: skip)")
    ap.add_argument("--py-spy", metavar="PATH", help="a py-spy binary: profile the gateway's first start, its restart and 2 x "
                    "--lag-seconds of it idle (collapsed stacks in --workdir; the top steps in the results)")
    ap.add_argument("--workdir", default="/var/tmp", help="where the ledgers are built")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (ledger, config, gateway log)")
    ap.add_argument("--source", choices=("nfqueue", "ebpf"), default="nfqueue",
                    help="the data path: nfqueue (nft's counted sets, the default) or ebpf (the tc program and its "
                    "pinned maps; the kernel's bytes are read from the maps)")
    ap.add_argument("--run-arg", dest="run_args", action="append", default=[],
                    help="an extra argument for `tollgate run` (repeatable), e.g. --run-arg=--queues=0-1")
    args = ap.parse_args(argv)
    sizes_given = any(a == "--sizes" or a.startswith("--sizes=") for a in (argv or sys.argv[1:]))
    if args.compare and args.json and not sizes_given and Path(args.json).exists():
        before, after = json.loads(Path(args.compare).read_text()), json.loads(Path(args.json).read_text())
        print(compare_table(before, after, args.markdown))
        return 0
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    if not sizes or any(not 1 <= s <= 1_000_000 for s in sizes):
        ap.error("--sizes: counts from 1 to 1,000,000")
    if os.geteuid() != 0:
        ap.error("needs root (the lab builds network namespaces)")
    check_addressing()

    def interrupted(signum, frame):  # SIGTERM and SIGINT (ignored in background jobs otherwise): clean up, keep results
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    commit, dirty = git_commit()
    doc = {"commit": commit, "dirty_files": dirty, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "options": {k: v for k, v in vars(args).items() if k not in ("json", "compare")}, "results": {}}
    growth = REPO / "benches" / "bench_ledger_growth.py"
    for n in sizes:
        out = doc["results"][str(n)] = {}
        out["ledger_growth"] = "see benches/bench_ledger_growth.py" if growth.exists() else "not measured here"
        try:
            measure(n, args, out)
        except KeyboardInterrupt:
            out["error"] = "interrupted"
            say("interrupted")
            break
        except Exception as exc:  # one size failing does not lose the others
            out["error"] = f"{type(exc).__name__}: {exc}"
            say(f"  size {n:,} failed: {out['error']}")
        finally:
            if args.json:  # after each size: a long run interrupted keeps what it measured
                Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"commit {doc['commit']}, {doc['date']}, {os.cpu_count()} CPUs"
          + (f" (uncommitted changes in: {', '.join(dirty)})" if dirty else "") + "\n")
    print(result_table(doc, args.markdown))
    if args.compare:
        print()
        print(compare_table(json.loads(Path(args.compare).read_text()), doc, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
