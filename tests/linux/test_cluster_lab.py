"""The cluster lab (gateway.lab.cluster_up, issue 13): three NAT gateways on one upstream, two
subscribers behind each, and the shared subscriber x whose addresses are routed by source through g1
and g2 at the same time.

First without Tollgate: plain forwarding, each download through the gateway it should cross, as
nft counters of our own in every gateway (forward hook, per subscriber network) and on the upstream
(per uplink) show. Then Tollgate on every gateway with one PostgreSQL ledger: per subscriber, the
bytes charged == the sum over the gateways of that subscriber's kernel counters, the shared one
across two gateways included. Every transfer has a timeout."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

from gateway.lab import BIG_FILE, UPSTREAM4, UPSTREAM6
from lablib import Gateway, charged_bytes_of, cluster_kernel_bytes, netns

EUR = 10 ** 9
URL4, URL6 = f"http://{UPSTREAM4}/big.bin", f"http://[{UPSTREAM6}]/big.bin"
HEADROOM = 1.10  # IP and TCP headers on top of the payload, well below 10%


# ---- traffic ---------------------------------------------------------------------------------------

def downloads(cluster) -> list[tuple[str, int, str, str]]:
    """``(subscriber, gateway, source address, url)`` of one round: every subscriber of its own gateway
    once (s1 over IPv4, s2 over IPv6), the shared one four times at once: IPv4 and IPv6 through g1 and
    through g2, each from the source address routed through that gateway."""
    out = []
    for sub in cluster.subscribers:
        for link in sub.links:
            if sub.name == cluster.shared.name:
                out += [(sub.name, link.gateway, link.addr4, URL4), (sub.name, link.gateway, link.addr6, URL6)]
            else:
                v6 = sub.name.endswith("2")
                out.append((sub.name, link.gateway, link.addr6 if v6 else link.addr4, URL6 if v6 else URL4))
    return out


def run_downloads(cluster, jobs, timeout: float = 30) -> None:
    """All ``jobs`` at once, each bounded by curl's -m and a wait; every one must get the whole file."""
    procs = [(job, subprocess.Popen(
        ["ip", "netns", "exec", cluster.subscriber(job[0]).ns, "curl", "-s", "-m", str(timeout), "--interface",
         job[2], "-o", "/dev/null", "-w", "%{http_code} %{size_download}", job[3]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for job in jobs]
    results = []
    for job, proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results.append((job, proc.returncode, out, err))
    bad = [r for r in results if r[1] != 0 or r[2] != f"200 {BIG_FILE}"]
    assert not bad, bad


# ---- our own counters, without Tollgate --------------------------------------------------------------

def _match(net: str, side: str) -> str:
    fam = "ip6" if ":" in net else "ip"
    return f"{fam} {side} {net}"


def install_counters(cluster) -> None:
    """A table ``inet labcount`` in every gateway (forward hook: per subscriber network, up = from it,
    down = to it) and on the upstream (per uplink, in and out), made anew so counts start at zero."""
    for g in cluster.gateways:
        rules = "".join(f'    {_match(n, side)} counter comment "{n} {way}"\n'
                        for s in cluster.subscribers for n in s.networks
                        for side, way in (("saddr", "up"), ("daddr", "down")))
        netns(g.ns, "nft", "delete", "table", "inet", "labcount")
        proc = subprocess.run(["ip", "netns", "exec", g.ns, "nft", "-f", "-"], capture_output=True, text=True,
                              input="table inet labcount {\n  chain forward { type filter hook forward priority -10;"
                                    " policy accept;\n" + rules + "  }\n}\n")
        assert proc.returncode == 0, proc.stderr
    links = "".join(f'    {hook[0]}ifname "g{g.k}" counter comment "g{g.k} {hook[1]}"\n'
                    for g in cluster.gateways for hook in (("i", "in"), ("o", "out")))
    netns(cluster.up, "nft", "delete", "table", "inet", "labcount")
    body = ("table inet labcount {\n  chain input { type filter hook input priority -10; policy accept;\n"
            + "".join(line for line in links.splitlines(True) if " in\"" in line)
            + "  }\n  chain output { type filter hook output priority -10; policy accept;\n"
            + "".join(line for line in links.splitlines(True) if " out\"" in line) + "  }\n}\n")
    proc = subprocess.run(["ip", "netns", "exec", cluster.up, "nft", "-f", "-"], capture_output=True, text=True,
                          input=body)
    assert proc.returncode == 0, proc.stderr


def read_counters(ns: str) -> dict[str, int]:
    """``{comment: bytes}`` of the counters in ``inet labcount`` of ``ns``."""
    out = json.loads(netns(ns, "nft", "-j", "list", "table", "inet", "labcount", check=True).stdout)
    counts = {}
    for item in out["nftables"]:
        rule = item.get("rule")
        if rule and "comment" in rule:
            counts[rule["comment"]] = sum(e["counter"]["bytes"] for e in rule["expr"] if "counter" in e)
    return counts


def remove_counters(cluster) -> None:
    for ns in [cluster.up] + [g.ns for g in cluster.gateways]:
        netns(ns, "nft", "delete", "table", "inet", "labcount")


def test_plain_forwarding_crosses_the_intended_gateways(cluster):
    install_counters(cluster)
    try:
        jobs = downloads(cluster)
        run_downloads(cluster, jobs)
        counts = {g.k: read_counters(g.ns) for g in cluster.gateways}
        upstream = read_counters(cluster.up)
    finally:
        remove_counters(cluster)
    # every network's download counted by exactly the gateway that should carry it, by no other
    expected = {}  # (gateway, network) -> downloads
    for name, k, src, _url in jobs:
        link = cluster.subscriber(name).via(k)
        net = link.networks[0] if src == link.addr4 else link.networks[1]
        expected[(k, net)] = expected.get((k, net), 0) + 1
    for sub in cluster.subscribers:
        for net in sub.networks:
            for k, c in counts.items():
                n, got = expected.get((k, net), 0), c[f"{net} down"]
                if n:
                    assert n * BIG_FILE <= got <= n * BIG_FILE * HEADROOM, (sub.name, net, k, got)
                    assert c[f"{net} up"] > 0, (sub.name, net, k)
                else:
                    assert got == 0 and c[f"{net} up"] == 0, (sub.name, net, k, got)
    # the shared subscriber: its two addresses of each family, through two gateways at once
    x = cluster.shared
    for link in x.links:
        for net in link.networks:
            assert counts[link.gateway][f"{net} down"] >= BIG_FILE, (net, link.gateway)
    assert {k for k, c in counts.items() if any(c[f"{n} down"] for n in x.networks)} == {1, 2}
    # the far end: what left the upstream on each uplink is what that gateway forwarded down, and what
    # came in on it what the gateway forwarded up (NAT changes no length)
    for g in cluster.gateways:
        forwarded = sum(counts[g.k][f"{n} down"] for s in cluster.subscribers for n in s.networks)
        n = sum(1 for _name, k, _src, _url in jobs if k == g.k)
        assert n * BIG_FILE <= forwarded, (g.k, forwarded)
        assert forwarded <= upstream[f"g{g.k} out"] <= forwarded + 64 * 1024, (g.k, forwarded, upstream)
        sent = sum(counts[g.k][f"{n} up"] for s in cluster.subscribers for n in s.networks)
        assert sent <= upstream[f"g{g.k} in"] <= sent + 64 * 1024, (g.k, sent, upstream)  # + neighbour discovery


# ---- Tollgate on every gateway, one PostgreSQL ledger ---------------------------------------------------

def kernel_figures(cluster, gws) -> dict[str, dict[int, int]]:
    """``{subscriber: {gateway: bytes its kernel counters hold}}``."""
    counters = {k: gw.kernel_counters() for k, gw in enumerate(gws, 1)}
    return {s.name: {k: cluster_kernel_bytes(c, s) for k, c in counters.items()} for s in cluster.subscribers}


def settle(cluster, gws, timeout: float = 10.0) -> tuple[dict, dict]:
    """Wait (bounded) until the ledger holds every subscriber's kernel bytes summed over the gateways,
    or the time is up; returns ``(charged, kernel figures)`` as last read."""
    deadline = time.monotonic() + timeout
    while True:
        kernel = kernel_figures(cluster, gws)
        charged = charged_bytes_of(gws[0].db)
        if all(charged.get(name, 0) == sum(per.values()) for name, per in kernel.items()) \
                or time.monotonic() > deadline:
            return charged, kernel
        time.sleep(0.5)


def mismatches(charged: dict, kernel: dict) -> dict:
    return {name: {"charged": charged.get(name, 0), "kernel": per, "kernel total": sum(per.values())}
            for name, per in kernel.items() if charged.get(name, 0) != sum(per.values())}


def log_lines(gws, pattern=r"WARNING|ERROR|kernel counters below|never rated|drift") -> str:
    out = []
    for k, gw in enumerate(gws, 1):
        text = (gw.dir / "gateway.log").read_text(errors="replace")
        out += [f"g{k}: {line}" for line in text.splitlines() if re.search(pattern, line)]
    return "\n".join(out[-40:])


def check_ledger(cluster, db, gws) -> None:
    from accounting.ledger import Ledger

    with Ledger.open(db) as led:
        assert led.check_invariants() == []
        for s in cluster.subscribers:  # plenty of money: nobody blocked, the balance is what was charged
            assert led.balance(s.name) == 100 * EUR - sum(c["amount"] for c in led.charges(s.name)), s.name
            assert led.balance(s.name) > 90 * EUR, s.name


def test_bytes_charged_are_the_sum_over_gateways_of_the_kernel_counters(cluster, pg_gateways):
    gws = pg_gateways()
    run_downloads(cluster, downloads(cluster))
    charged, kernel = settle(cluster, gws)
    assert not mismatches(charged, kernel), (mismatches(charged, kernel), log_lines(gws))
    for sub in cluster.subscribers:
        per = kernel[sub.name]
        assert {k for k, b in per.items() if b} == set(sub.gateways), (sub.name, per)  # where it was served
        for k in sub.gateways:
            assert per[k] >= (2 if sub.name == cluster.shared.name else 1) * BIG_FILE, (sub.name, per)
    assert charged[cluster.shared.name] == kernel[cluster.shared.name][1] + kernel[cluster.shared.name][2]
    for gw in gws:
        gw.stop()
    check_ledger(cluster, gws[0].db, gws)


def test_bytes_charged_after_a_rolling_restart_of_two_gateways(cluster, pg_gateways):
    """As above, then g1 and then g2 restarted one after the other (SIGTERM, start: what an upgrade
    does), another round of traffic: still charged == the sum of the kernel counters."""
    gws = pg_gateways()
    run_downloads(cluster, downloads(cluster))
    charged, kernel = settle(cluster, gws)
    assert not mismatches(charged, kernel), ("before the restarts", mismatches(charged, kernel), log_lines(gws))
    for k in (1, 2):
        gws[k - 1].stop(signal.SIGTERM)
        gws[k - 1].start()
    run_downloads(cluster, downloads(cluster))
    charged, kernel = settle(cluster, gws)
    # each gateway's kernel marks are its own (schema 22): a restarted one compares its counters with
    # its own marks, not with the sum of everyone's (which charged g2's earlier traffic twice)
    wrong = mismatches(charged, kernel)
    assert not wrong, ("after restarting g1 and g2", wrong, log_lines(gws))


# ---- credit grants: one balance, several gateways --------------------------------------------------

def fetch(cluster, sub: str, source: str, url: str, timeout: float = 3) -> tuple[int, str]:
    """One bounded download from ``source``: ``(bytes received, http code)``."""
    proc = netns(cluster.subscriber(sub).ns, "curl", "-s", "-m", str(timeout), "--interface", source, "-o",
                 "/dev/null", "-w", "%{size_download} %{http_code}", url, timeout=timeout + 10)
    size, _, code = (proc.stdout or "0 000").partition(" ")
    return int(size or 0), code


class GrantSampler:
    """Every 100 ms, from the ledger: a subscriber's balance, credit limit, reserved and its grants on
    every gateway; ``problems`` lists each sample where the grants outstanding were more than the
    balance and credit could pay, or did not add up to ``reserved``."""

    def __init__(self, conninfo: str, name: str) -> None:
        import threading

        self.conninfo, self.name = conninfo, name
        self.samples: list[tuple] = []
        self.problems: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        import psycopg

        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            while not self.stopping.wait(0.1):
                balance, credit, reserved, granted = conn.execute(
                    "SELECT s.balance, s.credit_limit, s.reserved, (SELECT coalesce(sum(amount), 0) FROM grants g"
                    " WHERE g.subscriber_id = s.id) FROM subscribers s WHERE s.name = %s", (self.name,)).fetchone()
                self.samples.append((balance, credit, reserved, int(granted)))
                if reserved > balance + credit or reserved != granted:
                    self.problems.append(f"balance {balance} credit {credit} reserved {reserved} grants {granted}")

    def __enter__(self) -> "GrantSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)


def down_bytes(gw: Gateway, sub) -> int:
    counters = gw.kernel_counters()
    return sum(counters[n]["down_bytes"] for n in sub.networks if n in counters)


def test_one_balance_spent_through_two_gateways_at_once_is_never_overspent(cluster, pg_gateways):
    """x has 0.05 EUR (5,000,000 downloaded bytes at 0.01 EUR/MB, uploads free) and downloads through
    g1 and g2 at once, more than it can pay: the two gateways together deliver no byte beyond what
    the balance buys (the kernel's counters), the grants outstanding never exceed balance + credit
    (sampled every 100 ms), x ends blocked on both; a top-up written through g1's CLI reaches g2
    within a second; a SIGKILLed g2's grants come back to the balance after their validity."""
    x = cluster.shared
    buys = 5_000_000
    gws = pg_gateways({x.name: "0.05"}, upload_free=True, grant="0.01", grant_validity=6)
    g1, g2 = (link for link in sorted(x.links, key=lambda link: link.gateway))
    with GrantSampler(gws[0].db, x.name) as sampler:
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda job: fetch(cluster, x.name, *job, timeout=10),
                                [(g1.addr4, URL4), (g1.addr6, URL6), (g2.addr4, URL4), (g2.addr6, URL6)]))
        time.sleep(1.5)  # the last flushes and blocks
        served = {k: down_bytes(gws[k - 1], x) for k in (1, 2)}
        assert all(served.values()), served  # both gateways served x
        assert 0 < sum(served.values()) <= buys, (served, got)
        assert sum(size for size, _ in got) < buys  # what x received: payload, under the IP bytes
        for link in (g1, g2):  # blocked on both: HTTP gets the gateway's block page, nothing is forwarded
            assert fetch(cluster, x.name, link.addr4, URL4, timeout=2)[0] < 10_000, link.gateway
        assert {k: down_bytes(gws[k - 1], x) for k in (1, 2)} == served

        # a top-up through g1's command line, the gateway x now reaches through g2 lets it through
        assert gws[0].tollgate("topup", x.name, "1.00").returncode == 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 and fetch(cluster, x.name, g2.addr4, f"http://{UPSTREAM4}/index.html",
                                                   timeout=1)[1] != "200":
            time.sleep(0.05)
        waited = time.monotonic() - t0
        assert waited < 1.0, f"g2 let x through {waited:.2f} s after a top-up on g1"
        assert fetch(cluster, x.name, g2.addr4, URL4, timeout=10)[0] == BIG_FILE

        # g2 dies holding a grant of x: nobody renews it, and after its validity it is x's money again
        gws[1].stop(signal.SIGKILL)
        from accounting.ledger import Ledger

        with Ledger.open(gws[0].db) as led:
            led.gateway = "g2"
            assert x.name and led.grants(), "g2 held a grant when it died"
            t0 = time.monotonic()
            while led.grants() and time.monotonic() - t0 < 15:
                time.sleep(0.2)
            assert not led.grants(), "g2's grants never came back"
    assert not sampler.problems, sampler.problems[:5]
    assert len(sampler.samples) > 20
    for gw in gws:
        gw.stop()
    with Ledger.open(gws[0].db) as led:
        row = led.get_subscriber(x.name)
        paid = sum(p["amount"] for p in led.payments(x.name))
        charged = sum(c["amount"] for c in led.charges(x.name))
        assert row["balance"] == 5 * EUR // 100 + paid - charged >= 0  # no money spent that was not there
        assert row["reserved"] == 0  # every grant returned: at the stops, and g2's at expiry
        assert led.check_invariants() == []


def health_of(gw: Gateway) -> dict:
    return json.loads(netns(gw.ns, "curl", "-s", "-m", "2", "http://127.0.0.1:8080/healthz").stdout)


def test_a_gateway_holds_only_the_subscribers_of_its_networks(cluster, pg_gateways):
    """``[cluster] networks``: each gateway loads only the subscribers with an address it sees (x on g1
    and g2), still charges exactly, and a subscriber added later reaches only the gateway of its network."""
    gws = pg_gateways(scoped=True)
    held = {k: health_of(gw)["subscribers"] for k, gw in enumerate(gws, 1)}
    assert held == {1: 3, 2: 3, 3: 2}  # its two own subscribers, and x on g1 and g2: not all 7 each
    run_downloads(cluster, downloads(cluster))
    charged, kernel = settle(cluster, gws)
    assert not mismatches(charged, kernel), (mismatches(charged, kernel), log_lines(gws))
    # a new subscriber with an address in g3's networks: g3 holds it, the others do not
    added = gws[0].tollgate("subscriber", "add", "newcomer", "--tariff", "lab", "--address", "100.67.1.77/32")
    assert added.returncode == 0, added.stderr
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5 and health_of(gws[2])["subscribers"] != 3:
        time.sleep(0.1)
    assert {k: health_of(gw)["subscribers"] for k, gw in enumerate(gws, 1)} == {1: 3, 2: 3, 3: 3}
    for gw in gws:
        gw.stop()
    check_ledger(cluster, gws[0].db, gws)


def test_a_grant_returned_by_one_gateway_unblocks_a_subscriber_another_blocked_as_final(cluster, pg_gateways):
    """x has 0.05 EUR and a grant is 0.03: g1 starts first and takes 0.03, g2 gets the 0.02 left (less than
    it asked: final). x spends g2's 0.02 through g2 (2,000,000 downloaded bytes at 0.01 EUR/MB) and is
    blocked there, rightly: the ledger had nothing more. Then g1 stops and gives its 0.03 back, without any
    payment: the ledger's change feed says so ('grant', with a NOTIFY), g2 asks again and x is let through
    on g2 (before, g2 never asked again: x stayed blocked with 0.03 EUR in the ledger)."""
    from accounting.ledger import Ledger

    x = cluster.shared
    gws = pg_gateways({x.name: "0.05"}, upload_free=True, grant="0.03", scoped=True)
    g2 = next(link for link in x.links if link.gateway == 2)
    with Ledger.open(gws[0].db) as led:
        sid = led.get_subscriber(x.name)["id"]
        held = {}
        for name in ("g1", "g2", "g3"):
            led.gateway = name
            held[name] = led.grants().get(sid, (0, 0))[0]
        assert held == {"g1": 3 * EUR // 100, "g2": 2 * EUR // 100, "g3": 0}  # g3 does not hold x (scoped)
    size, _code = fetch(cluster, x.name, g2.addr4, URL4, timeout=10)
    time.sleep(1.5)  # the last flush and the block
    assert 0 < down_bytes(gws[1], x) <= 2_000_000 and size < 2_000_000
    assert fetch(cluster, x.name, g2.addr4, URL4, timeout=2)[0] < 10_000  # blocked on g2
    gws[0].stop()  # g1's grant of x back to the balance, at its clean stop
    deadline = time.monotonic() + 10
    code = ""
    while time.monotonic() < deadline and code != "200":
        code = fetch(cluster, x.name, g2.addr4, f"http://{UPSTREAM4}/index.html", timeout=1)[1]
        time.sleep(0.1)
    assert code == "200", ("x stays blocked on g2 with g1's grant back in the ledger", log_lines(gws))
    size, _code = fetch(cluster, x.name, g2.addr4, URL4, timeout=10)
    time.sleep(1.5)
    assert 2_000_000 < down_bytes(gws[1], x) <= 5_000_000  # g2 now spends the rest, and no more
    for gw in gws:
        gw.stop()
    with Ledger.open(gws[0].db) as led:
        row = led.get_subscriber(x.name)
        charged = sum(c["amount"] for c in led.charges(x.name))
        assert row["balance"] == 5 * EUR // 100 - charged >= 0 and row["reserved"] == 0
        assert led.check_invariants() == []
