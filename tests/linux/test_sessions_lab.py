"""Sessions with the real parts in the lab: Debian's radclient talking to `tollgate radius serve`, and a real
dnsmasq (in the gateway namespace, with our hook as its --dhcp-script) handing one address to two dhclients in
turn, while `tollgate run` counts: each subscriber is charged exactly its own bytes, as the kernel counted them.

Everything runs inside the lab's namespaces (DESIGN.md ranges only); every process started here is killed in a
finally block (and lab_down kills whatever lives in the namespaces); traffic loops are bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lablib import REPO, TOLLGATE, Gateway, ledger_bytes, netns

UP4 = "198.18.0.2"
BIG = 8 * 1024 * 1024
SECRET = "lab-secret"
POOL = "100.64.200.10"  # dnsmasq's pool is this one address: a released lease goes to the next client

for tool in ("radclient", "dnsmasq", "dhclient"):
    if not any(Path(d, tool).exists() for d in ("/usr/bin", "/usr/sbin", "/sbin")):
        pytest.fail(f"{tool} is not installed: run `make system-deps`", pytrace=False)


def config(grace: int = 60) -> str:
    return f"""
[gateway]
currency = "EUR"
local_networks = ["100.64.0.0/10", "2001:db8:100::/48"]

[[tariff]]
name = "lab"
price_unit = "MB"
[tariff.prices]
external = {{ upload = "0.01", download = "0.01" }}

[[subscriber]]
name = "alice"
tariff = "lab"
balance = "100.00"

[[subscriber]]
name = "bob"
tariff = "lab"
balance = "100.00"

[sessions]
interim_interval = 1
interim_missed = 1
grace = {grace}
expiry_check = 0.2
dhcp_grace = 5

[radius]
listen = ["198.18.0.1:1813", "[2001:db8:198::1]:1813"]

[[radius.client]]
name = "bras1"
address = "198.18.0.0/24"
secret = "{SECRET}"
"""


def wait_for(check, timeout: float = 5.0, what: str = "") -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s: {what or check}"
        time.sleep(0.1)
    return time.monotonic() - t0


def cleanup_gateway(lab) -> None:
    netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")


def kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def live_sessions(db) -> dict[str, str]:
    from accounting.ledger import Ledger

    with Ledger.open(db) as ledger:
        return dict(ledger.db.execute("SELECT s.network, u.name FROM sessions s JOIN subscribers u ON "
                                      "u.id = s.subscriber_id WHERE s.ended_ns IS NULL"))


# ---- RADIUS -------------------------------------------------------------------------------------------------

def radclient(lab, lines: str, secret: str = SECRET, server: str = "198.18.0.1") -> subprocess.CompletedProcess:
    """Debian's radclient, from the upstream namespace (our "access server"), one try of 2 s."""
    return subprocess.run(["ip", "netns", "exec", lab.up, "radclient", "-r", "1", "-t", "2", "-x",
                           f"{server}:1813", "acct", secret], input=lines, capture_output=True, text=True, timeout=20)


@pytest.fixture
def radius_gateway(lab, tmp_path, request):
    gw = Gateway(lab.gw, tmp_path, config(getattr(request, "param", 60))).start()
    log = open(tmp_path / "radius.log", "w")
    srv = subprocess.Popen(["ip", "netns", "exec", lab.gw, *TOLLGATE, "-v", "radius", "serve", "-c", str(gw.config),
                            "--db", str(gw.db), "--metrics", "127.0.0.1:9813"], cwd=REPO, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: ":1813 " in netns(lab.gw, "ss", "-Hlun").stdout, 15, "radius serve listening")
        yield gw, tmp_path / "radius.log"
    finally:
        kill(srv)
        gw.stop()
        cleanup_gateway(lab)


def test_radclient_start_interim_stop_accounting_on_and_a_bad_secret(lab, radius_gateway):
    gw, log = radius_gateway
    start = ("Acct-Status-Type = Start\nUser-Name = alice\nAcct-Session-Id = \"s-1\"\n"
             f"Framed-IP-Address = {lab.sub_addr4(1)}\nDelegated-IPv6-Prefix = 2001:db8:100:1::/64\n")
    got = radclient(lab, start)
    assert got.returncode == 0 and "Accounting-Response" in got.stdout, got.stdout + got.stderr
    # the running gateway counts the session's addresses within a second
    took = wait_for(lambda: f"{lab.sub_addr4(1)}/32" in gw.kernel_counters(), 3, "the gateway picks the Start up")
    assert took < 1.5
    got = netns(lab.sub(1), "curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", f"http://{UP4}/big.bin")
    assert got.returncode == 0 and int(got.stdout) == BIG
    assert radclient(lab, "Acct-Status-Type = Interim-Update\nUser-Name = alice\nAcct-Session-Id = \"s-1\"\n"
                          "Acct-Output-Octets = 8400000\n").returncode == 0
    time.sleep(2.5)  # a flush
    counters = gw.kernel_counters()
    kernel = sum(counters[n]["up_bytes"] + counters[n]["down_bytes"]
                 for n in (f"{lab.sub_addr4(1)}/32", "2001:db8:100:1::/64"))
    assert ledger_bytes(gw.db)["alice"] == kernel > BIG

    # a bad secret: no answer, nothing written
    before = live_sessions(gw.db)
    bad = radclient(lab, start.replace("s-1", "s-2").replace(lab.sub_addr4(1), lab.sub_addr4(2)), secret="wrong")
    assert bad.returncode != 0 and "Accounting-Response" not in bad.stdout
    assert live_sessions(gw.db) == before

    # Stop: the addresses leave the gateway
    assert radclient(lab, "Acct-Status-Type = Stop\nUser-Name = alice\nAcct-Session-Id = \"s-1\"\n"
                          "Acct-Output-Octets = 8500000\n").returncode == 0
    wait_for(lambda: f"{lab.sub_addr4(1)}/32" not in gw.kernel_counters(), 3, "the gateway drops the Stop's address")

    # Accounting-On from a restarted access server ends its sessions
    assert radclient(lab, start.replace("s-1", "s-3").replace("alice", "bob")).returncode == 0
    wait_for(lambda: live_sessions(gw.db) == {f"{lab.sub_addr4(1)}/32": "bob", "2001:db8:100:1::/64": "bob"}, 3)
    assert radclient(lab, "Acct-Status-Type = Accounting-On\nNAS-IP-Address = 198.18.0.2\n").returncode == 0
    wait_for(lambda: live_sessions(gw.db) == {}, 3, "Accounting-On closes bras1's sessions")
    metrics = netns(lab.gw, "curl", "-s", "-m", "2", "http://127.0.0.1:9813/metrics").stdout
    assert 'tollgate_radius_packets_total{result="bad_authenticator"} 1.0' in metrics, metrics
    assert 'tollgate_radius_packets_total{result="accepted"} 5.0' in metrics
    problems = gw.tollgate("ledger", "check")
    assert problems.returncode == 0, problems.stdout + problems.stderr


@pytest.mark.parametrize("radius_gateway", [1], indirect=True)  # TTL: 1 s interim * 1 + 1 s grace
def test_a_lost_stop_is_closed_by_the_ttl(lab, radius_gateway):
    gw, _ = radius_gateway
    start = ("Acct-Status-Type = Start\nUser-Name = bob\nAcct-Session-Id = \"lost-1\"\n"
             f"Framed-IP-Address = {lab.sub_addr4(2)}\n")
    assert radclient(lab, start).returncode == 0
    wait_for(lambda: f"{lab.sub_addr4(2)}/32" in gw.kernel_counters(), 3)
    # TTL = 1 s interim * 1 + 1 s grace; the server looks every 0.2 s; the gateway follows within a poll
    wait_for(lambda: f"{lab.sub_addr4(2)}/32" not in gw.kernel_counters(), 5, "the TTL ends the session")
    out = json.loads(gw.tollgate("session", "list", "--closed", "--json").stdout)
    assert [(r["session_key"], r["end_reason"]) for r in out] == [("lost-1", "expired")]


# ---- DHCP: dnsmasq and dhclient ---------------------------------------------------------------------------

DHCLIENT_SCRIPT = """#!/bin/sh
# only what the test needs of dhclient-script: the address and the default route, nothing in /etc
case "$reason" in
  PREINIT) ip link set "$interface" up ;;
  BOUND|RENEW|REBIND|REBOOT)
    ip -4 addr flush dev "$interface"
    ip -4 addr add "$new_ip_address/24" dev "$interface"
    ip -4 route replace default via "$new_routers" dev "$interface" ;;
  EXPIRE|FAIL|RELEASE|STOP) ip -4 addr flush dev "$interface" ;;
esac
exit 0
"""


class Dhcp:
    """A bridge in the gateway namespace with dnsmasq on it, and dh0 interfaces of subscribers 3 and 4 on it."""

    def __init__(self, lab, tmp: Path, gw: Gateway) -> None:
        self.lab, self.tmp, self.gw = lab, tmp, gw
        self.dnsmasq: subprocess.Popen | None = None
        self.clients: dict[int, Path] = {}

    def up(self) -> None:
        lab = self.lab
        netns(lab.gw, "ip", "link", "add", "dhbr", "type", "bridge", check=True)
        netns(lab.gw, "ip", "addr", "add", "100.64.200.1/24", "dev", "dhbr", check=True)
        netns(lab.gw, "ip", "link", "set", "dhbr", "up", check=True)
        for i in (3, 4):
            subprocess.run(["ip", "link", "add", f"dh{i}", "netns", lab.gw, "type", "veth", "peer", "name", "dh0",
                            "netns", lab.sub(i)], check=True)
            netns(lab.gw, "ip", "link", "set", f"dh{i}", "master", "dhbr", "up", check=True)
            netns(lab.sub(i), "ip", "link", "set", "dh0", "address", f"52:54:00:00:c8:0{i}", check=True)
            netns(lab.sub(i), "ip", "link", "set", "dh0", "up", check=True)
            netns(lab.sub(i), "ip", "-4", "route", "del", "default", check=True)  # dhclient's router instead
        hook = self.tmp / "dhcp-hook"
        hook.write_text(f"#!/bin/sh\ncd {REPO} && exec {sys.executable} -m gateway.cli dhcp-hook -c {self.gw.config} "
                        f"--db {self.gw.db} --server lab-dnsmasq dnsmasq \"$@\" 2>>{self.tmp}/hook.log\n")
        hook.chmod(0o755)
        script = self.tmp / "dhclient-script"
        script.write_text(DHCLIENT_SCRIPT)
        script.chmod(0o755)
        log = open(self.tmp / "dnsmasq.log", "w")
        self.dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", lab.gw, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
             "--interface=dhbr", "--bind-interfaces", f"--dhcp-range={POOL},{POOL},255.255.255.0,2m",
             "--dhcp-option=option:router,100.64.200.1", f"--dhcp-script={hook}",
             f"--dhcp-leasefile={self.tmp}/dnsmasq.leases", f"--pid-file={self.tmp}/dnsmasq.pid", "--no-ping",
             "--dhcp-authoritative", "--log-dhcp", "--user=root"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(0.5)
        assert self.dnsmasq.poll() is None, (self.tmp / "dnsmasq.log").read_text()

    def lease(self, i: int) -> None:
        """dhclient in subscriber i: one try, then it keeps the lease in the background (its pid file)."""
        lf, pf = self.tmp / f"dhclient{i}.leases", self.tmp / f"dhclient{i}.pid"
        self.clients[i] = pf
        got = netns(self.lab.sub(i), "dhclient", "-4", "-1", "-v", "-lf", str(lf), "-pf", str(pf), "-sf",
                    str(self.tmp / "dhclient-script"), "dh0", timeout=30)
        assert got.returncode == 0, got.stderr
        assert f"{POOL}/24" in netns(self.lab.sub(i), "ip", "-4", "addr", "show", "dh0").stdout

    def release(self, i: int) -> None:
        got = netns(self.lab.sub(i), "dhclient", "-4", "-r", "-v", "-lf", str(self.tmp / f"dhclient{i}.leases"),
                    "-pf", str(self.clients[i]), "-sf", str(self.tmp / "dhclient-script"), "dh0", timeout=30)
        assert got.returncode == 0, got.stderr

    def down(self) -> None:
        for pf in self.clients.values():
            try:
                os.kill(int(pf.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        kill(self.dnsmasq)
        netns(self.lab.gw, "ip", "link", "del", "dhbr")
        for i in (3, 4):
            netns(self.lab.sub(i), "ip", "link", "del", "dh0")
            netns(self.lab.sub(i), "ip", "-4", "route", "replace", "default", "via", self.lab.gw_addr4(i))


def download(lab, i: int) -> int:
    got = netns(lab.sub(i), "curl", "-s", "-m", "20", "-o", "/dev/null", "-w", "%{size_download}",
                f"http://{UP4}/big.bin")
    assert got.returncode == 0, got.stderr
    return int(got.stdout)


def test_a_dnsmasq_lease_moves_between_subscribers_and_each_pays_its_own_bytes(lab, tmp_path):
    gw = Gateway(lab.gw, tmp_path, config()).start()
    dhcp = Dhcp(lab, tmp_path, gw)
    net = f"{POOL}/32"
    try:
        for name, i in (("alice", 3), ("bob", 4)):
            r = gw.tollgate("binding", "add", name, "--mac", f"52:54:00:00:c8:0{i}")
            assert r.returncode == 0, r.stderr
        dhcp.up()
        dhcp.lease(3)
        t_lease = time.monotonic()
        wait_for(lambda: live_sessions(gw.db) == {net: "alice"}, 10, "the hook records alice's lease")
        wait_for(lambda: net in gw.kernel_counters(), 3, "the gateway counts the leased address")
        print(f"lease to counted: {time.monotonic() - t_lease:.2f} s after dhclient returned")
        assert download(lab, 3) == BIG
        time.sleep(2.5)
        alice = ledger_bytes(gw.db)["alice"]
        counters = gw.kernel_counters()
        assert alice == counters[net]["up_bytes"] + counters[net]["down_bytes"] > BIG

        dhcp.release(3)
        wait_for(lambda: live_sessions(gw.db) == {}, 10, "the hook ends alice's lease (del)")
        wait_for(lambda: net not in gw.kernel_counters(), 3, "the address leaves the gateway")
        t_handover = time.time_ns()
        dhcp.lease(4)  # the pool's one address again, to bob's MAC
        wait_for(lambda: live_sessions(gw.db) == {net: "bob"}, 10, "the hook records bob's lease")
        wait_for(lambda: net in gw.kernel_counters(), 3)
        assert download(lab, 4) == BIG
        assert download(lab, 4) == BIG
        time.sleep(2.5)
        counted = ledger_bytes(gw.db)
        counters = gw.kernel_counters()
        assert counted["alice"] == alice  # nothing of bob's traffic went to alice
        assert counted["bob"] == counters[net]["up_bytes"] + counters[net]["down_bytes"] > 2 * BIG

        who = json.loads(gw.tollgate("session", "who", POOL, "--json").stdout)
        assert [w["subscriber"] for w in who] == ["bob"]
        from accounting.ledger import Ledger
        from accounting.operations import Operations
        from gateway.config import load_config

        with Ledger.open(gw.db) as ledger:
            ops = Operations(ledger, load_config(gw.config), "test")
            assert [w["subscriber"] for w in ops.who_had(POOL, t_handover)] == []  # between the two leases
            rows = ops.sessions()
            assert [(r["subscriber"], r["end_reason"]) for r in rows] == [("alice", "released"), ("bob", None)]
            assert [w["subscriber"] for w in ops.who_had(POOL, rows[0]["started_ns"] + 1)] == ["alice"]
            assert ledger.check_invariants() == []

        # dnsmasq restarted: it replays its leases as `old`: the same session seen again, nothing new
        def bob_seen() -> int:
            return next(r["last_seen_ns"] for r in json.loads(gw.tollgate("session", "list", "--live", "--json").stdout))

        seen = bob_seen()
        args = dhcp.dnsmasq.args
        kill(dhcp.dnsmasq)
        dhcp.dnsmasq = subprocess.Popen(args, stdout=open(tmp_path / "dnsmasq.log", "a"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        wait_for(lambda: bob_seen() > seen, 10, "dnsmasq's `old` reaches the hook")
        assert live_sessions(gw.db) == {net: "bob"}
        assert len(json.loads(gw.tollgate("session", "list", "--json").stdout)) == 2
    finally:
        dhcp.down()
        gw.stop()
        cleanup_gateway(lab)


def test_garbage_hook_arguments_write_nothing(lab, tmp_path):
    gw = Gateway(lab.gw, tmp_path, config())
    for args in (["dnsmasq", "add", "not-a-mac", POOL], ["dnsmasq", "add", "52:54:00:00:c8:03", "999.1.1.1"],
                 ["dnsmasq", "explode", "52:54:00:00:c8:03", POOL], ["dnsmasq"], ["kea", "lease4_renew"],
                 ["kea", "lease4_renew", "extra"], ["dnsmasq", "add", "52:54:00:00:c8:03"]):
        got = subprocess.run([*TOLLGATE, "dhcp-hook", "-c", str(gw.config), "--db", str(gw.db), *args], cwd=REPO,
                             capture_output=True, text=True, timeout=30)
        assert got.returncode == 2 and "error" in got.stderr, (args, got.stderr)
    assert not gw.db.exists()  # refused before the ledger was even opened
