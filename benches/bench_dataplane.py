#!/usr/bin/env python3
"""Data plane, side by side in one run (root; builds its own lab).

Through the lab's gateway, four ways, in one run on one lab:

* bare forwarding (nothing of ours in the gateway namespace);
* the eBPF path: ``tollgate run --source ebpf`` (the tc program of
  ext/bpf/tollgate.bpf.c on the subscriber veths, grants from the engine),
  started with ``nsenter --net`` so that its pins live in the host's bpffs;
  and the same program alone (loaded and attached by the bench, grants
  free, no daemon), which tells the program's cost from the daemon's;
* the nfqueue path: ``tollgate run`` (batched nfqueue reader, compiled
  engine, nftables; 1 queue);
* Python NetfilterQueue (the ``NetfilterQueue`` PyPI package, one callback
  per packet that accepts): the baseline. ``make bench`` installs it (it
  builds against Debian's libnetfilter-queue-dev); where it cannot be
  imported this column is skipped and the report says what is missing.

Rows: 64-byte IP packets per second received upstream (``benches/udpblast.c``,
sendmmsg x64 from one subscriber, counted by an nft counter in the upstream
namespace), TCP bulk (iperf3, Gbit/s at the receiver), and CPU per packet:
the busy jiffies of all CPUs in /proc/stat over the small-packet run (sender,
gateway, receiver and softirqs: everything the machine did) divided by the
packets received; its difference to bare forwarding is the CPU each path
adds per packet. "Our process": the user + system time of the path's own
process (the daemon, the NetfilterQueue consumer; /proc/<pid>/stat) over the
small-packet run, as a share of one CPU: on two CPUs that the sender, the
forwarding and the receiver already fill, what it takes is what the packet
rate loses. Each figure is measured ``--repeat`` times per path (median
and range printed), the paths interleaved round by round so that a noisy
neighbour hits all of them alike.

The eBPF program's own cost per packet, under that traffic: the kernel's BPF
statistics (``sysctl kernel.bpf_stats_enabled=1``, ``run_time_ns / run_cnt``
of the pinned programs) in a small-packet run of its own after the measured
ones (the statistics cost every program run two clock reads, so the rates
are measured with them off, as a gateway runs), with the maps
holding the lab's subscribers plus ``--fill`` bulk /32s (default 1000), and
again with ``--fill-large`` (e.g. 1000000; 0 skips it). The same figure
without traffic is benches/bench_bpf_load.py's (BPF_PROG_TEST_RUN).

Every queue, rule, table, tc filter and pin this bench makes is removed in a
``finally``, per stage and for the whole run (a consumer that dies does not
leave the lab's TCP waiting on a queue nobody reads: each stage checks its
consumer is alive before it measures, and tears down its rules at once).

``--diagnose`` adds three columns that split the eBPF path's cost: our nft
table as under ``--source ebpf`` alone (no program, no daemon: its hooks'
cost to every forwarded packet), the program and that table (no daemon), and
the eBPF path with the account chain of a counting source added back.

Then, as before, the nfqueue path's block latency (``--rounds``): subscribers run out of money again
and again, the gateway times breaching packet -> kernel set, p50 and p99.

    sudo .venv/bin/python benches/bench_dataplane.py [--seconds 3] [--repeat 2] [--fill-large 1000000] [--diagnose] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benches"))

from gateway.lab import UPSTREAM4, lab_config, lab_down, lab_up  # noqa: E402

PREFIX = "tgbench"
PIN = f"/sys/fs/bpf/tollgate-bench-dp-{os.getpid()}"
NFQ_BASELINE = """
import signal, sys
from netfilterqueue import NetfilterQueue
q = NetfilterQueue()
q.bind(0, lambda pkt: pkt.accept(), max_len=8192)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print("bound", flush=True)
q.run()
"""
LAB_NETS = ("100.64.1.2/32", "100.64.2.2/32", "2001:db8:100:1::/64", "2001:db8:100:2::/64")
CLEAN_NFQ = "nft delete table inet tollgate 2>/dev/null; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD; true"
HZ = os.sysconf("SC_CLK_TCK")


def ns(name: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", f"{PREFIX}-{name}", *cmd], capture_output=True, text=True,
                          timeout=timeout)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def tcp_gbps(seconds: float) -> float | None:
    out = ns("s1", "iperf3", "-c", UPSTREAM4, "-t", str(seconds), "--connect-timeout", "3000", "--json",
             timeout=seconds + 20)
    try:
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError):
        say(f"    iperf3 failed: {out.stdout[-300:]} {out.stderr[-300:]}")
        return None


BLAST = Path(tempfile.gettempdir()) / "tollgate-udpblast"
SINK = ("table inet sink {\n chain c {\n  type filter hook prerouting priority -300; policy accept;\n"
        "  udp dport 9 counter drop\n }\n}\n")


def busy_jiffies() -> int:
    """Busy time of all CPUs so far (user nice system irq softirq steal; not idle, not iowait)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)


def udp_pps(seconds: float) -> dict:
    """64-byte IP packets (36 bytes of payload) from subscriber 1 at full speed."""
    subprocess.run(["ip", "netns", "exec", f"{PREFIX}-up", "nft", "-f", "-"], input=SINK, text=True, check=True)
    try:
        j0, t0 = busy_jiffies(), time.monotonic()
        p = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-s1", str(BLAST), UPSTREAM4, "9", str(seconds), "36"],
                             stdout=subprocess.PIPE, text=True)
        sent = int(p.communicate(timeout=seconds + 30)[0] or 0)
        j1, t1 = busy_jiffies(), time.monotonic()
        out = ns("up", "nft", "-j", "list", "table", "inet", "sink").stdout
        received = next(item["counter"]["packets"] for rule in json.loads(out)["nftables"] if "rule" in rule
                        for item in rule["rule"]["expr"] if "counter" in item)
    finally:
        ns("up", "nft", "delete", "table", "inet", "sink")
    cpu = (j1 - j0) / HZ
    return {"pps": received / seconds, "lost": 100.0 * (sent - received) / max(sent, 1),
            "cpu_ns": cpu / max(received, 1) * 1e9, "cpus_busy": cpu / (t1 - t0)}


def health(port: int = 8080) -> dict | None:
    out = ns("gw", "curl", "-s", "-m", "2", f"http://127.0.0.1:{port}/healthz")
    try:
        return json.loads(out.stdout) if out.returncode == 0 else None
    except ValueError:
        return None


def start_gateway(work: Path, cfg: str, db: str, extra=(), ebpf: bool = False) -> subprocess.Popen:
    (work / "t.toml").write_text(cfg)
    enter = ["nsenter", f"--net=/run/netns/{PREFIX}-gw"] if ebpf else ["ip", "netns", "exec", f"{PREFIX}-gw"]
    proc = subprocess.Popen([*enter, sys.executable, "-m", "gateway.cli", "run", "-c", str(work / "t.toml"),
                             "--db", db, *extra], cwd=REPO, stdout=open(work / "gw.log", "a"),
                            stderr=subprocess.STDOUT)
    for _ in range(150):
        if proc.poll() is not None:
            break
        if health() is not None:
            return proc
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError((work / "gw.log").read_text()[-2000:])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def prog_stats() -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the pinned programs, both hooks summed (kernel BPF stats)."""
    from ext.bpfmaps import Maps

    t = n = 0
    with Maps.open(PIN) as maps:
        for d in (0, 1):
            info = dict(line.split(":", 1) for line in
                        Path(f"/proc/self/fdinfo/{maps.prog_fd(d)}").read_text().splitlines() if ":" in line)
            t += int(info.get("run_time_ns", "0").strip())
            n += int(info.get("run_cnt", "0").strip())
    return t, n


def fill_maps(n: int, first_slot: int) -> None:
    """``n`` bulk /32s (bench_scale's addresses) into the pinned maps, on slots the daemon does not own."""
    from bench_scale import v4_of
    from ext.bpfmaps import Maps

    with Maps.open(PIN) as maps:
        maps.set_subscribers([first_slot + i for i in range(n)], [v4_of(i) + "/32" for i in range(n)])


STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
STATS_SECONDS = 1.0  # the small-packet run that reads the program's own cost


@contextlib.contextmanager
def bpf_stats():
    """The kernel's BPF run-time statistics on for the block, then back as they were."""
    old = STATS.read_text().strip()
    STATS.write_text("1")
    try:
        yield
    finally:
        STATS.write_text(old)


def install_table(label: str, nets=(), count: bool = False) -> None:
    """Our nft table in the gateway namespace as the daemon installs it (``count=False``: as under the eBPF
    source), with ``nets`` in its counted sets, and no daemon."""
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from policy.nft import Enforcer; "
            f"e = Enforcer(queues=(), local_networks=['100.64.0.0/10', '2001:db8:100::/48'], count={count!r}); "
            f"e.install(); e.add_subscriber_addresses({list(nets)!r})")
    out = ns("gw", sys.executable, "-c", code)
    if out.returncode:
        raise RuntimeError(f"{label}: {out.stderr[-500:]}")


def proc_jiffies(pid: int) -> int:
    """User + system time of a process so far (its threads included), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class Path_:
    """One way through the gateway: set up, measured in rounds, torn down."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tcp: list[float] = []
        self.udp: list[dict] = []
        self.prog: list[float] = []
        self.daemon: list[float] = []  # share of one CPU its consumer process took in the small-packet runs
        self.note = ""

    def up(self, work: Path, args) -> None:
        pass

    def down(self) -> None:
        pass

    def alive(self) -> bool:
        return True

    def consumer(self) -> int | None:
        """The pid of the process of ours on this path (a daemon, a queue consumer), if any."""
        return None

    def measure(self, args) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.label}: its consumer is gone")
        self.tcp.append(tcp_gbps(args.seconds) or 0.0)
        if not self.alive():
            raise RuntimeError(f"{self.label}: its consumer is gone")
        pid = self.consumer()
        j0 = proc_jiffies(pid) if pid else 0
        self.udp.append(udp_pps(args.seconds))
        if pid:
            self.daemon.append((proc_jiffies(pid) - j0) / HZ / args.seconds)
        p0 = self.prog_stats()
        if p0 is not None:
            # The program's own cost, in a run of its own: BPF statistics cost every run of every program
            # two clock reads and a per-CPU update, so the rate runs above are made with them off.
            with bpf_stats():
                p0 = self.prog_stats()
                udp_pps(STATS_SECONDS)
                p1 = self.prog_stats()
            if p1[1] > p0[1]:
                self.prog.append((p1[0] - p0[0]) / (p1[1] - p0[1]))

    def prog_stats(self) -> tuple[int, int] | None:
        """(run_time_ns, run_cnt) of our tc program, where the path has one."""
        return None


class Bare(Path_):
    pass


class Nfqueue(Path_):
    def up(self, work, args):
        self.gw = start_gateway(work, lab_config(2, {1: "1000000", 2: "1000000"}), str(work / f"nfq{time.time_ns()}.db"))

    def alive(self):
        return self.gw.poll() is None

    def consumer(self):
        return self.gw.pid  # ip netns exec execs the daemon

    def down(self):
        try:
            stop(self.gw)
        finally:
            ns("gw", "sh", "-c", CLEAN_NFQ)


class Ebpf(Path_):
    def __init__(self, label: str, fill: int) -> None:
        super().__init__(label)
        self.fill = fill

    def up(self, work, args):
        from ext.bpfmaps import Maps

        Maps.unpin(PIN)
        slots = 16 + self.fill
        self.gw = start_gateway(work, lab_config(2, {1: "1000000", 2: "1000000"}),
                                str(work / f"ebpf{time.time_ns()}.db"), ebpf=True,
                                extra=["--source", "ebpf", "--source-option", f"pin_dir={PIN}",
                                       "--source-option", "interfaces=s1,s2", "--source-option",
                                       f"max_slots={slots}"])
        t0 = time.monotonic()
        fill_maps(self.fill, 16)
        say(f"    {self.fill:,} more /32s in the maps in {time.monotonic() - t0:.1f} s")

    def alive(self):
        return self.gw.poll() is None

    def consumer(self):
        return self.gw.pid  # nsenter execs the daemon

    def prog_stats(self):
        return prog_stats()

    def down(self):
        from ext.bpfmaps import Maps
        from policy import bpf

        try:
            stop(self.gw)
        finally:
            try:
                bpf.detach(None, PIN, netns=f"{PREFIX}-gw", unpin=False)
            finally:
                Maps.unpin(PIN)
                ns("gw", "nft", "delete", "table", "inet", "tollgate")


class EbpfWithAccount(Ebpf):
    """``--source ebpf`` with our nft table as a counting source has it (``--diagnose``): after the start the
    table is installed again with ``count=True`` and the lab's subscribers put in its counted sets, so every
    forwarded packet goes through the ``account`` chain, as it did under this source before it left the chain
    out (policy/nft.py, ``count``). Beside the eBPF column, in the same run and the same noise, it tells what
    leaving the chain out saves."""

    def up(self, work, args):
        super().up(work, args)
        install_table(self.label, LAB_NETS, count=True)


class EbpfProgram(Ebpf):
    """The tc program alone: loaded, filled and attached by the bench (grants free), no daemon. Beside
    the eBPF column it tells the program's cost from the daemon's (its polls, grants and heartbeat
    share the two CPUs with the traffic)."""

    def up(self, work, args):
        from bench_scale import v4_of
        from ext.bpfmaps import GRANT_FREE, Maps
        from ext.engine_py import ZoneRule
        from policy import bpf

        Maps.unpin(PIN)
        slots = 16 + self.fill
        maps = Maps.load(PIN, max_slots=slots, n_zones=2, default_zone=1, max_hosts4=slots)
        try:
            maps.set_zones([ZoneRule("100.64.0.0/10", 0), ZoneRule("2001:db8:100::/48", 0)])
            maps.set_subscribers([1, 1, 2, 2] + [16 + i for i in range(self.fill)],
                                 ["100.64.1.2/32", "2001:db8:100:1::/64", "100.64.2.2/32", "2001:db8:100:2::/64"]
                                 + [v4_of(i) + "/32" for i in range(self.fill)])
            view = maps.counters()
            for i in range(view.shape[0]):
                view[i, 1] = GRANT_FREE
            del view
        finally:
            maps.close()
        bpf.attach(["s1", "s2"], PIN, netns=f"{PREFIX}-gw")
        self.gw = None

    def alive(self):
        return True

    def consumer(self):
        return None

    def down(self):
        from ext.bpfmaps import Maps
        from policy import bpf

        try:
            bpf.detach(None, PIN, netns=f"{PREFIX}-gw", unpin=False)
        finally:
            Maps.unpin(PIN)


class TableOnly(Path_):
    """Our nft table as under the eBPF source (``--diagnose``), with neither program nor daemon: beside bare
    forwarding it tells what the table's hooks cost every forwarded packet."""

    def up(self, work, args):
        install_table(self.label)

    def down(self):
        ns("gw", "nft", "delete", "table", "inet", "tollgate")


class EbpfProgramAndTable(EbpfProgram):
    """The program alone plus our nft table as under the eBPF source (``--diagnose``), no daemon: with the
    two columns above, the whole path's cost is split into program, table and daemon."""

    def up(self, work, args):
        super().up(work, args)
        install_table(self.label)

    def down(self):
        try:
            super().down()
        finally:
            ns("gw", "nft", "delete", "table", "inet", "tollgate")


class PyNfq(Path_):
    def up(self, work, args):
        # --queue-bypass: should the consumer die, packets pass instead of waiting on a queue nobody reads
        ns("gw", "iptables-nft", "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass")
        self.proc = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-gw", sys.executable, "-c", NFQ_BASELINE],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "bound":
            raise RuntimeError("the NetfilterQueue baseline did not bind queue 0")

    def alive(self):
        return self.proc.poll() is None

    def consumer(self):
        return self.proc.pid

    def down(self):
        try:
            stop(self.proc)
        finally:
            ns("gw", "iptables-nft", "-F", "FORWARD")


def block_latency(work: Path, rounds: int) -> dict:
    """The nfqueue path: run both subscribers out of money ``rounds`` times each; the gateway times each
    block (breaching packet -> kernel set)."""
    db = str(work / "lat.db")
    gw = start_gateway(work, lab_config(2, {1: "0.0001", 2: "0.0001"}), db)  # 0.0001 EUR = 10 kB at 0.01 EUR/MB
    try:
        for _ in range(rounds):
            procs = [subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-s{i}", "curl", "-s", "-m", "2", "-o",
                                       "/dev/null", f"http://{UPSTREAM4}/big.bin"]) for i in range(1, 3)]
            for p in procs:
                p.wait(timeout=30)
            for i in range(1, 3):
                # a payment is whole cents: 0.01 EUR is 1 MB here, spent within the next round
                subprocess.run([sys.executable, "-m", "gateway.cli", "topup", f"s{i}", "0.01", "-c",
                                str(work / "t.toml"), "--db", db], cwd=REPO, capture_output=True, check=True)
            time.sleep(1.2)  # the flusher applies the top-ups
        return (health() or {}).get("block_latency_ms", {})
    finally:
        try:
            stop(gw)
        finally:
            ns("gw", "sh", "-c", CLEAN_NFQ)


def netfilterqueue_missing() -> str | None:
    proc = subprocess.run([sys.executable, "-c", "import netfilterqueue"], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    return (f"the NetfilterQueue package is not importable by {sys.executable} ({proc.stderr.strip().splitlines()[-1]}"
            "); `make bench` installs it (apt: libnetfilter-queue-dev; pip: netfilterqueue)")


def med(xs):
    return statistics.median(xs) if xs else None


def span(xs, fmt):
    return f"{fmt(med(xs))} ({fmt(min(xs))}-{fmt(max(xs))})" if len(xs) > 1 else fmt(xs[0]) if xs else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each traffic run")
    ap.add_argument("--repeat", type=int, default=2, help="rounds: each path measured this many times, interleaved")
    ap.add_argument("--fill", type=int, default=1000, help="bulk /32s in the eBPF maps for the main eBPF column")
    ap.add_argument("--fill-large", type=int, default=0, help="a second eBPF column with this many (0: none)")
    ap.add_argument("--rounds", type=int, default=10, help="block/top-up rounds for the nfqueue block latency "
                                                           "(0: skip)")
    ap.add_argument("--diagnose", action="store_true", help="also the eBPF path with the nft account chain of a "
                                                             "counting source added back (what leaving it out saves)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (namespaces, bpf)")
    work = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    subprocess.run(["gcc", "-O2", "-o", str(BLAST), str(REPO / "benches" / "udpblast.c")], check=True)
    missing = netfilterqueue_missing()
    if missing:
        say(f"SKIPPING the Python NetfilterQueue column: {missing}")
    paths: list[Path_] = [Bare("bare forwarding"), Ebpf(f"eBPF (--source ebpf, {args.fill:,} in maps)", args.fill),
                          EbpfProgram(f"eBPF program alone (no daemon, {args.fill:,} in maps)", args.fill)]
    if args.diagnose:
        paths += [TableOnly("our nft table alone (as under --source ebpf; no program, no daemon)"),
                  EbpfProgramAndTable(f"eBPF program and our nft table (no daemon, {args.fill:,} in maps)", args.fill),
                  EbpfWithAccount(f"eBPF, nft account chain added back ({args.fill:,} in maps)", args.fill)]
    if args.fill_large:
        paths.append(Ebpf(f"eBPF ({args.fill_large:,} in maps)", args.fill_large))
    paths.append(Nfqueue("nfqueue (tollgate run, 1 queue)"))
    if not missing:
        paths.append(PyNfq("Python NetfilterQueue"))
    lab_down(PREFIX)
    lab_up(2, PREFIX)
    try:
        for rnd in range(args.repeat):
            for p in paths:
                say(f"round {rnd + 1}/{args.repeat}: {p.label}")
                p.up(work, args)
                try:
                    p.measure(args)
                finally:
                    p.down()
        latency = block_latency(work, args.rounds) if args.rounds else None
    finally:
        lab_down(PREFIX)
    bare = paths[0]
    b_pps, b_tcp, b_cpu = (med([u["pps"] for u in bare.udp]), med(bare.tcp), med([u["cpu_ns"] for u in bare.udp]))
    head = ["path", "64-byte kpps received", "vs bare", "UDP lost %", "TCP bulk Gbit/s", "vs bare",
            "CPU ns/packet (all CPUs)", "added vs bare", "program ns/packet (BPF stats)", "our process, % of a CPU"]
    lines = []
    for p in paths:
        pps = [u["pps"] for u in p.udp]
        cpu = [u["cpu_ns"] for u in p.udp]
        lines.append([p.label, span(pps, lambda v: f"{v / 1e3:.0f}"), f"{med(pps) / b_pps:.1%}",
                      f"{med([u['lost'] for u in p.udp]):.1f}", span(p.tcp, lambda v: f"{v:.2f}"),
                      f"{med(p.tcp) / b_tcp:.0%}", span(cpu, lambda v: f"{v:.0f}"),
                      "-" if p is bare else f"{med(cpu) - b_cpu:+.0f}",
                      span(p.prog, lambda v: f"{v:.0f}") if p.prog else "-",
                      span(p.daemon, lambda v: f"{100 * v:.0f}") if p.daemon else "-"])
    if args.markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        for line in [head] + lines:
            print("  ".join(f"{c:>22}" for c in line))
    print(f"\n{args.repeat} rounds of {args.seconds:g} s per figure, paths interleaved; median (min-max)."
          f" CPUs busy during the small-packet runs: "
          + ", ".join(f"{p.label.split(' (')[0]} {med([u['cpus_busy'] for u in p.udp]):.2f}" for p in paths))
    if latency:
        print(f"\nblock latency of the nfqueue path (breaching packet -> kernel set), {latency.get('n')} blocks: "
              f"p50 {latency.get('p50')} ms, p99 {latency.get('p99')} ms")
    if missing:
        print(f"\nPython NetfilterQueue: not measured: {missing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
