#!/usr/bin/env python3
"""Passive sources in the lab (root; builds its own lab), three tables:

1. NFLOG loss at rising packet rates, batched (recvmmsg of 16 datagrams,
   the kernel packing up to 64 packets a datagram) and unbatched (one packet
   a datagram, one datagram a receive), each with our 64 MiB receive buffer
   and with the kernel's default one: 64-byte UDP packets from one
   subscriber, paced by ``udpblast``; what the kernel logged (our table's
   counter), what the reader rated, and the loss it saw in the sequence
   numbers and as ENOBUFS.
2. Our NFLOG reader beside pmacct's uacctd, each on its own NFLOG group, on
   the same flood: packets counted, CPU seconds, packets per CPU second, the
   ratio.
3. Overshoot under each passive source, with and without the kernel quota: a
   subscriber allowed 2,000,000 bytes pulls an 8 MB download; bytes the kernel
   forwarded for it beyond the allowance.

Sources run in the standalone harness (``python -m gateway.sources.nflog``:
one unit per byte, no ledger), so what is measured is the source, the engine
and the kernel, not the daemon's other threads.

    .venv/bin/python benches/bench_passive.py [--seconds 3] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.lab import UPSTREAM4, lab_down, lab_up  # noqa: E402
from gateway.labmeters import Uacctd, tree_cpu_seconds  # noqa: E402

PREFIX = "tgpass"
BLAST = Path(tempfile.gettempdir()) / "tollgate-udpblast"
SINK = ("table inet sink {\n chain c {\n  type filter hook prerouting priority -300; policy accept;\n"
        "  udp dport 9 counter drop\n }\n}\n")
SUB1 = "1=100.64.1.2/32,2001:db8:100:1::/64"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def ns(name: str, *cmd: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", f"{PREFIX}-{name}", *cmd], capture_output=True, text=True,
                          timeout=timeout, **kw)


class Harness:
    """``python -m gateway.sources.nflog`` in the gateway namespace."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-gw", sys.executable, "-m",
                                      "gateway.sources.nflog", *args], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"harness did not start: {line!r}")

    def cpu(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def result(self) -> dict:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1])


def blast(seconds: float, pps: int) -> int:
    """64-byte IP packets (36 bytes of UDP payload) from s1 to the upstream's sink; packets sent."""
    out = ns("s1", str(BLAST), UPSTREAM4, "9", str(seconds), "36", str(pps), timeout=seconds + 30)
    return int(out.stdout or 0)


def logged_packets(result: dict) -> int:
    return sum(c["up_packets"] + c["down_packets"] for c in result["kernel"].values())


MODES = (("batched", []),
         ("unbatched", ["-o", "batch=1", "-o", "threshold=1"]),
         ("batched, 208 KiB buffer", ["-o", "rcvbuf=212992"]),
         ("unbatched, 208 KiB buffer", ["-o", "batch=1", "-o", "threshold=1", "-o", "rcvbuf=212992"]))


def loss_table(seconds: float) -> list[dict]:
    rows = []
    for label, options in MODES:
        for pps in (25_000, 50_000, 100_000, 200_000, 400_000, 0):
            say(f"  NFLOG {label}, {pps or 'flat out'} pps")
            h = Harness("--subscriber", f"{SUB1}:{10 ** 15}", *options)
            sent = blast(seconds, pps)
            time.sleep(0.3)
            r = h.result()
            st = r["stats"]
            logged = logged_packets(r)
            rows.append({"mode": label, "target_pps": pps or "flat out", "sent_pps": round(sent / seconds),
                         "logged": logged, "rated": st["packets"], "seq_lost": st["lost_packets"],
                         "enobufs": st["enobufs"], "loss_pct": round(100 * (logged - st["packets"]) / max(logged, 1), 3),
                         "datagrams": st["datagrams"]})
    return rows


def versus_pmacct(seconds: float, work: Path) -> dict:
    say("  our NFLOG reader and pmacct uacctd on one flood")
    ref = Uacctd(f"{PREFIX}-gw", work, group=2).start()
    h = Harness("--subscriber", f"{SUB1}:{10 ** 15}", "-o", "group=1")
    cpu0_ours, cpu0_ref = h.cpu(), ref.cpu_seconds()
    sent = blast(seconds, 0)
    time.sleep(0.5)
    cpu_ours, cpu_ref = h.cpu() - cpu0_ours, ref.cpu_seconds() - cpu0_ref
    r = h.result()
    ref.stop()
    logged = logged_packets(r)
    theirs = ref.per_host().get("100.64.1.2", (0, 0))[0]
    ours = r["stats"]["packets"]
    return {"sent": sent, "logged": logged, "ours": ours, "pmacct": theirs,
            "ours_cpu": round(cpu_ours, 2), "pmacct_cpu": round(cpu_ref, 2),
            "ours_per_cpu_s": round(ours / max(cpu_ours, 0.01)), "pmacct_per_cpu_s": round(theirs / max(cpu_ref, 0.01))}


def overshoot_table() -> list[dict]:
    rows = []
    allowance = 2_000_000
    for source, options in (("nflog", []), ("conntrack", ["-o", "interval=0.5"])):
        for quota in (True, False):
            say(f"  overshoot: {source}, {'with' if quota else 'without'} the kernel quota")
            h = Harness("--source", source, "--subscriber", f"{SUB1}:{allowance}", *options,
                        *(["--quota"] if quota else []))
            got = ns("s1", "curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{size_download}",
                     f"http://{UPSTREAM4}/big.bin").stdout
            time.sleep(1.5 if source == "conntrack" else 0.5)
            r = h.result()
            forwarded = sum(c["up_bytes"] + c["down_bytes"] for c in r["kernel"].values())
            rows.append({"source": source, "kernel_quota": quota, "downloaded": int(float(got or 0)),
                         "forwarded": forwarded, "overshoot": max(0, forwarded - allowance),
                         "blocked": 1 in r["blocked"]})
            ns("gw", "nft", "delete", "table", "inet", "tollgate")
    return rows


def markdown(loss: list[dict], vs: dict, over: list[dict], seconds: float) -> str:
    out = [f"NFLOG loss at rising rates ({seconds:g} s per rate, 64-byte packets from one subscriber):", "",
           "| mode | target pps | sent pps | logged by the kernel | rated | lost (sequence) | ENOBUFS | loss % |"
           " datagrams |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    out += [f"| {r['mode']} | {r['target_pps']} | {r['sent_pps']:,} | {r['logged']:,} | {r['rated']:,} |"
            f" {r['seq_lost']:,} | {r['enobufs']} | {r['loss_pct']} | {r['datagrams']:,} |" for r in loss]
    for mode, _options in MODES:
        first = next((r for r in loss if r["mode"] == mode and r["logged"] != r["rated"]), None)
        out.append("")
        out.append(f"{mode}: first loss at {first['sent_pps']:,} pps sent" if first
                   else f"{mode}: no loss at any tested rate")
    out += ["", f"Our NFLOG reader and pmacct's uacctd on one flat-out flood ({vs['sent']:,} packets sent,"
            f" {vs['logged']:,} logged):", "",
            "| meter | packets counted | CPU s | packets per CPU s |", "|---|---:|---:|---:|",
            f"| Tollgate (ext/nflog.pyx + engine) | {vs['ours']:,} | {vs['ours_cpu']} | {vs['ours_per_cpu_s']:,} |",
            f"| pmacct uacctd (print plugin) | {vs['pmacct']:,} | {vs['pmacct_cpu']} | {vs['pmacct_per_cpu_s']:,} |",
            "", f"Ratio, packets per CPU second: {vs['ours_per_cpu_s'] / max(vs['pmacct_per_cpu_s'], 1):.1f}x", "",
            "Overshoot (allowance 2,000,000 bytes, both directions; 8 MB download):", "",
            "| source | kernel quota | bytes forwarded | overshoot | blocked |", "|---|---|---:|---:|---|"]
    out += [f"| {r['source']} | {'yes' if r['kernel_quota'] else 'no'} | {r['forwarded']:,} | {r['overshoot']:,} |"
            f" {'yes' if r['blocked'] else 'no'} |" for r in over]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each flood")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("needs root (network namespaces)")
    if shutil.which("uacctd") is None:
        ap.error("needs pmacct's uacctd (apt-get install pmacct)")
    work = Path(tempfile.mkdtemp(prefix="tollgate-passive-"))
    subprocess.run(["gcc", "-O2", "-o", str(BLAST), str(REPO / "benches" / "udpblast.c")], check=True)
    lab_down(PREFIX)
    lab_up(1, PREFIX)
    try:
        ns("up", "nft", "-f", "-", input=SINK, check=True)
        say("NFLOG loss at rising rates")
        loss = loss_table(args.seconds)
        say("side by side with pmacct")
        vs = versus_pmacct(args.seconds, work)
        say("overshoot")
        over = overshoot_table()
    finally:
        lab_down(PREFIX)
    if args.markdown:
        print(markdown(loss, vs, over, args.seconds))
    else:
        print(json.dumps({"loss": loss, "pmacct": vs, "overshoot": over}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
