"""ISC Kea for real: Debian's kea-dhcp4-server in the lab's gateway namespace, its run_script hook
(libdhcp_run_script.so) running our `tollgate dhcp-hook kea` wrapper, a real dhclient in a subscriber
namespace. The lease becomes alice's session in the ledger, a running `tollgate run` counts the client's
bytes for her exactly as the kernel counted them, and the release ends the session (and the address
leaves the gateway).

Kea's config, lease file, control socket, pid and lock files, and dhclient's lease and pid files are all
in the test's tmp dir; every process started here is killed in a finally block; DESIGN.md ranges only."""

from __future__ import annotations

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
UP4 = "198.18.0.2"
BIG = 8 * 1024 * 1024
POOL = "100.64.201.10"
MAC = "52:54:00:00:c9:01"

for tool in ("kea-dhcp4", "dhclient"):
    if not any(Path(d, tool).exists() for d in ("/usr/bin", "/usr/sbin", "/sbin")):
        pytest.fail(f"{tool} is not installed: run `make system-deps`", pytrace=False)
if not RUN_SCRIPT.exists():
    pytest.fail(f"{RUN_SCRIPT} is missing (dpkg -L kea-common kea-dhcp4-server | grep run_script)", pytrace=False)

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

[sessions]
dhcp_grace = 5
"""

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


def kea_config(tmp: Path, hook: Path) -> dict:
    return {"Dhcp4": {
        "interfaces-config": {"interfaces": ["kbr"], "dhcp-socket-type": "raw"},
        "control-socket": {"socket-type": "unix", "socket-name": str(tmp / "kea4.sock")},
        "lease-database": {"type": "memfile", "persist": True, "name": str(tmp / "kea-leases4.csv"),
                           "lfc-interval": 0},
        "valid-lifetime": 120,
        "subnet4": [{"id": 1, "subnet": "100.64.201.0/24", "pools": [{"pool": f"{POOL} - {POOL}"}],
                     "option-data": [{"name": "routers", "data": "100.64.201.1"}]}],
        "hooks-libraries": [{"library": str(RUN_SCRIPT), "parameters": {"name": str(hook), "sync": False}}],
        "loggers": [{"name": "kea-dhcp4", "output_options": [{"output": str(tmp / "kea.log")}],
                     "severity": "INFO"}],
    }}


def wait_for(check, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def live_sessions(db) -> dict[str, tuple[str, str]]:
    from accounting.ledger import Ledger

    with Ledger.open(db) as ledger:
        return {n: (u, src) for n, u, src in ledger.db.execute(
            "SELECT s.network, u.name, s.source FROM sessions s JOIN subscribers u ON u.id = s.subscriber_id "
            "WHERE s.ended_ns IS NULL")}


def kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_kea_lease_is_a_session_counted_to_the_byte_and_its_release_ends_it(lab, tmp_path):
    sub = lab.sub(1)
    gw = Gateway(lab.gw, tmp_path, CONFIG)
    kea = None
    dhclient_pid = tmp_path / "dhclient.pid"
    net = f"{POOL}/32"
    try:
        netns(lab.gw, "ip", "link", "add", "kbr", "type", "bridge", check=True)
        netns(lab.gw, "ip", "addr", "add", "100.64.201.1/24", "dev", "kbr", check=True)
        netns(lab.gw, "ip", "link", "set", "kbr", "up", check=True)
        subprocess.run(["ip", "link", "add", "kh1", "netns", lab.gw, "type", "veth", "peer", "name", "kh0",
                        "netns", sub], check=True)
        netns(lab.gw, "ip", "link", "set", "kh1", "master", "kbr", "up", check=True)
        netns(sub, "ip", "link", "set", "kh0", "address", MAC, check=True)
        netns(sub, "ip", "link", "set", "kh0", "up", check=True)
        netns(sub, "ip", "-4", "route", "del", "default", check=True)  # the lease's router instead
        gw.start()
        got = gw.tollgate("binding", "add", "alice", "--mac", MAC)
        assert got.returncode == 0, got.stderr

        hook = tmp_path / "kea-hook"
        hook.write_text(f"#!/bin/sh\ncd {REPO} && exec {sys.executable} -m gateway.cli dhcp-hook -c {gw.config} "
                        f"--db {gw.db} --server lab-kea kea \"$@\" 2>>{tmp_path}/hook.log\n")
        hook.chmod(0o755)
        (tmp_path / "kea4.json").write_text(json.dumps(kea_config(tmp_path, hook)))
        env = {**os.environ, "KEA_PIDFILE_DIR": str(tmp_path), "KEA_LOCKFILE_DIR": str(tmp_path)}
        kea = subprocess.Popen(["ip", "netns", "exec", lab.gw, "kea-dhcp4", "-c", str(tmp_path / "kea4.json")],
                               env=env, stdout=open(tmp_path / "kea.out", "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
        wait_for(lambda: (tmp_path / "kea4.sock").exists() or kea.poll() is not None, 10, "Kea up")
        assert kea.poll() is None, (tmp_path / "kea.out").read_text()[-2000:]
        script = tmp_path / "dhclient-script"
        script.write_text(DHCLIENT_SCRIPT)
        script.chmod(0o755)
        dh = ["dhclient", "-4", "-v", "-lf", str(tmp_path / "dhclient.leases"), "-pf", str(dhclient_pid),
              "-sf", str(script), "kh0"]
        got = netns(sub, dh[0], "-1", *dh[1:], timeout=30)
        assert got.returncode == 0, got.stderr
        assert f"{POOL}/24" in netns(sub, "ip", "-4", "addr", "show", "kh0").stdout

        wait_for(lambda: live_sessions(gw.db) == {net: ("alice", "kea")}, 10, "the hook records the lease")
        wait_for(lambda: net in gw.kernel_counters(), 3, "the gateway counts the leased address")
        got = netns(sub, "curl", "-s", "-m", "20", "-o", "/dev/null", "-w", "%{size_download}",
                    f"http://{UP4}/big.bin")
        assert got.returncode == 0 and int(got.stdout) == BIG, got.stderr
        time.sleep(2.5)  # a flush
        counters = gw.kernel_counters()
        kernel = counters[net]["up_bytes"] + counters[net]["down_bytes"]
        assert ledger_bytes(gw.db)["alice"] == kernel > BIG

        got = netns(sub, dh[0], "-r", *dh[1:], timeout=30)
        assert got.returncode == 0, got.stderr
        wait_for(lambda: live_sessions(gw.db) == {}, 10, "the release ends the session")
        wait_for(lambda: net not in gw.kernel_counters(), 3, "the address leaves the gateway")
        rows = json.loads(gw.tollgate("session", "list", "--json").stdout)
        assert [(r["source"], r["client"], r["session_key"], r["mac"], r["end_reason"]) for r in rows] == \
            [("kea", "lab-kea", MAC, MAC, "released")]
        assert rows[0]["expires_ns"] is not None  # the lease's cltt + valid-lifetime + dhcp_grace
        hook_log = (tmp_path / "hook.log").read_text() if (tmp_path / "hook.log").exists() else ""
        assert "error" not in hook_log, hook_log
        problems = gw.tollgate("ledger", "check")
        assert problems.returncode == 0, problems.stdout + problems.stderr
    finally:
        try:
            os.kill(int(dhclient_pid.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        kill(kea)
        gw.stop()
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")
        netns(lab.gw, "ip", "link", "del", "kbr")
        netns(lab.gw, "ip", "link", "del", "kh1")
        netns(sub, "ip", "-4", "route", "replace", "default", "via", lab.gw_addr4(1))
