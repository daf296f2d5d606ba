"""A hotel guest redeems a voucher in headless Chromium (issue 15, phase 2): subscriber 1's namespace is nobody's
in the ledger; the browser asks the upstream for a page and gets the portal's 511 page, follows it to the portal,
types the voucher's code, and the upstream's own page loads within 1 s of the redeem. The voucher's volume
(2 MB) then runs out at the byte: what the kernel counted for the guest's address equals the ledger's bytes and
never passes the volume, and the next page is the block page again.

Chromium over the DevTools pipe as tests/linux/test_portal_browser.py drives it; every process is stopped in a
finally block."""

from __future__ import annotations

import time

from lablib import Gateway, ledger_bytes, netns
from test_portal_browser import Chromium, wait_for
from test_sessions_lab import UP4, cleanup_gateway, live_sessions

VOLUME = 2_000_000  # bytes: "2MB"


def config() -> str:
    return """
[gateway]
currency = "EUR"
local_networks = ["100.64.0.0/10", "2001:db8:100::/48"]
unknown = "drop"

[[tariff]]
name = "guest"
price_unit = "MB"
[tariff.prices]
external = "0"

[sessions]
portal_login = true
voucher_tariff = "guest"
"""


def test_a_guest_redeems_a_voucher_in_chromium_browses_at_once_and_is_blocked_at_its_volume(lab, tmp_path):
    gw = Gateway(lab.gw, tmp_path, config()).start()
    browser = None
    net = f"{lab.sub_addr4(1)}/32"
    try:
        made = gw.tollgate("voucher", "generate", "--count", "1", "--volume", "2MB", "--days", "1", "--devices", "1")
        assert made.returncode == 0, made.stderr
        serial, code = made.stdout.strip().splitlines()[-1].split(",")

        browser = Chromium(lab.sub(1), tmp_path / "profile", tmp_path / "chromium.log")
        doc = browser.goto(f"http://{UP4}/")
        assert doc["status"] == 511 and "not logged in" in browser.text()
        login_url = f"http://{lab.gw_addr4(1)}:8080/portal/login"
        doc = browser.click("#portal-login")
        assert (doc["status"], doc["url"]) == (200, login_url)
        browser.fill("#voucher", code.lower())
        doc = browser.click("#redeem")
        redeemed = time.monotonic()
        assert doc["status"] == 200 and f"Voucher {serial} accepted" in browser.text("#flash"), browser.text()
        guest = f"guest-{serial.lower()}"
        bound = live_sessions(gw.db)  # the /32, and the device's /128 where the gateway has seen its MAC on it
        assert bound[net] == guest and set(bound.values()) == {guest}

        def upstream_reached():
            answer = browser.goto(f"http://{UP4}/")
            return answer["status"] == 200 and browser.text().strip() == "upstream"

        wait_for("the upstream's page", upstream_reached, timeout=3, every=0.05)
        took = time.monotonic() - redeemed
        print(f"\n  the upstream's page {took:.2f} s after the voucher was redeemed")
        assert took < 1.0

        # the volume runs out mid-download: the transfer stops, the guest is blocked
        got = netns(lab.sub(1), "curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{size_download}",
                    f"http://{UP4}/big.bin")
        assert int(got.stdout or 0) < VOLUME, got
        wait_for("the volume block", lambda: netns(lab.sub(1), "curl", "-s", "-m", "2", "-o", "/dev/null", "-w",
                                                   "%{http_code}", f"http://{UP4}/").stdout == "511", timeout=5)
        time.sleep(2.5)  # a flush
        counters = gw.kernel_counters()
        kernel = sum(counters[n]["up_bytes"] + counters[n]["down_bytes"] for n in bound)
        charged = ledger_bytes(gw.db)[guest]
        print(f"  volume {VOLUME} B: kernel {kernel} B, ledger {charged} B, {VOLUME - kernel} B left")
        assert charged == kernel <= VOLUME
        assert VOLUME - kernel < 70_000  # less than one GRO aggregate short of it: the packet that would pass it
        doc = browser.goto(f"http://{UP4}/")
        assert doc["status"] == 511 and "paused" in browser.text()
    finally:
        if browser is not None:
            browser.close()
        gw.stop()
        cleanup_gateway(lab)
