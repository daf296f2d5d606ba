"""ISC Kea DHCPv6 for real: Debian's kea-dhcp6-server 2.2.0 in the lab's gateway namespace, its run_script hook
(libdhcp_run_script.so) running our `tollgate dhcp-hook kea` wrapper, and a real `dhclient -6 -N -P` in a
subscriber namespace asking for an address (IA_NA) and a delegated prefix (IA_PD, a /56) in one exchange.

What it shows: both leases become sessions of the subscriber their DUID is bound to (alice; bob's MAC binding
names the same client, and --by client_id,mac puts the DUID first), with the right /128 and /56; the
gateway routes the /56 to the client's address (as an operator's PD route would) and `tollgate run` counts
an 8 MiB download from an address of the delegated prefix for alice, exactly as its kernel counters did;
dhclient renews (real lease6_renew calls) without a new session; `dhclient -r` ends both sessions; a client
that dies without a release has its leases ended by Kea's own reclamation (lease6_expire) while our grace
is far away, so nothing but Kea's call could have ended them.

Kea's config, leases, server-id, control socket, pid and lock files, and dhclient's files are in the test's
tmp dir; every process started here is killed in a finally block; DESIGN.md ranges only (2001:db8:100::/48)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lablib import REPO, Gateway, ledger_bytes, netns

RUN_SCRIPT = Path("/usr/lib/x86_64-linux-gnu/kea/hooks/libdhcp_run_script.so")
UP6 = "2001:db8:198::2"
BIG = 8 * 1024 * 1024
LINK, GW6 = "2001:db8:100:c9::/64", "2001:db8:100:c9::1"
NA = "2001:db8:100:c9::100/128"  # the pool is this one address
PD_POOL, PD = "2001:db8:100:c000::", "2001:db8:100:c000::/56"  # a /52 pool delegating /56s: the first one
PD_POOL52 = ipaddress.ip_network("2001:db8:100:c000::/52")
MAC = "52:54:00:00:c9:61"
DUID = "00:03:00:01:" + MAC  # dhclient -D LL: DUID-LL (RFC 8415 11.4), hardware type 1, the MAC
VALID = 10  # s: short, so that Kea's own reclamation ends a dead client's leases within the test

for tool in ("kea-dhcp6", "dhclient"):
    if not any(Path(d, tool).exists() for d in ("/usr/bin", "/usr/sbin", "/sbin")):
        pytest.fail(f"{tool} is not installed: run `make system-deps`", pytrace=False)
if not RUN_SCRIPT.exists():
    pytest.fail(f"{RUN_SCRIPT} is missing (dpkg -L kea-common | grep run_script)", pytrace=False)

CONFIG = """
[gateway]
currency = "EUR"
local_networks = ["100.64.0.0/10", "2001:db8:100::/48"]

[[tariff]]
name = "lab"
price_unit = "MB"
[tariff.prices]
external = { upload = "0.01", download = "0.01" }

[[subscriber]]
name = "alice"
tariff = "lab"
balance = "100.00"

[[subscriber]]
name = "bob"
tariff = "lab"
balance = "100.00"

[sessions]
dhcp_grace = 600
"""

# only what the test needs of dhclient-script: the leased /128 on the link, nothing in /etc; the delegated
# prefix is the test's to number (as a CPE router numbers its LAN from it)
DHCLIENT_SCRIPT = """#!/bin/sh
case "$reason" in
  BOUND6|RENEW6|REBIND6)
    [ -n "$new_ip6_address" ] && ip -6 addr replace "$new_ip6_address/128" dev "$interface" nodad ;;
  EXPIRE6|RELEASE6|STOP6) [ -n "$old_ip6_address" ] && ip -6 addr del "$old_ip6_address/128" dev "$interface" ;;
esac
exit 0
"""


def kea_config(tmp: Path, hook: Path) -> dict:
    return {"Dhcp6": {
        "interfaces-config": {"interfaces": ["k6g"]},
        "server-id": {"type": "LL", "persist": False},  # not /var/lib/kea's file
        "data-directory": str(tmp),
        "control-socket": {"socket-type": "unix", "socket-name": str(tmp / "kea6.sock")},
        "lease-database": {"type": "memfile", "persist": True, "name": str(tmp / "kea-leases6.csv"),
                           "lfc-interval": 0},
        "renew-timer": 3, "rebind-timer": 6, "preferred-lifetime": 8, "valid-lifetime": VALID,
        # reclaim expired leases every second and forget them at once (lease6_expire is called then)
        "expired-leases-processing": {"reclaim-timer-wait-time": 1, "hold-reclaimed-time": 0,
                                      "flush-reclaimed-timer-wait-time": 0},
        "subnet6": [{"id": 1, "subnet": LINK, "interface": "k6g",
                     "pools": [{"pool": f"{NA[:-4]} - {NA[:-4]}"}],
                     "pd-pools": [{"prefix": PD_POOL, "prefix-len": 52, "delegated-len": 56}]}],
        "hooks-libraries": [{"library": str(RUN_SCRIPT), "parameters": {"name": str(hook), "sync": False}}],
        "loggers": [{"name": "kea-dhcp6", "output_options": [{"output": str(tmp / "kea6.log")}],
                     "severity": "INFO"}],
    }}


def wait_for(check, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - t0


def sessions(db, live: bool = True) -> list[tuple]:
    from accounting.ledger import Ledger

    with Ledger.open(db) as ledger:
        return sorted(ledger.db.execute(
            "SELECT s.network, u.name, s.session_key, s.mac, s.end_reason, s.last_seen_ns FROM sessions s "
            "JOIN subscribers u ON u.id = s.subscriber_id WHERE (s.ended_ns IS NULL) = ?", (live,)))


def live_owners(db) -> dict[str, str]:
    return {n: u for n, u, *_ in sessions(db)}


def kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def kill_pidfile(pf: Path, sig=signal.SIGTERM) -> None:
    try:
        os.kill(int(pf.read_text().strip()), sig)
    except (OSError, ValueError):
        pass


def test_kea6_address_and_delegated_prefix_are_the_duids_subscribers_counted_released_and_expired(lab, tmp_path):
    sub = lab.sub(1)
    gw = Gateway(lab.gw, tmp_path, CONFIG)
    kea = None
    pidfiles = []
    try:
        subprocess.run(["ip", "link", "add", "k6g", "netns", lab.gw, "type", "veth", "peer", "name", "k6s",
                        "netns", sub], check=True)
        # no DAD on this link: the client's link-local (which dhclient -6 binds to) is usable at once
        netns(sub, "sysctl", "-qw", "net.ipv6.conf.k6s.accept_dad=0", check=True)
        netns(lab.gw, "sysctl", "-qw", "net.ipv6.conf.k6g.accept_dad=0", check=True)
        netns(sub, "ip", "link", "set", "k6s", "address", MAC, check=True)
        netns(lab.gw, "ip", "-6", "addr", "add", f"{GW6}/64", "dev", "k6g", "nodad", check=True)
        netns(lab.gw, "ip", "link", "set", "k6g", "up", check=True)
        netns(sub, "ip", "link", "set", "k6s", "up", check=True)
        # the subscriber's v6 goes out over the DHCP link (a router advertisement would say so)
        netns(sub, "ip", "-6", "route", "add", LINK, "dev", "k6s", check=True)
        netns(sub, "ip", "-6", "route", "replace", "default", "via", GW6, "dev", "k6s", check=True)
        gw.start()
        for args in (("alice", "--client-id", DUID), ("bob", "--mac", MAC)):
            got = gw.tollgate("binding", "add", *args)
            assert got.returncode == 0, got.stderr

        hook = tmp_path / "kea-hook"
        hook.write_text(f"#!/bin/sh\ncd {REPO} && exec {sys.executable} -m gateway.cli dhcp-hook -c {gw.config} "
                        f"--db {gw.db} --server lab-kea6 --by client_id,mac kea \"$@\" 2>>{tmp_path}/hook.log\n")
        hook.chmod(0o755)
        (tmp_path / "kea6.json").write_text(json.dumps(kea_config(tmp_path, hook)))
        env = {**os.environ, "KEA_PIDFILE_DIR": str(tmp_path), "KEA_LOCKFILE_DIR": str(tmp_path)}
        kea = subprocess.Popen(["ip", "netns", "exec", lab.gw, "kea-dhcp6", "-c", str(tmp_path / "kea6.json")],
                               env=env, stdout=open(tmp_path / "kea.out", "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
        wait_for(lambda: (tmp_path / "kea6.sock").exists() or kea.poll() is not None, 10, "Kea up")
        assert kea.poll() is None, (tmp_path / "kea.out").read_text()[-2000:]
        script = tmp_path / "dhclient-script"
        script.write_text(DHCLIENT_SCRIPT)
        script.chmod(0o755)

        def dhclient(n: int, *extra: str) -> subprocess.CompletedProcess:
            pf = tmp_path / f"dhclient{n}.pid"
            if pf not in pidfiles:
                pidfiles.append(pf)
            return netns(sub, "dhclient", "-6", "-N", "-P", "-D", "LL", *extra, "-v", "-lf",
                         str(tmp_path / f"dhclient{n}.leases"), "-pf", str(pf), "-sf", str(script), "k6s",
                         timeout=40)

        # ---- an address and a prefix, both alice's by her DUID ---------------------------------------------
        got = dhclient(1, "-1")
        assert got.returncode == 0, got.stderr
        assert "2001:db8:100:c9::100/128" in netns(sub, "ip", "-6", "addr", "show", "k6s").stdout
        wait_for(lambda: live_owners(gw.db) == {NA: "alice", PD: "alice"}, 10, "the hook records both leases")
        rows = {r[0]: r for r in sessions(gw.db)}
        assert rows[NA][2:4] == (f"{NA} ia_na duid {DUID}", MAC) and rows[PD][2:4] == (f"{PD} ia_pd duid {DUID}", MAC)
        wait_for(lambda: {NA, PD} <= set(gw.kernel_counters()), 3, "the gateway counts the address and the prefix")

        # the delegated prefix routed to the client (Kea hands it out, routing it is the operator's), and an
        # address of it on the client, as a CPE numbers its LAN
        netns(lab.gw, "ip", "-6", "route", "add", PD, "via", NA[:-4], "dev", "k6g", check=True)
        lan = PD_POOL + "1"
        netns(sub, "ip", "-6", "addr", "add", f"{lan}/128", "dev", "lo", check=True)
        got = netns(sub, "curl", "-s", "-m", "20", "--interface", lan, "-o", "/dev/null", "-w", "%{size_download}",
                    f"http://[{UP6}]/big.bin")
        assert got.returncode == 0 and int(got.stdout) == BIG, got.stderr
        got = netns(sub, "ping", "-c", "3", "-i", "0.2", "-W", "2", "-I", NA[:-4], UP6)  # from the address too
        assert got.returncode == 0, got.stdout + got.stderr
        seen = {r[0]: r[5] for r in sessions(gw.db)}
        time.sleep(4)  # a flush, and a renewal (renew-timer 3 s)
        counters = gw.kernel_counters()
        pd_bytes = counters[PD]["up_bytes"] + counters[PD]["down_bytes"]
        na_bytes = counters[NA]["up_bytes"] + counters[NA]["down_bytes"]
        assert pd_bytes > BIG and na_bytes >= 3 * 2 * (40 + 64)  # 3 echo requests and replies, 104 B each
        assert ledger_bytes(gw.db) == {"alice": pd_bytes + na_bytes, "bob": 0}
        renewed = {r[0]: r for r in sessions(gw.db)}
        assert set(renewed) == {NA, PD} and all(renewed[n][5] > seen[n] for n in (NA, PD)), "no renewal reached us"

        # ---- release: both sessions end, both networks leave the gateway ---------------------------------
        got = dhclient(1, "-r")
        assert got.returncode == 0, got.stderr
        wait_for(lambda: live_owners(gw.db) == {}, 10, "the release ends both sessions")
        wait_for(lambda: not {NA, PD} & set(gw.kernel_counters()), 3, "the address and the prefix leave the gateway")
        assert [(r[0], r[1], r[4]) for r in sessions(gw.db, live=False)] == \
            [(PD, "alice", "released"), (NA, "alice", "released")]
        netns(lab.gw, "ip", "-6", "route", "del", PD)

        # ---- a client that dies: Kea reclaims its leases and our hook ends the sessions --------------------
        got = dhclient(2, "-1")
        assert got.returncode == 0, got.stderr

        def second() -> str | None:  # Kea hands out the pool's next /56 (the released one rests a while)
            live = live_owners(gw.db)
            pds = [n for n in live if n != NA and ipaddress.ip_network(n).subnet_of(PD_POOL52)]
            ok = len(live) == 2 and live.get(NA) == "alice" and len(pds) == 1 and live[pds[0]] == "alice"
            return pds[0] if ok and ipaddress.ip_network(pds[0]).prefixlen == 56 else None

        wait_for(second, 10, "the second client's leases")
        pd2 = second()
        kill_pidfile(tmp_path / "dhclient2.pid", signal.SIGKILL)  # no release
        took = wait_for(lambda: live_owners(gw.db) == {}, VALID + 10, "Kea's lease6_expire ends the sessions")
        print(f"dead client's sessions ended {took:.1f} s after its kill (valid-lifetime {VALID} s)")
        closed = sessions(gw.db, live=False)
        assert sorted((r[0], r[4]) for r in closed) == sorted([(PD, "released"), (NA, "released"), (NA, "expired"),
                                                               (pd2, "expired")])

        hook_log = (tmp_path / "hook.log").read_text() if (tmp_path / "hook.log").exists() else ""
        assert "error" not in hook_log and "Traceback" not in hook_log, hook_log
        problems = gw.tollgate("ledger", "check")
        assert problems.returncode == 0, problems.stdout + problems.stderr
    finally:
        for pf in pidfiles:
            kill_pidfile(pf)
        kill(kea)
        gw.stop()
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")
        netns(lab.gw, "ip", "-6", "route", "del", PD)
        netns(lab.gw, "ip", "link", "del", "k6g")
        netns(sub, "ip", "-6", "addr", "del", PD_POOL + "1/128", "dev", "lo")
        netns(sub, "ip", "-6", "route", "replace", "default", "via", "2001:db8:100:1::1", "dev", "eth0")
