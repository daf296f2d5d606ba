"""Option 82 against the real servers: a relay agent (a lab namespace) sends relayed DHCPv4 with circuit-id and
remote-id to Debian's kea-dhcp4 2.2.0 and dnsmasq 2.90 running in the gateway namespace with our hook behind
them, and the lease binds to the subscriber that circuit names.

dhclient cannot add option 82 (a relay agent does), so the relay here is what one does on the wire: DISCOVER,
then REQUEST of the offered address, with giaddr (100.64.203.1, on the relay namespace's loopback) and hops 1,
from UDP port 67 of giaddr, the servers answering to giaddr:67; RELEASE at the end. scapy builds and parses the
BOOTP packets; a plain UDP socket carries them (no raw sockets). Each exchange is bounded (3 s per answer).

What the servers pass (recorded in tests/unit/test_dhcp_option82.py): Kea ``QUERY4_OPTION_82_SUB_OPTION_1`` =
``0x657468302F312F373A313030`` for "eth0/1/7:100"; dnsmasq ``DNSMASQ_CIRCUIT_ID=eth0/1/7:100``, the raw bytes.

Every process started here is killed in a finally block; the veth pair and routes are removed; DESIGN.md
ranges only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lablib import REPO, Gateway, netns

RUN_SCRIPT = Path("/usr/lib/x86_64-linux-gnu/kea/hooks/libdhcp_run_script.so")
SERVER, RELAY_LINK, GIADDR = "100.64.202.1", "100.64.202.2", "100.64.203.1"
POOL = ("100.64.203.10", "100.64.203.20")
SUBNET = "100.64.203.0/24"

for tool in ("kea-dhcp4", "dnsmasq"):
    if not any(Path(d, tool).exists() for d in ("/usr/bin", "/usr/sbin", "/sbin")):
        pytest.fail(f"{tool} is not installed: run `make system-deps`", pytrace=False)
if not RUN_SCRIPT.exists():
    pytest.fail(f"{RUN_SCRIPT} is missing (dpkg -L kea-common | grep run_script)", pytrace=False)


def config(circuit: str = "circuit-id") -> str:
    subs = "".join(f'[[subscriber]]\nname = "{n}"\ntariff = "lab"\nbalance = "10.00"\n\n'
                   for n in ("alice", "bob", "carol"))
    return (f'[gateway]\ncurrency = "EUR"\nlocal_networks = ["100.64.0.0/10", "2001:db8:100::/48"]\n\n'
            f'[[tariff]]\nname = "lab"\nprice_unit = "MB"\n[tariff.prices]\nexternal = "0.01"\n\n{subs}'
            f'[sessions]\ndhcp_grace = 5\ndhcp_circuit_id = "{circuit}"\n')


# The relay agent: argv MAC CIRCUIT_HEX REMOTE_HEX: DISCOVER and REQUEST, prints the acked address (or exits 1);
# argv MAC CIRCUIT_HEX REMOTE_HEX release ADDRESS: a RELEASE of it
RELAY = r'''
import socket, sys
from scapy.layers.dhcp import BOOTP, DHCP
mac = bytes.fromhex(sys.argv[1].replace(":", ""))
circuit, remote = bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
giaddr, server = "%(giaddr)s", "%(server)s"
o82 = bytes([1, len(circuit)]) + circuit + bytes([2, len(remote)]) + remote  # RFC 3046 sub-options 1 and 2
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((giaddr, 67))
s.settimeout(3)

def packet(xid, options, ciaddr="0.0.0.0"):
    return bytes(BOOTP(op=1, chaddr=mac + bytes(10), xid=xid, ciaddr=ciaddr, giaddr=giaddr, hops=1)
                 / DHCP(options=options + [(82, o82), "end"]))

def ask(xid, options):
    s.sendto(packet(xid, options), (server, 67))
    while True:  # bounded by the timeout: a stray answer of another xid is skipped
        reply = BOOTP(s.recvfrom(2048)[0])
        if reply.xid == xid:
            return reply, dict(o for o in reply[DHCP].options if isinstance(o, tuple))

if sys.argv[4:5] == ["release"]:  # RELEASE of the address argv[5] (no answer comes to a release)
    s.sendto(packet(0x5103, [("message-type", "release"), ("server_id", server)], sys.argv[5]), (server, 67))
    sys.exit(0)
offer, opts = ask(0x5101, [("message-type", "discover")])
ack, aopts = ask(0x5102, [("message-type", "request"), ("requested_addr", offer.yiaddr),
                          ("server_id", opts["server_id"])])
if aopts.get("message-type") != 5 or opts["server_id"] != server:
    sys.exit(f"no DHCPACK from {server}: {aopts}")
print(ack.yiaddr)
''' % {"giaddr": GIADDR, "server": SERVER}


def wait_for(check, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def live_sessions(db) -> dict[str, str]:
    from accounting.ledger import Ledger

    with Ledger.open(db) as ledger:
        return dict(ledger.db.execute("SELECT s.network, u.name FROM sessions s JOIN subscribers u ON "
                                      "u.id = s.subscriber_id WHERE s.ended_ns IS NULL"))


def kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Relay:
    """Lab subscriber 2's namespace as a relay agent, linked to the gateway by kr1 (gateway) <-> kr0 (relay)."""

    def __init__(self, lab, tmp: Path) -> None:
        self.lab, self.ns, self.tmp = lab, lab.sub(2), tmp
        self.script = tmp / "relay.py"
        self.script.write_text(RELAY)

    def up(self) -> None:
        lab = self.lab
        subprocess.run(["ip", "link", "add", "kr1", "netns", lab.gw, "type", "veth", "peer", "name", "kr0",
                        "netns", self.ns], check=True)
        netns(lab.gw, "ip", "addr", "add", f"{SERVER}/24", "dev", "kr1", check=True)
        netns(lab.gw, "ip", "link", "set", "kr1", "up", check=True)
        netns(self.ns, "ip", "addr", "add", f"{RELAY_LINK}/24", "dev", "kr0", check=True)
        netns(self.ns, "ip", "link", "set", "kr0", "up", check=True)
        netns(self.ns, "ip", "addr", "add", f"{GIADDR}/24", "dev", "lo", check=True)  # the relayed subnet's side
        netns(lab.gw, "ip", "route", "add", SUBNET, "via", RELAY_LINK, "dev", "kr1", check=True)

    def exchange(self, mac: str, circuit: bytes, remote: bytes, release: str | None = None) -> str:
        got = netns(self.ns, sys.executable, str(self.script), mac, circuit.hex(), remote.hex(),
                    *(["release", release] if release else []), timeout=30)
        assert got.returncode == 0, got.stdout + got.stderr
        return got.stdout.strip()

    def release(self, mac: str, circuit: bytes, remote: bytes, address: str) -> None:
        # a release of its own, as a client sends it long after its REQUEST: Kea runs the hooks of successive
        # packets at once ("sync": false), so a RELEASE right behind the REQUEST may be recorded before it
        self.exchange(mac, circuit, remote, release=address)

    def down(self) -> None:
        netns(self.lab.gw, "ip", "route", "del", SUBNET)
        netns(self.lab.gw, "ip", "link", "del", "kr1")
        netns(self.ns, "ip", "addr", "del", f"{GIADDR}/24", "dev", "lo")


def hook_script(tmp: Path, gw: Gateway, kind: str, server: str, by: str, cfg: Path | None = None) -> Path:
    hook = tmp / f"{kind}-hook"
    hook.write_text(f"#!/bin/sh\ncd {REPO} && exec {sys.executable} -m gateway.cli dhcp-hook -c {cfg or gw.config} "
                    f"--db {gw.db} --server {server} --by {by} {kind} \"$@\" 2>>{tmp}/hook.log\n")
    hook.chmod(0o755)
    return hook


def bind(gw: Gateway, *args: str) -> None:
    got = gw.tollgate("binding", "add", *args)
    assert got.returncode == 0, got.stderr


def check_hook_log(tmp: Path) -> str:
    log = (tmp / "hook.log").read_text() if (tmp / "hook.log").exists() else ""
    assert "error" not in log and "Traceback" not in log, log
    return log


def test_kea_passes_option_82_as_hex_and_the_lease_binds_by_circuit_id(lab, tmp_path):
    gw = Gateway(lab.gw, tmp_path, config())
    relay = Relay(lab, tmp_path)
    kea = None
    try:
        relay.up()
        gw.start()
        bind(gw, "alice", "--circuit-id", "eth0/1/7:100")
        bind(gw, "bob", "--mac", "52:54:00:00:cb:01")  # the same client's MAC: circuit_id comes first in --by
        bind(gw, "carol", "--circuit-id", "0x000400640107")  # a binary circuit-id: VLAN 100, module 1, port 7
        hook = hook_script(tmp_path, gw, "kea", "lab-kea4", "circuit_id,mac")
        cfg = {"Dhcp4": {
            "interfaces-config": {"interfaces": ["kr1"], "dhcp-socket-type": "udp"},  # relayed: unicast in
            "control-socket": {"socket-type": "unix", "socket-name": str(tmp_path / "kea4.sock")},
            "lease-database": {"type": "memfile", "persist": True, "name": str(tmp_path / "kea-leases4.csv"),
                               "lfc-interval": 0},
            "valid-lifetime": 120,
            "subnet4": [{"id": 1, "subnet": SUBNET, "pools": [{"pool": f"{POOL[0]} - {POOL[1]}"}]}],
            "hooks-libraries": [{"library": str(RUN_SCRIPT), "parameters": {"name": str(hook), "sync": False}}],
            "loggers": [{"name": "kea-dhcp4", "output_options": [{"output": str(tmp_path / "kea.log")}],
                         "severity": "INFO"}]}}
        (tmp_path / "kea4.json").write_text(json.dumps(cfg))
        env = {**os.environ, "KEA_PIDFILE_DIR": str(tmp_path), "KEA_LOCKFILE_DIR": str(tmp_path)}
        kea = subprocess.Popen(["ip", "netns", "exec", lab.gw, "kea-dhcp4", "-c", str(tmp_path / "kea4.json")],
                               env=env, stdout=open(tmp_path / "kea.out", "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
        wait_for(lambda: (tmp_path / "kea4.sock").exists() or kea.poll() is not None, 10, "Kea up")
        assert kea.poll() is None, (tmp_path / "kea.out").read_text()[-2000:]

        a = relay.exchange("52:54:00:00:cb:01", b"eth0/1/7:100", b"cpe-alice")
        wait_for(lambda: live_sessions(gw.db) == {f"{a}/32": "alice"}, 10, "alice's lease by her circuit-id")
        wait_for(lambda: f"{a}/32" in gw.kernel_counters(), 3, "the gateway counts alice's leased address")
        c = relay.exchange("52:54:00:00:cb:03", bytes.fromhex("000400640107"), b"cpe carol")
        wait_for(lambda: live_sessions(gw.db) == {f"{a}/32": "alice", f"{c}/32": "carol"}, 10,
                 "carol's lease by her binary circuit-id")
        # an unbound circuit: the lease is nobody's (and says so on stderr), the call is no error
        u = relay.exchange("52:54:00:00:cb:04", b"eth0/1/9:100", b"cpe-x")
        wait_for(lambda: "no binding names this lease" in (tmp_path / "hook.log").read_text(), 10,
                 "the hook says nobody's")
        assert f"{u}/32" not in live_sessions(gw.db)
        # a release relayed with the same option 82 ends alice's session
        relay.release("52:54:00:00:cb:01", b"eth0/1/7:100", b"cpe-alice", a)
        wait_for(lambda: live_sessions(gw.db) == {f"{c}/32": "carol"}, 10, "the release ends alice's session")
        rows = json.loads(gw.tollgate("session", "list", "--json").stdout)
        assert sorted((r["subscriber"], r["end_reason"]) for r in rows) == [("alice", "released"), ("carol", None)]
        check_hook_log(tmp_path)
        problems = gw.tollgate("ledger", "check")
        assert problems.returncode == 0, problems.stdout + problems.stderr
    finally:
        kill(kea)
        gw.stop()
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")
        relay.down()


def test_dnsmasq_passes_option_82_raw_and_the_lease_binds_by_remote_and_circuit_id(lab, tmp_path):
    gw = Gateway(lab.gw, tmp_path, config("remote-id|circuit-id"))
    relay = Relay(lab, tmp_path)
    dnsmasq = None
    try:
        relay.up()
        gw.start()
        bind(gw, "alice", "--circuit-id", "dslam-7|port 7")  # the pair, as [sessions] dhcp_circuit_id says
        bind(gw, "bob", "--circuit-id", "dslam-7|port 8")
        hook = hook_script(tmp_path, gw, "dnsmasq", "lab-dnsmasq", "circuit_id")
        dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", lab.gw, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
             "--interface=kr1", "--bind-interfaces", f"--dhcp-range={POOL[0]},{POOL[1]},255.255.255.0,2m",
             f"--dhcp-script={hook}", f"--dhcp-leasefile={tmp_path}/dnsmasq.leases",
             f"--pid-file={tmp_path}/dnsmasq.pid", "--no-ping", "--dhcp-authoritative", "--log-dhcp",
             "--user=root"],
            stdout=open(tmp_path / "dnsmasq.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(0.5)
        assert dnsmasq.poll() is None, (tmp_path / "dnsmasq.log").read_text()

        # circuit-ids with a space: before, the hook refused such a call outright (exit 2)
        a = relay.exchange("52:54:00:00:cb:11", b"port 7", b"dslam-7")
        b = relay.exchange("52:54:00:00:cb:12", b"port 8", b"dslam-7")
        wait_for(lambda: live_sessions(gw.db) == {f"{a}/32": "alice", f"{b}/32": "bob"}, 10,
                 "both leases by their (remote-id, circuit-id)")
        relay.release("52:54:00:00:cb:11", b"port 7", b"dslam-7", a)
        wait_for(lambda: live_sessions(gw.db) == {f"{b}/32": "bob"}, 10, "dnsmasq's del ends alice's session")
        check_hook_log(tmp_path)
    finally:
        kill(dnsmasq)
        gw.stop()
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")
        relay.down()
