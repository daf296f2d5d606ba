#!/usr/bin/env python3
"""``tollgate run --source ebpf`` at N subscribers: start to /healthz (a
fresh load, then a restart that reopens the pins), peak resident memory
(VmHWM), the time until the loop has granted what the start left (then
the idle window begins), idle CPU (utime+stime over --idle-seconds, no
traffic but the lab's own), the maps' memory (memlock) and the dirty bitmap's size. The
restart is made with lab subscriber 1 pinging the upstream every 0.1 s:
the longest gap between replies (forwarding across the restart), what the
program counted of s1 while no daemon ran, and the time from /healthz until
the ledger holds every byte the program had counted of s1 by then.

bench_scale's ledger (benches/bench_scale.py build_ledger: N subscribers, a
/32 each, 80% an IPv6 prefix) in bench_scale's lab, the gateway entered with
``nsenter --net`` (its pins must live in the host's bpffs: ``ip netns exec``
mounts a private /sys), max_slots = N + 64, interfaces s1..s4. Everything is
detached, unpinned and removed at the end.

    sudo .venv/bin/python benches/bench_ebpf_scale.py --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benches"))

from bench_scale import HZ, build_ledger, say  # noqa: E402

PREFIX = "tgebscale"
PIN = f"/sys/fs/bpf/tollgate-bench-scale-{os.getpid()}"


def health(gw_ns: str) -> dict | None:
    out = subprocess.run(["ip", "netns", "exec", gw_ns, "curl", "-s", "-m", "2", "http://127.0.0.1:8080/healthz"],
                         capture_output=True, text=True)
    try:
        return json.loads(out.stdout) if out.returncode == 0 else None
    except ValueError:
        return None


def cpu(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    f = stat[stat.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / HZ


def vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def rss_split(pid: int) -> dict:
    """The process's resident memory now, MB, by what it is: the BPF maps it has mapped (the counters and
    refunds, shared with the kernel: resident once touched), its anonymous memory (Python's heap, the
    engine's C arrays, the source's arrays) and files (libraries, the ledger's pages)."""
    out = {"bpf_maps": 0, "anonymous": 0, "files": 0}
    kind = "anonymous"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=6)
        if "-" in first[0] and len(first) >= 5 and ":" in first[3]:  # a mapping's header line
            name = first[5] if len(first) > 5 else ""
            kind = "bpf_maps" if "bpf-map" in name else "files" if name.startswith("/") else "anonymous"
        elif first[0] == "Rss:":
            out[kind] += int(first[1]) * 1024 / 1e6
    return out


def start(lab, work: Path, n: int, timeout: float) -> tuple[subprocess.Popen, float | None]:
    t0 = time.monotonic()
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{lab.gw}", sys.executable, "-m", "gateway.cli", "-v", "run",
                             "-c", str(work / "tollgate.toml"), "--db", str(work / "ledger.db"), "--source", "ebpf",
                             "--source-option", f"pin_dir={PIN}", "--source-option", "interfaces=s1,s2,s3,s4",
                             "--source-option", f"max_slots={n + 64}"], cwd=REPO,
                            stdout=open(work / "gateway.log", "a"), stderr=subprocess.STDOUT)
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return proc, None
        if health(lab.gw) is not None:
            return proc, time.monotonic() - t0
        time.sleep(0.2)
    return proc, None


def stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def all_granted(lab, timeout: float) -> float | None:
    """Seconds until /healthz says the start's grants are all made (the loop grants what the start left,
    gateway/sources/ebpf.py START_GRANTS), so that the idle window that follows is idle."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        left = (health(lab.gw) or {}).get("queue", {}).get("ebpf", {}).get("start_grants_left")
        if left == 0:
            return time.monotonic() - t0
        time.sleep(0.5)
    return None


def slot_used(sid: int) -> int:
    """What the program has passed for subscriber ``sid`` so far, every zone and direction (read through the
    pins, with no daemon needed)."""
    from ext.bpfmaps import Maps

    with Maps.open(PIN) as maps:
        return sum(maps.counter(sid, z, d).used for z in range(maps.n_zones) for d in (0, 1))


def charged_bytes(db: Path, sid: int) -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT coalesce(sum(bytes), 0) FROM usage WHERE subscriber_id = ?", (sid,)).fetchone()[0]
    finally:
        con.close()


def restart_under_traffic(lab, work: Path, n: int, proc, args, out: dict):
    """The restart, with lab subscriber 1 pinging the upstream every 0.1 s throughout: the longest gap
    between two replies and the pings lost (forwarding across the restart), what the program counted of s1
    while no daemon ran (counting across it), then the time from /healthz until the ledger holds every byte
    the program had counted of s1 by then (charging again). Returns the restarted gateway (None: it did not start)."""
    from gateway.lab import UPSTREAM4

    con = sqlite3.connect(work / "ledger.db")
    sid = con.execute("SELECT id FROM subscribers WHERE name = 's1'").fetchone()[0]
    con.close()
    count = int((args.start_timeout + 60) / 0.1)  # bounded: killed once the restart is measured
    ping = subprocess.Popen(["ip", "netns", "exec", lab.sub(1), "ping", "-D", "-n", "-i", "0.1", "-W", "1",
                             "-c", str(count), UPSTREAM4], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        stop(proc)
        down0 = slot_used(sid)
        time.sleep(3)
        out["counted_while_down_b"] = slot_used(sid) - down0
        proc, took = start(lab, work, n, args.start_timeout)
        out["healthz_restart_s"] = took
        if took is None:
            return None
        t0, counted = time.monotonic(), slot_used(sid)  # (the pings go on: what was counted by /healthz)
        while time.monotonic() - t0 < args.start_timeout:
            if charged_bytes(work / "ledger.db", sid) >= counted:
                out["charged_after_healthz_s"] = time.monotonic() - t0
                break
            time.sleep(0.2)
        time.sleep(1)
    finally:
        ping.send_signal(signal.SIGINT)  # (SIGINT: ping prints what it sent)
        text = ping.communicate(timeout=30)[0]
    stamps = [float(line[1:line.index("]")]) for line in text.splitlines() if line.startswith("[") and "bytes from" in line]
    out["ping_replies"] = len(stamps)
    out["ping_max_gap_s"] = max((b - a for a, b in zip(stamps, stamps[1:])), default=None)
    sent = [line for line in text.splitlines() if "packets transmitted" in line]
    out["ping_sent"] = int(sent[0].split()[0]) if sent else None
    say(f"  restart under pings: longest gap {out['ping_max_gap_s']} s, {out['ping_replies']} of {out['ping_sent']} "
        f"answered; {out['counted_while_down_b']} B counted with no daemon; charged "
        f"{out.get('charged_after_healthz_s')} s after /healthz")
    return proc


def measure(n: int, args) -> dict:
    from accounting.money import parse_amount
    from ext.bpfmaps import Maps
    from gateway.lab import lab_config, lab_down, lab_up
    from policy import bpf

    work = Path(tempfile.mkdtemp(prefix=f"tollgate-ebscale-{n}-", dir=args.workdir))
    (work / "tollgate.toml").write_text(lab_config(3))
    say(f"== {n:,} subscribers")
    build_ledger(work / "ledger.db", n, parse_amount("100.00", "EUR"))
    out = {"n": n}
    Maps.unpin(PIN)
    lab_down(PREFIX)
    with contextlib.redirect_stdout(sys.stderr):
        lab = lab_up(4, PREFIX)
    proc = None
    try:
        for tag in ("fresh", "restart"):
            if tag == "fresh":
                proc, took = start(lab, work, n, args.start_timeout)
                out["healthz_fresh_s"] = took
            took = out[f"healthz_{tag}_s"]
            if took is None:
                out["error"] = (work / "gateway.log").read_text()[-1500:]
                break
            say(f"  {tag}: /healthz after {took:.1f} s")
            out[f"granted_{tag}_s"] = granted = all_granted(lab, args.start_timeout)
            say(f"  {tag}: every subscriber granted {granted if granted is None else round(granted, 1)} s after /healthz")
            time.sleep(args.settle)
            c0, t0 = cpu(proc.pid), time.monotonic()
            time.sleep(args.idle_seconds)
            out[f"idle_cpu_{tag}"] = (cpu(proc.pid) - c0) / (time.monotonic() - t0)
            out[f"rss_peak_{tag}_mb"] = vm(proc.pid, "VmHWM") / 1e6
            out[f"rss_now_{tag}"] = split = rss_split(proc.pid)
            say(f"  {tag}: resident now " + ", ".join(f"{k} {v:.0f} MB" for k, v in split.items()))
            polls = (health(lab.gw) or {}).get("queue", {}).get("ebpf", {}).get("polls")
            out[f"polls_{tag}"] = polls
            if tag == "fresh":
                with Maps.open(PIN) as maps:
                    mem = maps.map_memory()
                out["maps_mib"] = sum(mem.values()) / (1 << 20)
                out["counters_mib"] = mem["tg_counters"] / (1 << 20)
                out["dirty_kib"] = mem["tg_dirty"] / 1024
            say(f"  {tag}: idle CPU {out[f'idle_cpu_{tag}']:.1%}, peak RSS {out[f'rss_peak_{tag}_mb']:.0f} MB")
            if tag == "fresh":
                proc = restart_under_traffic(lab, work, n, proc, args, out)
                if proc is None:
                    break
            else:
                stop(proc)
    finally:
        if proc is not None:
            stop(proc)
        try:
            bpf.detach(None, PIN, netns=lab.gw, unpin=False)
        finally:
            Maps.unpin(PIN)
            lab_down(PREFIX)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000")
    ap.add_argument("--idle-seconds", type=float, default=10)
    ap.add_argument("--settle", type=float, default=5, help="seconds after /healthz before the idle window")
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--workdir", default="/var/tmp")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root")
    rows = [measure(int(s), args) for s in args.sizes.split(",")]
    print("| subscribers | start to /healthz (fresh load / restart) | then everyone granted (fresh / restart) | "
          "peak RSS (fresh / restart) | idle CPU of a core (fresh / restart) | map memory (counters) | dirty bitmap |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        f = lambda k, fmt: fmt.format(r[k]) if r.get(k) is not None else "-"  # noqa: E731
        print(f"| {r['n']:,} | {f('healthz_fresh_s', '{:.1f} s')} / {f('healthz_restart_s', '{:.1f} s')} | "
              f"{f('granted_fresh_s', '+{:.1f} s')} / {f('granted_restart_s', '+{:.1f} s')} | "
              f"{f('rss_peak_fresh_mb', '{:.0f} MB')} / {f('rss_peak_restart_mb', '{:.0f} MB')} | "
              f"{f('idle_cpu_fresh', '{:.1%}')} / {f('idle_cpu_restart', '{:.1%}')} | "
              f"{f('maps_mib', '{:.0f} MiB')} ({f('counters_mib', '{:.0f}')}) | {f('dirty_kib', '{:.0f} KiB')} |")
        for tag in ("fresh", "restart"):
            if r.get(f"rss_now_{tag}"):
                print(f"\n{r['n']:,}, {tag}, resident after the idle window: " +
                      ", ".join(f"{k.replace('_', ' ')} {v:,.0f} MB" for k, v in r[f"rss_now_{tag}"].items()))
        if r.get("ping_sent"):
            print(f"\n{r['n']:,}, the restart with s1 pinging every 0.1 s: longest gap between replies "
                  f"{r['ping_max_gap_s']:.2f} s, {r['ping_replies']} of {r['ping_sent']} answered; "
                  f"{r['counted_while_down_b']} B of s1 counted by the program in 3 s with no daemon; the ledger "
                  f"held all of it {f('charged_after_healthz_s', '{:.1f} s')} after /healthz")
        if r.get("error"):
            print(f"\n{r['n']:,}: the gateway did not come up: {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
