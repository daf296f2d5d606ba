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

``cluster_up(gateways, subscribers)`` builds the many-gateways lab of issue 13
(several NAT gateways on one upstream, subscribers behind each, and one shared
subscriber routed through two gateways at once); ``cluster_config`` writes
each gateway's config, ``cluster_down`` removes it. Its address plan is at
``Cluster`` below.
"""

from __future__ import annotations

import argparse
import ipaddress
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
    _tear_down(mine, run_dir, f"lab {prefix!r}")


def _tear_down(mine: list[str], run_dir: Path, what: str) -> None:
    """Stop every process living in the namespaces ``mine`` (TERM, then KILL), delete them and ``run_dir``."""
    if mine:
        say(f"stopping processes in and deleting {len(mine)} namespaces of {what}")
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


# ---- the cluster lab: several gateways on one upstream, one shared ledger (issue 13) ----------------
#
# ``cluster_up(gateways, subscribers)`` builds ``<prefix>-up`` (the Internet, as lab_up's),
# ``<prefix>-g1..gN`` (NAT boxes, each with its own uplink to the upstream and masquerade on it, and
# the lab's DNS responder) and ``<prefix>-g<k>s<i>`` (subscriber i behind gateway k), plus one shared
# subscriber ``<prefix>-x`` with a link to g1 and one to g2, whose addresses are routed by source:
# the same ledger account served by two gateways at once.
#
#   upstream  lo 198.18.0.2/32, 2001:db8:198::2/128 (the servers); dev g<k> 198.18.k.2/24,
#             2001:db8:198:k::2/64 to gateway k, whose masquerade address 198.18.k.1 / 2001:db8:198:k::1
#             is on that connected link (the route back)
#   gateway k uplink 198.18.k.1/24, 2001:db8:198:k::1/64, default via 198.18.k.2 / 2001:db8:198:k::2;
#             dev s<i> 100.(64+k).i.1/24, 2001:db8:100:<k><i>::1/64 (k and i as two hex digits each);
#             dev x 100.64.k.1/24, 2001:db8:100:k::1/64 to the shared subscriber (g1 and g2)
#   g<k>s<i>  eth0 100.(64+k).i.2/24, 2001:db8:100:<k><i>::2/64, default via gateway k
#   x         dev g1 100.64.1.2/24, 2001:db8:100:1::2/64; dev g2 100.64.2.2/24, 2001:db8:100:2::2/64;
#             main table default via g1; `ip rule from <address on g<k>> lookup 100+k`, table 100+k's
#             default via gateway k: traffic from 100.64.2.2 / 2001:db8:100:2::2 (`curl --interface`)
#             crosses g2, everything else g1.
#
# Each gateway has its own subnets (100.(64+k).0.0/16, 2001:db8:100:k00::/56, 198.18.k.0/24); the
# shared subscriber's are 100.64.1-2.0/24 and 2001:db8:100:1-2::/64. All inside DESIGN.md's ranges.

MAX_GATEWAYS = 9  # 100.(64+k) and the two hex digits of k in 2001:db8:100:<k><i>:: stay simple
MAX_CLUSTER_SUBSCRIBERS = 200  # per gateway
SHARED = "x"  # the shared subscriber's ledger name (and namespace suffix)
SHARED_GATEWAYS = (1, 2)  # the gateways it crosses


@dataclass(frozen=True)
class ClusterLink:
    """One veth between a subscriber and a gateway: both ends' names and addresses."""
    gateway: int  # k
    dev: str  # the subscriber's end
    gw_dev: str  # the gateway's end
    addr4: str  # the subscriber's addresses on this link
    addr6: str
    gw_addr4: str  # the gateway's, the subscriber's next hop
    gw_addr6: str

    @property
    def networks(self) -> tuple[str, str]:
        """What the ledger lists for this link: the IPv4 address and the IPv6 /64."""
        return f"{self.addr4}/32", f"{self.addr6.removesuffix('::2')}::/64"


@dataclass(frozen=True)
class ClusterSubscriber:
    name: str  # its ledger name: g<k>s<i>, or x (the shared one)
    ns: str
    links: tuple[ClusterLink, ...]

    @property
    def gateways(self) -> tuple[int, ...]:
        return tuple(link.gateway for link in self.links)

    def via(self, k: int) -> ClusterLink:
        """The link through gateway ``k``: its addresses are the sources whose traffic crosses ``k``."""
        for link in self.links:
            if link.gateway == k:
                return link
        raise KeyError(f"subscriber {self.name} has no link to gateway {k}")

    @property
    def addrs4(self) -> tuple[str, ...]:
        return tuple(link.addr4 for link in self.links)

    @property
    def addrs6(self) -> tuple[str, ...]:
        return tuple(link.addr6 for link in self.links)

    @property
    def networks(self) -> tuple[str, ...]:
        """Every network of the subscriber's ledger account, as the kernel counters name them."""
        return tuple(n for link in self.links for n in link.networks)


@dataclass(frozen=True)
class ClusterGateway:
    k: int
    ns: str
    uplink: str  # its upstream-facing interface (masquerade on it)
    addr4: str  # its masquerade addresses, on the uplink
    addr6: str
    next_hop4: str  # the upstream's end of the uplink
    next_hop6: str
    subscriber_devs: tuple[str, ...]  # its subscriber-facing interfaces
    subscribers: tuple[ClusterSubscriber, ...]  # whom it serves (the shared one on g1 and g2 as well)


@dataclass(frozen=True)
class Cluster:
    """A cluster lab's description, worked out from its prefix and sizes alone (so ``cluster_down``
    and ``cluster_status`` need nothing else)."""
    prefix: str
    n_gateways: int
    n_subscribers: int  # per gateway, besides the shared one

    @property
    def up(self) -> str:
        return f"{self.prefix}-up"

    def gw(self, k: int) -> str:
        return f"{self.prefix}-g{k}"

    @property
    def run_dir(self) -> Path:
        return Path(f"/run/tollgate-cluster-{self.prefix}")

    def _own(self, k: int, i: int) -> ClusterSubscriber:
        six = f"2001:db8:100:{k:x}{i:02x}"
        return ClusterSubscriber(f"g{k}s{i}", f"{self.prefix}-g{k}s{i}", (ClusterLink(
            k, "eth0", f"s{i}", f"100.{64 + k}.{i}.2", f"{six}::2", f"100.{64 + k}.{i}.1", f"{six}::1"),))

    @property
    def shared(self) -> ClusterSubscriber:
        """``x``: one address family pair through g1 and another through g2, at the same time."""
        return ClusterSubscriber(SHARED, f"{self.prefix}-{SHARED}", tuple(
            ClusterLink(k, f"g{k}", SHARED, f"100.64.{k}.2", f"2001:db8:100:{k:x}::2", f"100.64.{k}.1",
                        f"2001:db8:100:{k:x}::1") for k in SHARED_GATEWAYS))

    @property
    def subscribers(self) -> list[ClusterSubscriber]:
        """Everyone, as every gateway's config lists them: g1s1.., g2s1.., ..., x."""
        return [self._own(k, i) for k in range(1, self.n_gateways + 1)
                for i in range(1, self.n_subscribers + 1)] + [self.shared]

    def subscriber(self, name: str) -> ClusterSubscriber:
        for sub in self.subscribers:
            if sub.name == name:
                return sub
        raise KeyError(name)

    def gateway(self, k: int) -> ClusterGateway:
        if not 1 <= k <= self.n_gateways:
            raise KeyError(f"gateway {k}: the cluster has 1..{self.n_gateways}")
        subs = tuple(s for s in self.subscribers if k in s.gateways)
        return ClusterGateway(k, self.gw(k), "uplink", f"198.18.{k}.1", f"2001:db8:198:{k:x}::1",
                              f"198.18.{k}.2", f"2001:db8:198:{k:x}::2",
                              tuple(s.via(k).gw_dev for s in subs), subs)

    @property
    def gateways(self) -> list[ClusterGateway]:
        return [self.gateway(k) for k in range(1, self.n_gateways + 1)]

    @property
    def namespaces(self) -> list[str]:
        return [self.up] + [self.gw(k) for k in range(1, self.n_gateways + 1)] + [s.ns for s in self.subscribers]


def cluster_config(cluster: Cluster, k: int, balances: dict | None = None, price_mb: str = "0.01",
                   upload_free: bool = False, warn: str | None = None, grant: str = "1.00",
                   grant_validity: float = 60, on_failure: str = "retry_and_terminate", scoped: bool = False) -> str:
    """A Tollgate config for gateway ``k`` of the cluster, in the style of :func:`lab_config` (the same
    tariff and price): ALL the cluster's subscribers with all their networks, since the ledger is
    shared (one whose addresses gateway k never sees just has no traffic there); ``balances`` by
    subscriber name, default 100.00 EUR; DNS on gateway k allowed while blocked; ``[cluster]``
    names it ``g<k>`` and sets its credit grants (``grant`` at a time, ``grant_validity`` seconds);
    ``scoped``: ``[cluster] networks`` are the networks of gateway k's links, so it holds only the
    subscribers it serves."""
    cluster.gateway(k)  # a KeyError for a gateway the cluster does not have
    balances = balances or {}
    upload = "0" if upload_free else price_mb
    subs = "".join(
        f'[[subscriber]]\nname = "{s.name}"\ntariff = "lab"\nbalance = "{balances.get(s.name, "100.00")}"\n'
        f'addresses = [{", ".join(chr(34) + n + chr(34) for n in s.networks)}]\n\n'
        for s in cluster.subscribers)
    allow = ", ".join(f'{{ network = "{s.via(k).gw_addr4}/32", protocol = "udp", ports = "53" }}'
                      for s in cluster.gateway(k).subscribers)
    # its links' networks: the /24 of each IPv4 address, each IPv6 /64
    scope = ", ".join(f'"{ipaddress.ip_network(n).supernet(new_prefix=24) if "." in n else n}"'
                      for s in cluster.gateway(k).subscribers for n in s.via(k).networks)
    return (f'[gateway]\ncurrency = "EUR"\nlocal_networks = ["100.64.0.0/10", "2001:db8:100::/48"]\n'
            f"allow = [{allow}]\n\n[[tariff]]\nname = \"lab\"\nprice_unit = \"MB\"\n"
            + (f'warn = ["{warn}"]\n' if warn else "")
            + f'[tariff.prices]\nexternal = {{ upload = "{upload}", download = "{price_mb}" }}\n\n'
            + f'[cluster]\ngateway = "g{k}"\ngrant = "{grant}"\ngrant_validity = {grant_validity}\n'
            + f'on_failure = "{on_failure}"\n' + (f"networks = [{scope}]\n" if scoped else "") + "\n" + subs)


def cluster_namespaces(prefix: str) -> list[str]:
    """The namespaces of cluster ``prefix`` that exist: exactly the names it makes."""
    mine = re.compile(rf"{re.escape(prefix)}-(up|{SHARED}|g\d+|g\d+s\d+)")
    return sorted((ns for ns in namespaces() if mine.fullmatch(ns)), key=lambda ns: (len(ns), ns))


def cluster_up(gateways: int = 3, subscribers: int = 2, prefix: str = "tc") -> Cluster:
    """Build the cluster lab; returns its description. Refuses if a lab or cluster of that prefix
    exists already; on any failure removes what it made."""
    _check_prefix(prefix)
    if not isinstance(gateways, int) or not max(SHARED_GATEWAYS) <= gateways <= MAX_GATEWAYS:
        raise ConfigError("--gateways", f"the cluster takes {max(SHARED_GATEWAYS)}..{MAX_GATEWAYS} gateways "
                                        f"(the shared subscriber crosses g1 and g2), not {gateways}")
    if not isinstance(subscribers, int) or not 1 <= subscribers <= MAX_CLUSTER_SUBSCRIBERS:
        raise ConfigError("--subscribers", f"the cluster takes 1..{MAX_CLUSTER_SUBSCRIBERS} subscribers "
                                           f"per gateway, not {subscribers}")
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces)")
    cluster = Cluster(prefix, gateways, subscribers)
    if cluster_namespaces(prefix) or lab_namespaces(prefix):
        raise LabError(f"a lab named {prefix!r} is up already: `python -m gateway.lab cluster-down "
                       f"--prefix {prefix}` (or `down`) first")
    cluster.run_dir.mkdir(parents=True, exist_ok=True)
    (cluster.run_dir / "cluster.json").write_text(
        json.dumps({"prefix": prefix, "gateways": gateways, "subscribers": subscribers}))
    try:
        _build_cluster(cluster)
    except BaseException:
        cluster_down(prefix)
        raise
    return cluster


def _build_cluster(c: Cluster) -> None:
    say(f"cluster namespaces {c.up}, {c.n_gateways} gateways, {c.n_gateways * c.n_subscribers} "
        f"subscribers and the shared {c.shared.ns}")
    for ns in c.namespaces:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
    sh("ip", "addr", "add", f"{UPSTREAM4}/32", "dev", "lo", ns=c.up)
    sh("ip", "-6", "addr", "add", f"{UPSTREAM6}/128", "dev", "lo", ns=c.up)
    for g in c.gateways:
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=g.ns)
        sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=g.ns)
        sh("ip", "link", "add", g.uplink, "netns", g.ns, "type", "veth", "peer", "name", f"g{g.k}", "netns", c.up)
        _addr(g.ns, g.uplink, f"{g.addr4}/24", f"{g.addr6}/64")
        _addr(c.up, f"g{g.k}", f"{g.next_hop4}/24", f"{g.next_hop6}/64")
        sh("ip", "route", "add", "default", "via", g.next_hop4, ns=g.ns)
        sh("ip", "-6", "route", "add", "default", "via", g.next_hop6, ns=g.ns)
        sh("nft", "-f", "-", ns=g.ns, input=(
            "table inet lab {\n"
            "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;\n"
            f"    oifname \"{g.uplink}\" masquerade\n  }}\n}}\n"))
    say("uplinks g<k> <-> upstream on 198.18.<k>.0/24 and 2001:db8:198:<k>::/64, masquerade on each")
    for sub in c.subscribers:
        for link in sub.links:
            gw = c.gw(link.gateway)
            sh("ip", "link", "add", link.gw_dev, "netns", gw, "type", "veth", "peer", "name", link.dev, "netns", sub.ns)
            _addr(gw, link.gw_dev, f"{link.gw_addr4}/24", f"{link.gw_addr6}/64")
            _addr(sub.ns, link.dev, f"{link.addr4}/24", f"{link.addr6}/64")
        first = sub.links[0]
        sh("ip", "route", "add", "default", "via", first.gw_addr4, ns=sub.ns)
        sh("ip", "-6", "route", "add", "default", "via", first.gw_addr6, ns=sub.ns)
        if len(sub.links) > 1:  # routed by source address: each address leaves through its own gateway
            for link in sub.links:
                table = str(100 + link.gateway)
                for fam, src, hop in (("-4", link.addr4, link.gw_addr4), ("-6", link.addr6, link.gw_addr6)):
                    sh("ip", fam, "route", "add", "default", "via", hop, "dev", link.dev, "table", table, ns=sub.ns)
                    sh("ip", fam, "rule", "add", "from", src, "lookup", table, "pref", table, ns=sub.ns)
    say(f"subscribers g<k>s<i> on 100.(64+k).<i>.2 behind gateway k; {SHARED} on "
        + " and ".join(f"{link.addr4} / {link.addr6} via g{link.gateway}" for link in c.shared.links))
    www = c.run_dir / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text("<h1>upstream</h1>\n")
    with open(www / "big.bin", "wb") as f:
        f.write(os.urandom(BIG_FILE))
    spawn(c, "http", c.up, sys.executable, "-m", "http.server", "80", "--bind", "::", "--directory", str(www))
    spawn(c, "iperf3", c.up, "iperf3", "-s")
    for g in c.gateways:
        spawn(c, f"dns-g{g.k}", g.ns, sys.executable, "-m", "gateway.labdns", UPSTREAM4, UPSTREAM6)
    _wait_port(c.up, 80)
    _wait_port(c.up, 5201)
    for g in c.gateways:
        _wait_port_udp(g.ns, 53)
    say(f"upstream serves http://{UPSTREAM4}/big.bin ({BIG_FILE} bytes) and iperf3; DNS answers on each gateway")
    _settle_cluster(c)


def _wait_port_udp(ns: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f":{port} " in sh("ss", "-Hlun", ns=ns, check=False).stdout:
            return
        time.sleep(0.1)
    raise LabError(f"nothing listens on UDP port {port} in {ns} after {timeout} s")


def _settle_cluster(c: Cluster, timeout: float = 10.0) -> None:
    """Wait until every address of every subscriber reaches the upstream, IPv4 and IPv6 (neighbour
    discovery), each from its own source address, so through its own gateway."""
    deadline = time.monotonic() + timeout
    for sub in c.subscribers:
        for link in sub.links:
            for src, dst in ((link.addr4, UPSTREAM4), (link.addr6, UPSTREAM6)):
                while sh("ping", "-c1", "-W1", "-I", src, dst, ns=sub.ns, check=False).returncode:
                    if time.monotonic() > deadline:
                        raise LabError(f"{sub.ns}: {src} does not reach {dst} through g{link.gateway}")
                    time.sleep(0.1)


def cluster_down(prefix: str = "tc") -> None:
    """Stop the cluster's processes and delete its namespaces (idempotent), as :func:`lab_down` does:
    the processes stopped are those living in its namespaces, whatever started them."""
    _check_prefix(prefix)
    run_dir = Path(f"/run/tollgate-cluster-{prefix}")
    mine = cluster_namespaces(prefix)
    if f"{prefix}-gw" in lab_namespaces(prefix) and not run_dir.exists():
        mine = [ns for ns in mine if ns != f"{prefix}-up"]  # that upstream is a one-gateway lab's: lab_down's
    _tear_down(mine, run_dir, f"cluster {prefix!r}")


def cluster_status(prefix: str = "tc") -> dict:
    """Print and return the cluster's namespaces (with their addresses) and processes."""
    _check_prefix(prefix)
    mine = cluster_namespaces(prefix)
    run_dir = Path(f"/run/tollgate-cluster-{prefix}")
    procs = {}
    for pidfile in sorted(run_dir.glob("*.pid")) if run_dir.exists() else []:
        pid = int(pidfile.read_text())
        procs[pidfile.stem] = (pid, _alive(pid))
    if not mine:
        print(f"no cluster named {prefix!r}")
    addresses = {}
    for ns in mine:
        out = sh("ip", "-br", "addr", ns=ns, check=False).stdout
        addresses[ns] = [a for line in out.splitlines() for a in line.split()[2:]
                         if not a.startswith(("fe80:", "127.", "::1/"))]
        print(f"{ns}: {' '.join(addresses[ns])}")
    for name, (pid, alive) in procs.items():
        print(f"process {name}: pid {pid} {'running' if alive else 'gone'}")
    return {"namespaces": mine, "addresses": addresses, "processes": procs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.lab", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("up", "down", "status", "cluster-up", "cluster-down", "cluster-status"))
    ap.add_argument("--subscribers", "-n", type=int, default=None,
                    help="subscribers (up: 4), per gateway (cluster-up: 2)")
    ap.add_argument("--gateways", "-g", type=int, default=3, help="gateways of cluster-up")
    ap.add_argument("--prefix", default=None, help="namespace prefix (tg; tc for the cluster)")
    args = ap.parse_args(argv)
    cluster = args.action.startswith("cluster-")
    args.prefix = args.prefix or ("tc" if cluster else "tg")
    if args.subscribers is None:
        args.subscribers = 2 if cluster else 4
    try:
        if args.action == "cluster-up":
            cluster_up(args.gateways, args.subscribers, args.prefix)
        elif args.action == "cluster-down":
            cluster_down(args.prefix)
        elif args.action == "cluster-status":
            cluster_status(args.prefix)
        elif args.action == "up":
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
