"""Reference meters for the lab: other programs that count the same traffic,
run beside Tollgate so that its figures can be checked against theirs.

:class:`Uacctd` is pmacct's NFLOG accounting daemon (Debian package pmacct).
It reads its own NFLOG group, fed by a table of its own (``inet
tollgate_ref``) in the gateway's namespace that logs every forwarded packet
from or to the local networks once, ahead of Tollgate's rules; its print
plugin writes per-host byte totals to a CSV file.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import time
from pathlib import Path

REF_TABLE = "tollgate_ref"


def ref_log_table(group: int, local_networks, snaplen: int = 128, threshold: int = 64) -> str:
    """An nft table logging each forwarded packet from or to the local
    networks to ``group``, once (a packet between two of them is logged for
    its source only)."""
    rules = []
    for fam, nets in (("ip", [n for n in local_networks if ":" not in n]),
                      ("ip6", [n for n in local_networks if ":" in n])):
        if not nets:
            continue
        s = "{ " + ", ".join(nets) + " }"
        log = f"log group {group} snaplen {snaplen} queue-threshold {threshold}"
        rules += [f"{fam} saddr {s} {log}", f"{fam} saddr != {s} {fam} daddr {s} {log}"]
    body = "\n".join(f"    {r}" for r in rules)
    return (f"table inet {REF_TABLE} {{\n  chain forward_log {{\n"
            f"    type filter hook forward priority -5; policy accept;\n{body}\n  }}\n}}\n")


class Uacctd:
    """pmacct's uacctd on NFLOG ``group`` in namespace ``ns``, writing per-host
    totals to ``workdir/uacctd.csv`` every second."""

    def __init__(self, ns: str, workdir: Path, group: int = 2,
                 local_networks=("100.64.0.0/10", "2001:db8:100::/48")) -> None:
        if shutil.which("uacctd") is None:
            raise FileNotFoundError("uacctd is not installed (Debian package pmacct)")
        self.ns, self.group, self.local_networks = ns, group, list(local_networks)
        self.out = workdir / "uacctd.csv"
        self.conf = workdir / "uacctd.conf"
        self.log = workdir / "uacctd.log"
        self.proc: subprocess.Popen | None = None

    def _nft(self, text: str, check: bool = True) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input=text, text=True,
                       capture_output=True, check=check)

    def start(self) -> "Uacctd":
        self.conf.write_text(
            "daemonize: false\n"
            f"uacctd_group: {self.group}\n"
            "uacctd_nl_size: 8388608\n"
            "snaplen: 128\n"
            "plugins: print[out]\n"
            "aggregate[out]: src_host, dst_host\n"
            "print_output[out]: csv\n"
            f"print_output_file[out]: {self.out}\n"
            "print_output_file_append[out]: true\n"
            "print_refresh_time[out]: 1\n")
        self.out.unlink(missing_ok=True)
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "uacctd", "-f", str(self.conf)],
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        time.sleep(1.0)  # bound to its group before the first packet is logged
        if self.proc.poll() is not None:
            raise RuntimeError(f"uacctd exited: {self.log.read_text(errors='replace')[-500:]}")
        self._nft(ref_log_table(self.group, self.local_networks))
        return self

    def stop(self) -> None:
        """Remove the log table, let the last second's totals be written, stop."""
        self._nft(f"delete table inet {REF_TABLE}\n", check=False)
        if self.proc and self.proc.poll() is None:
            time.sleep(2.5)  # print_refresh_time 1: the last totals reach the file
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU of uacctd and its plugin processes so far."""
        if self.proc is None:
            return 0.0
        return tree_cpu_seconds(self.proc.pid)

    def per_host(self) -> dict[str, tuple[int, int]]:
        """``{address: (packets, bytes)}``, source and destination sides added."""
        total: dict[str, list[int]] = {}
        if not self.out.exists():
            return {}
        with self.out.open() as f:
            for row in csv.reader(f):
                if not row or row[0] == "SRC_IP":
                    continue  # a header, written with every refresh
                src, dst, packets, nbytes = row[0], row[1], int(row[2]), int(row[3])
                for host in (src, dst):
                    t = total.setdefault(host, [0, 0])
                    t[0] += packets
                    t[1] += nbytes
        return {h: (p, b) for h, (p, b) in total.items()}


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and all its descendants, from /proc."""
    import os

    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / ticks  # utime, stime
        todo += children.get(p, [])
    return total
