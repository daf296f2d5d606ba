"""The network-namespace lab: subscribers, a gateway and an upstream on one machine.

``lab_up(n)`` builds namespaces ``<prefix>-s1..sN`` (subscribers),
``<prefix>-gw`` (the box Tollgate runs on) and ``<prefix>-up`` (the
Internet), joined by veth pairs, IPv4 and IPv6, with masquerade on the
gateway's upstream side as on a real box. The upstream runs an HTTP server
(with a file of known size) and an iperf3 server; the gateway runs a tiny DNS
responder so that blocked subscribers' DNS can be shown to keep working.
Only the ranges of DESIGN.md are used; the host's own namespace is never
touched beyond creating the namespaces and veth pairs. ``lab_down`` removes
everything it made, whatever state it is in.

Subscriber i: 100.64.i.2/24 and 2001:db8:100:i::2/64 (i in hex), its gateway
100.64.i.1 and 2001:db8:100:i::1. Upstream: 198.18.0.2/24 and 2001:db8:198::2/64;
gateway's upstream side 198.18.0.1 and 2001:db8:198::1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ext.errors import ConfigError, TollgateError

MAX_SUBSCRIBERS = 200
PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,11}")  # a short name: netns names and /run paths stay simple
UPSTREAM4, UPSTREAM6 = "198.18.0.2", "2001:db8:198::2"
GATEWAY_UP4, GATEWAY_UP6 = "198.18.0.1", "2001:db8:198::1"
BIG_FILE = 8 * 1024 * 1024  # bytes of /big.bin on the upstream HTTP server


class LabError(TollgateError):
    """The lab cannot be built or a command in it failed."""


@dataclass(frozen=True)
class Lab:
    prefix: str
    n: int

    @property
    def gw(self) -> str:
        return f"{self.prefix}-gw"

    @property
    def up(self) -> str:
        return f"{self.prefix}-up"

    def sub(self, i: int) -> str:
        return f"{self.prefix}-s{i}"

    @staticmethod
    def sub_addr4(i: int) -> str:
        return f"100.64.{i}.2"

    @staticmethod
    def sub_addr6(i: int) -> str:
        return f"2001:db8:100:{i:x}::2"

    @staticmethod
    def gw_addr4(i: int) -> str:
        return f"100.64.{i}.1"

    @property
    def run_dir(self) -> Path:
        return Path(f"/run/tollgate-lab-{self.prefix}")


def lab_config(n: int, balances: dict | None = None, price_mb: str = "0.01", upload_free: bool = False,
               names: list[str] | None = None, warn: str | None = None) -> str:
    """A Tollgate config for a lab of ``n`` subscribers: subscriber i (named
    ``names[i-1]`` or ``s<i>``) owns its lab addresses and gets
    ``balances[i]`` EUR (default 100.00); one tariff, external traffic at
    ``price_mb`` EUR per MB; DNS on the gateway allowed while blocked."""
    balances = balances or {}
    upload = "0" if upload_free else price_mb
    subs = "".join(
        f'[[subscriber]]\nname = "{names[i - 1] if names else f"s{i}"}"\ntariff = "lab"\n'
        f'balance = "{balances.get(i, "100.00")}"\n'
        f'addresses = ["{Lab.sub_addr4(i)}/32", "2001:db8:100:{i:x}::/64"]\n\n'
        for i in range(1, n + 1))
    allow = ", ".join(f'{{ network = "{Lab.gw_addr4(i)}/32", protocol = "udp", ports = "53" }}'
                      for i in range(1, n + 1))
    return (f'[gateway]\ncurrency = "EUR"\nlocal_networks = ["100.64.0.0/10", "2001:db8:100::/48"]\n'
            f"allow = [{allow}]\n\n[[tariff]]\nname = \"lab\"\nprice_unit = \"MB\"\n"
            + (f'warn = ["{warn}"]\n' if warn else "")
            + f'[tariff.prices]\nexternal = {{ upload = "{upload}", download = "{price_mb}" }}\n\n' + subs)


def say(text: str) -> None:
    print(f"  lab: {text}", flush=True)


def sh(*args: str, check: bool = True, ns: str | None = None, **kw) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and proc.returncode:
        raise LabError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def spawn(lab: Lab, name: str, ns: str, *args: str) -> int:
    """Start a background process in ``ns``; its pid goes into the lab's run dir."""
    log = open(lab.run_dir / f"{name}.log", "w")
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    (lab.run_dir / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def namespaces() -> set[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _check_prefix(prefix: str) -> None:
    if not PREFIX_RE.fullmatch(prefix or ""):
        raise ConfigError("--prefix", f"{prefix!r}: 1-12 lowercase letters and digits, starting with a letter")


def lab_namespaces(prefix: str) -> list[str]:
    """The namespaces of lab ``prefix`` that exist: exactly the names it
    makes (``tg-gw``, ``tg-up``, ``tg-s<i>``), never another lab's ``tg-x-gw``."""
    mine = re.compile(rf"{re.escape(prefix)}-(gw|up|s\d+)")
    return sorted((ns for ns in namespaces() if mine.fullmatch(ns)),
                  key=lambda ns: (len(ns), ns))


def lab_up(n: int = 4, prefix: str = "tg") -> Lab:
    """Build the lab; returns its description. Refuses if it exists already."""
    _check_prefix(prefix)
    if not isinstance(n, int) or not 1 <= n <= MAX_SUBSCRIBERS:
        raise ConfigError("--subscribers", f"the lab takes 1..{MAX_SUBSCRIBERS} subscribers, not {n}")
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces)")
    lab = Lab(prefix, n)
    if lab_namespaces(prefix):
        raise LabError(f"a lab named {prefix!r} is up already: `tollgate lab down --prefix {prefix}` first")
    lab.run_dir.mkdir(parents=True, exist_ok=True)
    (lab.run_dir / "lab.json").write_text(json.dumps({"prefix": prefix, "n": n}))
    try:
        _build(lab)
    except BaseException:
        lab_down(prefix)
        raise
    return lab


def _build(lab: Lab) -> None:
    say(f"namespaces {lab.gw}, {lab.up} and {lab.n} subscribers")
    for ns in [lab.gw, lab.up] + [lab.sub(i) for i in range(1, lab.n + 1)]:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
    for ns in (lab.gw,):
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=ns)
        sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=ns)
    # upstream link
    say("uplink gw <-> upstream, masquerade on the gateway's upstream side")
    sh("ip", "link", "add", "uplink", "netns", lab.gw, "type", "veth", "peer", "name", "eth0", "netns", lab.up)
    _addr(lab.gw, "uplink", f"{GATEWAY_UP4}/24", f"{GATEWAY_UP6}/64")
    _addr(lab.up, "eth0", f"{UPSTREAM4}/24", f"{UPSTREAM6}/64")
    sh("nft", "-f", "-", ns=lab.gw, input=(
        "table inet lab {\n"
        "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;\n"
        "    oifname \"uplink\" masquerade\n  }\n}\n"))
    for i in range(1, lab.n + 1):
        sh("ip", "link", "add", f"s{i}", "netns", lab.gw, "type", "veth", "peer", "name", "eth0", "netns", lab.sub(i))
        _addr(lab.gw, f"s{i}", f"{lab.gw_addr4(i)}/24", f"2001:db8:100:{i:x}::1/64")
        _addr(lab.sub(i), "eth0", f"{lab.sub_addr4(i)}/24", f"{lab.sub_addr6(i)}/64")
        sh("ip", "route", "add", "default", "via", lab.gw_addr4(i), ns=lab.sub(i))
        sh("ip", "-6", "route", "add", "default", "via", f"2001:db8:100:{i:x}::1", ns=lab.sub(i))
    say(f"subscribers 100.64.1..{lab.n}.2 and 2001:db8:100:1..{lab.n:x}::2 routed through the gateway")
    www = lab.run_dir / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text("<h1>upstream</h1>\n")
    with open(www / "big.bin", "wb") as f:
        f.write(os.urandom(BIG_FILE))
    spawn(lab, "http", lab.up, sys.executable, "-m", "http.server", "80", "--bind", "::", "--directory", str(www))
    spawn(lab, "iperf3", lab.up, "iperf3", "-s")
    spawn(lab, "dns", lab.gw, sys.executable, "-m", "gateway.labdns", UPSTREAM4, UPSTREAM6)
    _wait_port(lab.up, 80)
    _wait_port(lab.up, 5201)
    say(f"upstream serves http://{UPSTREAM4}/big.bin ({BIG_FILE} bytes) and iperf3; DNS answers on the gateway")
    _settle_ipv6(lab)


def _addr(ns: str, dev: str, v4: str, v6: str) -> None:
    sh("ip", "addr", "add", v4, "dev", dev, ns=ns)
    sh("ip", "-6", "addr", "add", v6, "dev", dev, "nodad", ns=ns)
    sh("ip", "link", "set", dev, "up", ns=ns)


def _wait_port(ns: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f":{port} " in sh("ss", "-Hltn", ns=ns, check=False).stdout:
            return
        time.sleep(0.1)
    raise LabError(f"nothing listens on port {port} in {ns} after {timeout} s")


def _settle_ipv6(lab: Lab, timeout: float = 5.0) -> None:
    """Wait until subscriber 1 reaches the upstream over IPv6 (neighbour discovery)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sh("ping", "-6", "-c1", "-W1", UPSTREAM6, ns=lab.sub(1), check=False).returncode == 0:
            return
    raise LabError("IPv6 does not come up in the lab")


def lab_down(prefix: str = "tg") -> None:
    """Stop the lab's processes and delete its namespaces (idempotent).

    The processes stopped are those living in the lab's namespaces (``ip
    netns pids``): the ones ``up`` recorded in pidfiles, and anything started
    there by hand (a gateway, a test server). A pidfile alone is not trusted:
    after a crash its pid may belong to someone else by now."""
    _check_prefix(prefix)
    run_dir = Path(f"/run/tollgate-lab-{prefix}")
    mine = lab_namespaces(prefix)
    if mine:
        say(f"stopping processes in and deleting {len(mine)} namespaces of lab {prefix!r}")
    pids = [int(pid) for ns in mine for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split()]
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while (pids := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pids:
            break
    for ns in mine:
        sh("ip", "netns", "del", ns, check=False)
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=False)
    if mine:
        say(f"removed {len(mine)} namespaces")


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def lab_status(prefix: str = "tg") -> dict:
    """Print and return the lab's namespaces (with their addresses) and processes."""
    _check_prefix(prefix)
    mine = lab_namespaces(prefix)
    run_dir = Path(f"/run/tollgate-lab-{prefix}")
    procs = {}
    for pidfile in sorted(run_dir.glob("*.pid")) if run_dir.exists() else []:
        pid = int(pidfile.read_text())
        procs[pidfile.stem] = (pid, _alive(pid))
    if not mine:
        print(f"no lab named {prefix!r}")
    addresses = {}
    for ns in mine:
        out = sh("ip", "-br", "addr", ns=ns, check=False).stdout
        addresses[ns] = [a for line in out.splitlines() if not line.startswith("lo ")
                         for a in line.split()[2:] if not a.startswith("fe80:")]
        print(f"{ns}: {' '.join(addresses[ns])}")
    for name, (pid, alive) in procs.items():
        print(f"process {name}: pid {pid} {'running' if alive else 'gone'}")
    return {"namespaces": mine, "addresses": addresses, "processes": procs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.lab", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("up", "down", "status"))
    ap.add_argument("--subscribers", "-n", type=int, default=4)
    ap.add_argument("--prefix", default="tg")
    args = ap.parse_args(argv)
    try:
        if args.action == "up":
            lab_up(args.subscribers, args.prefix)
        elif args.action == "down":
            lab_down(args.prefix)
        else:
            lab_status(args.prefix)
    except TollgateError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
