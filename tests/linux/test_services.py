"""The gateway's services as a subscriber and an operator meet them, under
every source: /metrics (for the admin networks only), the block page over
IPv4 and IPv6, and a clear error when the queue is taken."""

from __future__ import annotations

import subprocess

import pytest

from lablib import TOLLGATE, Gateway, lab_config, netns

UP4, UP6 = "198.18.0.2", "2001:db8:198::2"
SOURCES = {
    "nfqueue": [],
    "nflog": ["--source", "nflog"],
    "conntrack": ["--source", "conntrack"],
    "netflow": ["--source", "netflow", "-o", "listen=127.0.0.1:2055"],
    "spool": ["--source", "spool", "-o", "dir={tmp}/spool"],
}


@pytest.fixture
def clean(lab):
    yield
    netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")


def curl(ns: str, *args: str) -> subprocess.CompletedProcess:
    return netns(ns, "curl", "-s", "-m", "3", "-o", "/dev/stdout", "-w", "\n%{http_code}", *args)


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_metrics_under_every_source_and_only_for_admins(lab, tmp_path, clean, source):
    extra = [a.format(tmp=tmp_path) for a in SOURCES[source]]
    (tmp_path / "spool").mkdir()
    gw = Gateway(lab.gw, tmp_path, lab_config(lab.n), extra).start()
    try:
        out = curl(lab.gw, "http://127.0.0.1:8080/metrics").stdout
        body, code = out.rsplit("\n", 1)
        assert code == "200", body[-500:]
        assert "tollgate_packets_total" in body and "tollgate_queue_stat" in body
        # a subscriber reaches the same port (the portal): it must not read everyone's balances
        out = curl(lab.sub(1), f"http://{lab.gw_addr4(1)}:8080/metrics").stdout
        body, code = out.rsplit("\n", 1)
        assert code == "403" and "tollgate_subscriber_balance" not in body
    finally:
        gw.stop()


def test_block_page_over_ipv4_and_ipv6(lab, tmp_path, clean):
    gw = Gateway(lab.gw, tmp_path, lab_config(lab.n, {2: "-1.00"})).start()  # s2 is blocked from the start
    try:
        for url in (f"http://{UP4}/", f"http://[{UP6}]/"):
            out = curl(lab.sub(2), "-g", url).stdout
            body, code = out.rsplit("\n", 1)
            assert code == "511", (url, out[-300:])
            assert "s2" in body and "-1.00" in body
        out = curl(lab.sub(1), "-g", f"http://[{UP6}]/").stdout  # a subscriber with money gets the upstream
        assert out.rsplit("\n", 1)[1] == "200" and "upstream" in out
    finally:
        gw.stop()


def test_a_queue_bound_elsewhere_is_a_clear_error(lab, tmp_path, clean):
    gw = Gateway(lab.gw, tmp_path, lab_config(lab.n)).start()
    try:
        second = tmp_path / "second"
        second.mkdir()
        (second / "tollgate.toml").write_text(lab_config(lab.n))
        proc = subprocess.run(["ip", "netns", "exec", lab.gw, *TOLLGATE, "run", "-c", str(second / "tollgate.toml"),
                               "--db", str(second / "ledger.db"), "--port", "8081"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "--queues" in proc.stderr and "another" in proc.stderr
    finally:
        gw.stop()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_running_out_mid_download_resets_it_at_once(lab, tmp_path, clean, family):
    """0.02 EUR at 0.01 EUR per MB: the 8 MB download is cut at about 2 MB. The
    client must see its connection reset (curl exit 56), not hang until its own
    timeout (exit 28): it had nothing to send that could meet the block's reject."""
    i = 3 if family == "ipv4" else 4
    url = f"http://{UP4}/big.bin" if family == "ipv4" else f"http://[{UP6}]/big.bin"
    gw = Gateway(lab.gw, tmp_path, lab_config(lab.n, {i: "0.02"}, upload_free=True)).start()
    try:
        proc = netns(lab.sub(i), "curl", "-s", "-g", "-m", "20", "--limit-rate", "4M", "-o", "/dev/null",
                     "-w", "%{size_download}", url, timeout=40)
        assert proc.returncode == 56, (proc.returncode, proc.stdout, proc.stderr)
        assert 1_000_000 < int(proc.stdout) < 2_100_000
        assert 'tollgate_connection_resets_total 1.0' in curl(lab.gw, "http://127.0.0.1:8080/metrics").stdout
    finally:
        gw.stop()
