"""The live gateway in the lab: real packets through nfqueue, real nftables.

Every byte figure is checked against the kernel: the per-subscriber counters
of our table (counted after the queue, so exactly what went through) or the
bytes the far end received. The gateway runs as ``tollgate run`` in the lab's
gateway namespace, a separate process, as an operator would run it.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import struct
import sys
import time

import pytest

from lablib import Gateway, lab_config, netns

UP4, UP6 = "198.18.0.2", "2001:db8:198::2"
BIG = 8 * 1024 * 1024


SCAPY_SEND = f"""
from scapy.all import IP, IPv6, UDP, Raw, send, conf
from scapy.layers.inet import IPOption_NOP
from scapy.layers.inet6 import IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt
conf.verb = 0
src6 = "2001:db8:100:2::2"
send(IPv6(src=src6, dst="{UP6}") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / UDP(dport=9) / Raw(bytes(300)), count=10)
send(IP(src="100.64.2.2", dst="{UP4}", options=[IPOption_NOP()] * 4) / UDP(dport=9) / Raw(bytes(200)), count=10)
send(IP(src="100.64.2.2", dst="{UP4}", proto=253) / Raw(bytes(100)), count=10)
"""


def ledger_bytes(db) -> dict[str, int]:
    con = sqlite3.connect(db)
    rows = con.execute("SELECT s.name, coalesce(sum(u.bytes), 0) FROM subscribers s "
                       "LEFT JOIN usage u ON u.subscriber_id = s.id GROUP BY s.id").fetchall()
    con.close()
    return dict(rows)


def kernel_bytes(gw: Gateway, i: int) -> int:
    c = gw.kernel_counters()
    return sum(c[n]["up_bytes"] + c[n]["down_bytes"] for n in (f"100.64.{i}.2/32", f"2001:db8:100:{i:x}::/64"))


def health(gw: Gateway) -> dict:
    return json.loads(netns(gw.ns, "curl", "-s", "-m", "2", "http://127.0.0.1:8080/healthz").stdout)


def wait_flushed(gw: Gateway) -> None:
    time.sleep(2.5)  # the flusher writes at least every second


@pytest.fixture
def gateway(lab, tmp_path):
    gws = []

    def start(balances=None, extra=(), **kw) -> Gateway:
        gw = Gateway(lab.gw, tmp_path, lab_config(lab.n, balances or {}, **kw), extra).start()
        gws.append(gw)
        return gw

    yield start
    for gw in gws:
        gw.stop()
    netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")


def test_bytes_per_subscriber_equal_the_kernel_counters(lab, gateway):
    gw = gateway()
    s = lab.sub
    procs = [
        netns(s(1), "curl", "-s", "-o", "/dev/null", f"http://{UP4}/big.bin"),
        netns(s(1), "ping", "-6", "-c", "5", "-i", "0.05", "-s", "700", UP6),
        netns(s(2), "iperf3", "-c", UP4, "-u", "-b", "20M", "-t", "1", "-l", "500"),
        netns(s(2), "curl", "-s", "-o", "/dev/null", f"http://[{UP6}]/index.html"),
        netns(s(3), "ping", "-c", "5", "-i", "0.05", lab.sub_addr4(4)),  # internal: s3 -> s4 through the gateway
        netns(s(3), "curl", "-s", "-o", "/dev/null", f"http://[{UP6}]/big.bin"),
        netns(s(4), "iperf3", "-c", UP6, "-t", "1", "-R"),
        netns(s(4), "ping", "-c", "3", "-i", "0.05", "-s", "1400", UP4),
        netns(s(4), "ping", "-c", "3", "-i", "0.05", "-s", "3000", UP4),  # fragments
        netns(s(1), "ping", "-6", "-c", "3", "-i", "0.05", "-s", "3000", UP6),
        # scapy: IPv6 with extension headers, IPv4 with options, an unknown protocol
        netns(s(2), sys.executable, "-c", SCAPY_SEND),
    ]
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs if p.returncode]
    wait_flushed(gw)
    counted = ledger_bytes(gw.db)
    for i in range(1, 5):
        kernel = kernel_bytes(gw, i)
        assert kernel > 10_000, i
        assert counted[f"s{i}"] == kernel, f"s{i}: engine {counted[f's{i}']} != kernel {kernel}"
    q = health(gw)["queue"]["0"]
    assert q["enobufs"] == 0 and q["recv_errors"] == 0
    # what Prometheus scrapes agrees with the kernel too
    metrics = gw.metrics()
    for i in range(1, 5):
        line = next(m for m in metrics.splitlines() if m.startswith(f'tollgate_subscriber_bytes_total{{subscriber="s{i}"}}'))
        assert float(line.split()[-1]) == kernel_bytes(gw, i)


def dns_answers(lab, i: int) -> bool:
    query = struct.pack("!HHHHHH", 7, 0x100, 1, 0, 0, 0) + b"\x07example\x03org\x00" + struct.pack("!HH", 1, 1)
    code = ("import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(2); "
            f"s.sendto({query!r},('{lab.gw_addr4(i)}',53)); print(len(s.recv(512)))")
    return netns(lab.sub(i), "python3", "-c", code).returncode == 0


def test_no_overspending_block_page_and_top_up(lab, gateway):
    # s1: 0.02 EUR at 0.01 EUR/MB downloaded = 2,000,000 bytes; uploads free
    limit = 2_000_000
    gw = gateway({1: "0.02"}, upload_free=True)
    got = netns(lab.sub(1), "curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{size_download}",
                f"http://{UP4}/big.bin")
    delivered = int(got.stdout or 0)
    assert 0 < delivered <= limit
    time.sleep(0.5)
    c = gw.kernel_counters()
    assert c["100.64.1.2/32"]["down_bytes"] <= limit  # IP bytes that left the gateway towards s1
    h = health(gw)
    assert h["block_latency_ms"]["n"] == 1

    # blocked: HTTP lands on the block page, other traffic fails fast, DNS still answers
    page = netns(lab.sub(1), "curl", "-s", "-m", "3", f"http://{UP4}/anything")
    assert "Internet access paused" in page.stdout and "balance has run out" in page.stdout
    other = netns(lab.sub(1), "curl", "-s", "-m", "3", "-o", "/dev/null", "-w", "%{time_total}",
                  f"http://{UP4}:5201/")
    assert other.returncode != 0 and float(other.stdout) < 1.0
    assert netns(lab.sub(1), "ping", "-c", "1", "-W", "1", UP4).returncode != 0
    assert dns_answers(lab, 1)
    assert netns(lab.sub(2), "curl", "-s", "-m", "3", "-o", "/dev/null", f"http://{UP4}/").returncode == 0

    # a top-up from the CLI: traffic flows again within a second
    assert gw.tollgate("topup", "s1", "1.00").returncode == 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3:
        if netns(lab.sub(1), "curl", "-s", "-m", "1", "-o", "/dev/null", "-w", "%{http_code}",
                 f"http://{UP4}/index.html").stdout == "200":
            break
        time.sleep(0.05)
    waited = time.monotonic() - t0
    assert waited < 1.0, f"unblocked only after {waited:.2f} s"

    wait_flushed(gw)
    con = sqlite3.connect(gw.db)
    (balance,) = con.execute("SELECT balance FROM subscribers WHERE name='s1'").fetchone()
    assert balance >= 0  # never below zero: no overspending
    con.close()


def test_sigkill_keeps_blocks_and_restart_restores_without_duplicates(lab, gateway, tmp_path):
    gw = gateway({2: "0"})  # s2 has nothing: blocked from the start
    assert netns(lab.sub(1), "curl", "-s", "-o", "/dev/null", f"http://{UP4}/big.bin").returncode == 0
    assert netns(lab.sub(2), "curl", "-s", "-m", "2", "-o", "/dev/null", f"http://{UP4}:5201/").returncode != 0
    wait_flushed(gw)
    before_rules = netns(lab.gw, "nft", "list", "table", "inet", "tollgate").stdout
    gw.stop(signal.SIGKILL)

    # dead daemon: the block holds; other subscribers' traffic flows (fail-open bypass)
    assert netns(lab.sub(2), "curl", "-s", "-m", "2", "-o", "/dev/null", f"http://{UP4}:5201/").returncode != 0
    ok = netns(lab.sub(3), "curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{size_download}", f"http://{UP4}/big.bin")
    assert ok.stdout == str(BIG)

    con = sqlite3.connect(gw.db)
    charged_before = con.execute("SELECT coalesce(sum(amount), 0) FROM charges").fetchone()[0]
    flushes_before = con.execute("SELECT count(*) FROM flushes").fetchone()[0]
    con.close()
    assert charged_before > 0

    gw.start()  # restart: same table, no duplicate rules or elements
    after_rules = netns(lab.gw, "nft", "list", "table", "inet", "tollgate").stdout
    strip = lambda text: [line for line in text.splitlines() if "counter packets" not in line]  # noqa: E731
    assert strip(after_rules) == strip(before_rules)
    fwd = netns(lab.gw, "iptables-nft", "-S", "FORWARD").stdout
    assert fwd.count("NFQUEUE") == 2
    assert netns(lab.sub(2), "curl", "-s", "-m", "2", "-o", "/dev/null", f"http://{UP4}:5201/").returncode != 0
    wait_flushed(gw)
    gw.stop()
    con = sqlite3.connect(gw.db)
    # what was flushed before the kill is still there, once
    assert con.execute("SELECT coalesce(sum(amount), 0) FROM charges").fetchone()[0] >= charged_before
    assert con.execute("SELECT count(*) FROM flushes").fetchone()[0] >= flushes_before
    con.close()
    from accounting.ledger import Ledger

    with Ledger.open(gw.db) as led:
        assert led.check_invariants() == []


def test_fail_closed_stops_subscriber_traffic_while_the_daemon_is_down(lab, gateway):
    gw = gateway(extra=["--fail-closed"])
    assert netns(lab.sub(1), "curl", "-s", "-m", "3", "-o", "/dev/null", f"http://{UP4}/").returncode == 0
    gw.stop(signal.SIGKILL)
    # no reader bound and no bypass: the kernel drops queued traffic
    assert netns(lab.sub(1), "curl", "-s", "-m", "2", "-o", "/dev/null", f"http://{UP4}/").returncode != 0
    gw.start()
    assert netns(lab.sub(1), "curl", "-s", "-m", "3", "-o", "/dev/null", f"http://{UP4}/").returncode == 0


def test_traffic_that_bypasses_the_engine_is_charged(lab, gateway):
    """The kernel counts what an operator's rule lets skip the queue; the
    gateway finds it at the next drift check (kernel count beyond what the
    ledger holds) and charges it, to the byte of our table's counters."""
    gw = gateway(extra=["--drift-interval", "1"])
    assert netns(lab.sub(2), "curl", "-s", "-o", "/dev/null", f"http://{UP4}/big.bin").returncode == 0
    time.sleep(2.5)
    assert health(gw)["drift_bytes"] == {}  # everything the kernel counted, the engine rated
    assert "tollgate_unrated_bytes_total 0.0" in gw.metrics()
    # an operator's rule lets s2 skip the queue: the kernel still counts it, the engine never sees it
    for flag in ("-s", "-d"):
        netns(lab.gw, "iptables-nft", "-I", "FORWARD", "1", flag, lab.sub_addr4(2), "-j", "ACCEPT", check=True)
    try:
        assert netns(lab.sub(2), "curl", "-s", "-o", "/dev/null", f"http://{UP4}/big.bin").returncode == 0
        # the engine never saw s2 now: a drift check reaches it in its turn among the idle (one of the lab's
        # four a second here), then the flush writes the charge
        wait_for(lambda: ledger_bytes(gw.db)["s2"] == kernel_bytes(gw, 2), timeout=20)
        unrated = float(re.search(r"^tollgate_unrated_bytes_total (\S+)$", gw.metrics(), re.M).group(1))
        assert unrated > BIG
        assert health(gw)["drift_bytes"] == {}  # charged, not an alarm: the kernel is not behind the engine
    finally:
        for flag in ("-s", "-d"):
            netns(lab.gw, "iptables-nft", "-D", "FORWARD", flag, lab.sub_addr4(2), "-j", "ACCEPT")


def wait_for(check, timeout: float = 5.0) -> float:
    """Seconds until ``check()`` held; fails after ``timeout``."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s: {check.__doc__ or check}"
        time.sleep(0.1)
    return time.monotonic() - t0


def reaches_upstream(lab, i: int) -> bool:
    """An HTTP request gets the upstream's page (a blocked one gets the block page, 511)."""
    return netns(lab.sub(i), "curl", "-s", "-m", "1", "-o", "/dev/null", "-w", "%{http_code}",
                 f"http://{UP4}/index.html").stdout == "200"


def test_ledger_changes_reach_the_running_gateway(lab, tmp_path):
    """Another process (the CLI, an admin tool) changes the ledger: a new
    subscriber is counted, an adjustment blocks, a deactivated one stops being
    counted; a manual block outlives a restart."""
    from accounting.ledger import Ledger

    gw = Gateway(lab.gw, tmp_path, lab_config(3)).start()  # s4 is not in the config
    try:
        assert "100.64.4.2/32" not in gw.kernel_counters()
        ledger = Ledger.open(gw.db)
        s4 = ledger.add_subscriber("s4", "lab", "EUR", opening_balance=10 ** 9,
                                   addresses=[f"{lab.sub_addr4(4)}/32", "2001:db8:100:4::/64"])
        wait_for(lambda: "100.64.4.2/32" in gw.kernel_counters())
        assert netns(lab.sub(4), "curl", "-s", "-o", "/dev/null", f"http://{UP4}/big.bin").returncode == 0
        wait_flushed(gw)
        assert ledger_bytes(gw.db)["s4"] == kernel_bytes(gw, 4) > BIG

        # an adjustment that takes the balance below zero blocks at once; one that restores it unblocks
        ledger.add_adjustment(s4, -2 * 10 ** 9, "test: chargeback", "tests")
        wait_for(lambda: not reaches_upstream(lab, 4))
        ledger.add_adjustment(s4, 5 * 10 ** 9, "test: goodwill", "tests")
        wait_for(lambda: reaches_upstream(lab, 4))

        # deactivated: out of the kernel's sets and the engine, its last counters flushed
        ledger.set_active("s2", False)
        wait_for(lambda: "100.64.2.2/32" not in gw.kernel_counters())
        assert reaches_upstream(lab, 2)  # unknown traffic passes (unknown_verdict accept), uncounted

        # a manual block recorded in the ledger holds after a restart
        ledger.record_block("s3", "block", "manual: tests")
        ledger.close()
        gw.stop()
        gw.start()
        assert not reaches_upstream(lab, 3)
        assert reaches_upstream(lab, 1)
    finally:
        gw.stop()
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")


@pytest.mark.parametrize("broken,problem", [
    ('external = { upload = "-0.01", download = "0.01" }', "must not be negative"),
    ('mars = "0.01"', "unknown zone"),
])
def test_an_inconsistent_tariff_is_refused_and_the_previous_stays_in_force(lab, tmp_path, broken, problem):
    """SIGHUP with a broken tariff: refused with the field named, and traffic
    is still charged at the tariff in force (0.01 EUR per MB downloaded)."""
    gw = Gateway(lab.gw, tmp_path, lab_config(lab.n)).start()
    try:
        good = lab_config(lab.n)
        gw.config.write_text(good.replace('external = { upload = "0.01", download = "0.01" }', broken))
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in (tmp_path / "gateway.log").read_text())
        log = (tmp_path / "gateway.log").read_text()
        assert "tariff[0].prices" in log and problem in log
        assert netns(lab.sub(1), "curl", "-s", "-o", "/dev/null", f"http://{UP4}/big.bin").returncode == 0
        wait_flushed(gw)
        con = sqlite3.connect(gw.db)
        (charged,) = con.execute("SELECT sum(u.amount) FROM usage u JOIN subscribers s ON s.id = u.subscriber_id "
                                 "WHERE s.name = 's1' AND u.direction = 1").fetchone()
        (down,) = con.execute("SELECT sum(u.bytes) FROM usage u JOIN subscribers s ON s.id = u.subscriber_id "
                              "WHERE s.name = 's1' AND u.direction = 1").fetchone()
        con.close()
        assert down > BIG and charged == down * 10 ** 7 // 10 ** 6  # 0.01 EUR = 10**7 nano-EUR per 10**6 bytes
    finally:
        gw.stop()
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")


WEBHOOK = """
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with open(sys.argv[1], "a") as f:
            f.write(json.dumps({"key": self.headers["Idempotency-Key"], "body": json.loads(body)}) + "\\n")
        self.send_response(200)
        self.end_headers()
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", 8099), H).serve_forever()
"""


def test_warning_and_block_reach_the_webhook(lab, tmp_path):
    """s1 has 0.02 EUR, a warning level at 0.01: its download crosses the
    level, then runs out; the operator's webhook hears of both, once each."""
    import subprocess

    got = tmp_path / "webhook.jsonl"
    hook = subprocess.Popen(["ip", "netns", "exec", lab.gw, sys.executable, "-c", WEBHOOK, str(got)])
    gw = Gateway(lab.gw, tmp_path, lab_config(lab.n, {1: "0.02"}, upload_free=True, warn="0.01")
                 + '\n[notify]\nwebhook = "http://127.0.0.1:8099/tollgate"\n').start()
    try:
        netns(lab.sub(1), "curl", "-s", "-m", "5", "-o", "/dev/null", f"http://{UP4}/big.bin")

        def delivered():
            lines = got.read_text().splitlines() if got.exists() else []
            return {json.loads(line)["body"]["event"] for line in lines} >= {"warn", "block"}
        wait_for(delivered, timeout=10)
        events = [json.loads(line) for line in got.read_text().splitlines()]
        assert len({e["key"] for e in events}) == len(events)  # no duplicates
        block = next(e["body"] for e in events if e["body"]["event"] == "block")
        assert block["subscriber"] == "s1" and block["reason"] == "limit"
        warn = next(e["body"] for e in events if e["body"]["event"] == "warn")
        assert warn["level"] == 1 and warn["subscriber"] == "s1"
    finally:
        gw.stop()
        hook.kill()
        hook.wait()
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")


def test_a_scheduled_tariff_change_applies_when_due(lab, tmp_path):
    """A change to a flat tariff, scheduled two seconds ahead: from then on
    s1 pays the flat fee (prorated by days) and no more traffic charges."""
    from accounting.ledger import Ledger

    flat = '\n[[tariff]]\nname = "flat"\nfee = "3.00"\n[tariff.prices]\nexternal = "0"\n'
    gw = Gateway(lab.gw, tmp_path, lab_config(1) + flat).start()
    try:
        with Ledger.open(gw.db) as ledger:
            ledger.schedule_tariff("s1", "flat", time.time_ns() + 2 * 10 ** 9)

            def switched():
                return ledger.get_subscriber("s1")["tariff"] == "flat"
            wait_for(switched, timeout=6)
            wait_for(lambda: ledger.postings("s1"), timeout=3)
            (fee,) = ledger.postings("s1")
            assert fee["kind"] == "fee" and 0 < fee["amount"] <= 3 * 10 ** 9
            before = ledger.balance("s1")
            assert netns(lab.sub(1), "curl", "-s", "-o", "/dev/null", f"http://{UP4}/big.bin").returncode == 0
            wait_flushed(gw)
            assert ledger.balance("s1") == before  # flat: the download is free
            assert ledger_bytes(gw.db)["s1"] > BIG
        assert "tariff flat from" in (tmp_path / "gateway.log").read_text()
    finally:
        gw.stop()
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")


def _offset_to(local_hms: str) -> float:
    """Seconds to add to now for the gateway's calendar to read ``local_hms`` today (the lab's zone is UTC)."""
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    h, m, s = map(int, local_hms.split(":"))
    return (now.replace(hour=h, minute=m, second=s, microsecond=0) - now).total_seconds()


@pytest.mark.parametrize("start,opens", [("07:59:50", True), ("08:00:50", False)])
def test_access_hours_follow_the_clock(lab, tmp_path, start, opens):
    """Access 08:00-08:01 every day, the gateway's calendar clock set to 07:59:50
    (closed, then open at 08:00) or to 08:00:50 (open, then closed at 08:01)."""
    access = '\naccess = "08:00-08:01"\n'
    config = lab_config(1).replace('price_unit = "MB"\n', 'price_unit = "MB"' + access, 1)
    assert access in config
    gw = Gateway(lab.gw, tmp_path, config, ["--clock-offset", str(_offset_to(start))]).start()
    try:
        assert reaches_upstream(lab, 1) is not opens  # before the edge
        waited = wait_for(lambda: reaches_upstream(lab, 1) is opens, timeout=20)
        assert waited > 2  # it changed at the edge, not at once
        log = (tmp_path / "gateway.log").read_text()
        assert ("unblocked subscriber 1 (schedule)" if opens else "blocked subscriber 1 (schedule)") in log
    finally:
        gw.stop()
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")


def test_a_prepaid_card_unblocks_within_a_second(lab, tmp_path):
    gw = Gateway(lab.gw, tmp_path, lab_config(1, {1: "0"})).start()  # s1 has nothing: blocked
    try:
        assert not reaches_upstream(lab, 1)
        made = gw.tollgate("cards", "generate", "--count", "2", "--value", "1.00", "--expires", "2099-01-01")
        assert made.returncode == 0, made.stderr
        codes = [line.split(",")[1] for line in made.stdout.splitlines() if re.match(r"\d{8},", line)]
        assert gw.tollgate("cards", "activate", "s1", "WRONG-CODE").returncode == 1
        assert gw.tollgate("cards", "activate", "s1", codes[0]).returncode == 0
        waited = wait_for(lambda: reaches_upstream(lab, 1), timeout=3)
        assert waited < 1.0, f"unblocked only after {waited:.2f} s"
        again = gw.tollgate("cards", "activate", "s1", codes[0])
        assert again.returncode == 1 and "has been used" in again.stderr
    finally:
        gw.stop()
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")
