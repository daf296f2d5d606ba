"""The namespace lab itself: traffic crosses the gateway in both families,
the upstream sees only the gateway's masqueraded address, the lab's servers
answer, and ``down`` removes everything ``up`` made, and nothing else."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from pathlib import Path

import pytest
from lablib import netns

from ext.errors import ConfigError
from gateway.lab import (
    BIG_FILE,
    GATEWAY_UP4,
    GATEWAY_UP6,
    UPSTREAM4,
    UPSTREAM6,
    LabError,
    _alive,
    lab_down,
    lab_namespaces,
    lab_status,
    lab_up,
)


def test_ping_both_families_from_every_subscriber(lab):
    for i in range(1, lab.n + 1):
        for dst in (UPSTREAM4, UPSTREAM6):
            got = netns(lab.sub(i), "ping", "-c", "2", "-i", "0.2", "-W", "2", dst, timeout=20)
            assert got.returncode == 0, (i, dst, got.stdout)


def test_download_of_the_known_file_both_families(lab):
    want = hashlib.sha256((lab.run_dir / "www" / "big.bin").read_bytes()).hexdigest()
    for host in (UPSTREAM4, f"[{UPSTREAM6}]"):
        proc = netns(lab.sub(2), "sh", "-c", f"curl -s -m 20 http://{host}/big.bin | sha256sum", timeout=30)
        assert proc.stdout.split()[0] == want, host
    assert (lab.run_dir / "www" / "big.bin").stat().st_size == BIG_FILE


@pytest.mark.parametrize("family", ["-4", "-6"])
def test_iperf3_across_the_gateway(lab, family):
    server = UPSTREAM4 if family == "-4" else UPSTREAM6
    got = netns(lab.sub(3), "iperf3", family, "-c", server, "-t", "2", "-J", timeout=30)
    assert got.returncode == 0, got.stdout[-500:] + got.stderr
    result = json.loads(got.stdout)["end"]
    assert result["sum_received"]["bytes"] > 0
    print(f"\niperf3 {family} through the gateway: {result['sum_received']['bits_per_second'] / 1e9:.1f} Gbit/s")


def test_upstream_sees_only_the_masqueraded_gateway(lab):
    tag = uuid.uuid4().hex
    for fam, host in (("4", UPSTREAM4), ("6", f"[{UPSTREAM6}]")):
        assert netns(lab.sub(4), "curl", "-s", "-m", "5", "-o", "/dev/null", f"http://{host}/?{tag}{fam}").returncode == 0
    log = (lab.run_dir / "http.log").read_text().replace("::ffff:", "")  # the server is dual-stack: v4-mapped
    lines = {fam: [line for line in log.splitlines() if f"{tag}{fam}" in line] for fam in "46"}
    assert lines["4"] and all(line.startswith(f"{GATEWAY_UP4} ") for line in lines["4"]), lines
    assert lines["6"] and all(line.startswith(f"{GATEWAY_UP6} ") for line in lines["6"]), lines
    assert "100.64." not in log and "2001:db8:100:" not in log


def test_dns_responder_on_the_gateway(lab):
    # RFC 1035 query for www.example, A (1) then AAAA (28)
    name = bytes.fromhex("03777777076578616d706c6500")
    for qtype, want in ((1, UPSTREAM4), (28, UPSTREAM6)):
        query = bytes.fromhex("abcd01000001000000000000") + name + qtype.to_bytes(2, "big") + b"\x00\x01"
        code = ("import socket, ipaddress; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); "
                f"s.sendto({query!r}, ('{lab.gw_addr4(1)}', 53)); r = s.recv(512); "
                f"print(ipaddress.ip_address(r[-{4 if qtype == 1 else 16}:]))")
        assert netns(lab.sub(1), sys.executable, "-c", code, timeout=20).stdout.strip() == want


def test_status_lists_namespaces_addresses_and_processes(lab, capsys):
    status = lab_status(lab.prefix)
    assert set(status["namespaces"]) == {lab.gw, lab.up} | {lab.sub(i) for i in range(1, lab.n + 1)}
    assert f"{lab.sub_addr4(2)}/24" in status["addresses"][lab.sub(2)]
    assert f"{lab.sub_addr6(2)}/64" in status["addresses"][lab.sub(2)]
    assert f"{UPSTREAM6}/64" in status["addresses"][lab.up]
    assert {name: alive for name, (_pid, alive) in status["processes"].items()} == \
        {"http": True, "iperf3": True, "dns": True}
    assert f"{lab.gw}: " in capsys.readouterr().out


def host_view() -> tuple[str, str]:
    """The host namespace's links and ruleset: read only, to show the lab left them alone."""
    links = sorted(line.split(":")[1].split("@")[0].strip()
                   for line in os.popen("ip -o link show").read().splitlines())
    return "\n".join(links), os.popen("nft list ruleset").read()


def test_up_refuses_bad_input_and_down_removes_everything_twice():
    prefix = f"tx{os.getpid() % 10000:04d}"
    for n in (0, 201):
        with pytest.raises(ConfigError, match="subscribers"):
            lab_up(n, prefix)
    with pytest.raises(ConfigError, match="prefix"):
        lab_up(1, "Bad/Prefix")
    assert lab_namespaces(prefix) == [] and not Path(f"/run/tollgate-lab-{prefix}").exists()

    host_before = host_view()
    lab = lab_up(2, prefix)
    try:
        assert host_view() == host_before  # only namespaces and the veths inside them
        with pytest.raises(LabError, match="up already"):
            lab_up(1, prefix)
        pids = [int(p.read_text()) for p in lab.run_dir.glob("*.pid")]
        assert len(pids) == 3 and all(_alive(pid) for pid in pids)
    finally:
        lab_down(prefix)
    lab_down(prefix)
    assert lab_namespaces(prefix) == []
    assert not lab.run_dir.exists()
    assert not any(_alive(pid) for pid in pids)
    assert host_view() == host_before
