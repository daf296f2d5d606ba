"""The admin API against a running gateway in the lab: a top-up through the
API unblocks a subscriber who ran out, a manual block through the API holds
in the kernel and shows its reason on the block page, and /metrics scraped
after the traffic agrees with the ledger and the kernel's counters."""

from __future__ import annotations

import json
import re
import sqlite3
import time

from lablib import Gateway, kernel_bytes, lab_config, ledger_bytes, netns

UP4 = "198.18.0.2"
API = "http://127.0.0.1:8080/api/v1"


def api(gw, token, method, path, body=None, key=None):
    cmd = ["curl", "-s", "-m", "5", "-X", method, "-H", f"Authorization: Bearer {token}", "-w", "\n%{http_code}"]
    if key:
        cmd += ["-H", f"Idempotency-Key: {key}"]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
    out = netns(gw.ns, *cmd, API + path).stdout
    text, _, code = out.rpartition("\n")
    return int(code), json.loads(text) if text else None


def page_status(lab, i: int) -> str:
    return netns(lab.sub(i), "curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                 f"http://{UP4}/index.html").stdout


def wait_for(check, seconds: float = 5.0) -> float:
    """Seconds until ``check()`` is true (polled every 20 ms), or fail."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, "not within the bound"
        time.sleep(0.02)
    return time.monotonic() - start


def test_api_changes_reach_the_running_gateway_and_metrics_agree(lab, tmp_path):
    gw = Gateway(lab.gw, tmp_path, lab_config(2, {1: "0.02"})).start()
    try:
        token = gw.tollgate("token", "create", "lab-admin", "--role", "admin").stdout.strip()
        assert token.startswith("tg_")

        # s1 runs out; a top-up through the API brings it back
        netns(lab.sub(1), "curl", "-s", "-m", "5", "-o", "/dev/null", f"http://{UP4}/big.bin")
        wait_for(lambda: page_status(lab, 1) == "511")
        code, paid = api(gw, token, "POST", "/subscribers/1/payments", {"amount": "5.00"}, key="lab-topup-1")
        assert code == 201, paid
        took = wait_for(lambda: page_status(lab, 1) == "200")
        print(f"\n  top-up through the API to traffic flowing again: {took:.2f} s")

        # a manual block through the API: the kernel holds s2 and the page says why
        code, sub = api(gw, token, "POST", "/subscribers/2/block", {"reason": "abuse report 77"})
        assert code == 200 and sub["manually_blocked"]
        took = wait_for(lambda: page_status(lab, 2) == "511")
        print(f"  manual block through the API to the kernel holding s2: {took:.2f} s")
        page = netns(lab.sub(2), "curl", "-s", "-m", "2", f"http://{UP4}/").stdout
        assert "paused by the operator" in page
        code, _ = api(gw, token, "POST", "/subscribers/2/unblock", {"reason": "cleared"})
        assert code == 200
        wait_for(lambda: page_status(lab, 2) == "200")

        # traffic, a flush, then the three views of it side by side
        netns(lab.sub(2), "ping", "-c", "10", "-i", "0.05", "-s", "1000", UP4)
        time.sleep(2.5)
        metrics = gw.metrics()
    finally:
        gw.stop()
    counters = gw.kernel_counters()
    netns(lab.gw, "sh", "-c", "nft delete table inet tollgate")
    ledger = ledger_bytes(gw.db)
    con = sqlite3.connect(gw.db)
    balances = dict(con.execute("SELECT name, balance FROM subscribers"))
    con.close()
    scraped = {m[0]: int(float(m[1])) for m in re.findall(r'tollgate_subscriber_bytes_total\{subscriber="(\w+)"\} (\S+)',
                                                          metrics)}
    scraped_balance = {m[0]: int(float(m[1])) for m in
                       re.findall(r'tollgate_subscriber_balance\{subscriber="(\w+)"\} (\S+)', metrics)}
    for i in (1, 2):
        name = f"s{i}"
        kernel = kernel_bytes(counters, lab, i)
        print(f"  {name}: /metrics {scraped.get(name, 0):>10,} B, ledger {ledger[name]:>10,} B, kernel {kernel:>10,} B;"
              f" balance /metrics {scraped_balance.get(name)} ledger {balances[name]}")
        assert scraped[name] == ledger[name] == kernel
        assert scraped_balance[name] == balances[name]
