"""Portal logins bind a device, with real packets ([sessions] portal_login; issue 15 phase 2): subscriber 1's
namespace is nobody's in the ledger. Its tcp/80 to the upstream reaches the gateway's block page (the kernel's
``guests_portal`` redirect), anything else it forwards is refused in the kernel (``guests_out``: a TCP reset, no
byte reaches the upstream); a password login over IPv6 binds its IPv6 address and, by its MAC in the gateway's
neighbour table, its IPv4 address; its traffic is then counted for the account to the byte (the kernel's
counters of the session's /32 and /128) in both families; logout gives the device back to the portal.

In the lab's namespaces only; every process started here is stopped in a finally block."""

from __future__ import annotations

import subprocess
import time

from lablib import REPO, TOLLGATE, Gateway, ledger_bytes, netns
from test_sessions_lab import BIG, UP4, cleanup_gateway, live_sessions, wait_for

UP6 = "2001:db8:198::2"
PASSWORD = "carol's portal password"


def config() -> str:
    return """
[gateway]
currency = "EUR"
local_networks = ["100.64.0.0/10", "2001:db8:100::/48"]
unknown = "drop"

[[tariff]]
name = "lab"
price_unit = "MB"
[tariff.prices]
external = { upload = "0.01", download = "0.01" }

[[subscriber]]
name = "carol"
tariff = "lab"
balance = "100.00"
contract = "C-77"

[sessions]
portal_login = true
"""


def http(lab, url: str, *extra: str) -> subprocess.CompletedProcess:
    return netns(lab.sub(1), "curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                 *extra, url)


def test_a_login_from_an_address_of_no_one_binds_the_device_in_both_families(lab, tmp_path):
    gw = Gateway(lab.gw, tmp_path, config()).start()
    v4, v6 = f"{lab.sub_addr4(1)}/32", f"{lab.sub_addr6(1)}/128"
    jar = str(tmp_path / "cookies")
    try:
        done = subprocess.run([*TOLLGATE, "subscriber", "password", "carol", "-c", str(gw.config), "--db",
                               str(gw.db)], input=PASSWORD + "\n", cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        # nobody's: the upstream's page is the portal's, over both families; nothing else gets out
        for url in (f"http://{UP4}/", f"http://[{UP6}]/"):
            page = netns(lab.sub(1), "curl", "-s", "-m", "5", "-w", "\n%{http_code}", url).stdout
            assert page.endswith("511") and "not logged in" in page and "/portal/login" in page, page
        refused = netns(lab.sub(1), "curl", "-s", "-m", "5", "-o", "/dev/null", f"http://{UP4}:5201/")
        assert refused.returncode == 7, refused  # connection refused: the kernel's reset, not a timeout
        assert not gw.kernel_counters()

        # log in over IPv6 (the gateway has seen the device's IPv4 address with its MAC just now)
        login = netns(lab.sub(1), "curl", "-s", "-m", "10", "-c", jar, "-o", "/dev/null", "-w", "%{http_code}",
                      "--data-urlencode", "login=C-77", "--data-urlencode", f"password={PASSWORD}",
                      "http://[2001:db8:100:1::1]:8080/portal/login")
        t_login = time.monotonic()
        assert login.stdout == "303", login
        assert live_sessions(gw.db) == {v4: "carol", v6: "carol"}
        wait_for(lambda: {v4, v6} <= set(gw.kernel_counters()), 3, "the gateway counts the device's addresses")
        print(f"\n  login to counted: {time.monotonic() - t_login:.2f} s")
        assert http(lab, f"http://{UP4}/big.bin").stdout == f"200 {BIG}"
        assert http(lab, f"http://[{UP6}]/big.bin").stdout == f"200 {BIG}"
        time.sleep(2.5)  # a flush
        counters = gw.kernel_counters()
        kernel = {n: counters[n]["up_bytes"] + counters[n]["down_bytes"] for n in (v4, v6)}
        assert ledger_bytes(gw.db)["carol"] == sum(kernel.values()) and min(kernel.values()) > BIG, kernel

        # logout: the device is nobody's again, and the portal's
        page = netns(lab.sub(1), "curl", "-s", "-m", "5", "-b", jar, "http://[2001:db8:100:1::1]:8080/portal").stdout
        csrf = page.split("name=csrf value='", 1)[1].split("'", 1)[0]
        out = netns(lab.sub(1), "curl", "-s", "-m", "5", "-b", jar, "-o", "/dev/null", "-w", "%{http_code}",
                    "--data-urlencode", f"csrf={csrf}", "http://[2001:db8:100:1::1]:8080/portal/logout")
        assert out.stdout == "303"
        assert live_sessions(gw.db) == {}
        wait_for(lambda: not {v4, v6} & set(gw.kernel_counters()), 3, "the device's addresses leave the gateway")
        assert http(lab, f"http://{UP4}/big.bin").stdout.startswith("511 ")
        charged = ledger_bytes(gw.db)["carol"]
        time.sleep(1.5)
        assert ledger_bytes(gw.db)["carol"] == charged
        problems = gw.tollgate("ledger", "check")
        assert problems.returncode == 0, problems.stdout + problems.stderr
    finally:
        gw.stop()
        cleanup_gateway(lab)
