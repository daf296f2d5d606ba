"""Our nftables table and the queue rule in the lab's gateway namespace,
checked by what real traffic does: counters against an independent counter at
the far end and packets of known sizes, blocks by what curl and ping see, the
queue by traffic stopping when nobody reads it; and a config reload of the
running gateway.

The Enforcer runs as ``ip netns exec <gw> python -c ...``: a process in the
gateway namespace, as the daemon would.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from lablib import REPO, Gateway, lab_config, netns

UP4, UP6 = "198.18.0.2", "2001:db8:198::2"
BIG = 8 * 1024 * 1024  # gateway.lab.BIG_FILE
PORTAL, OTHER = 8089, 8090  # test servers on the gateway: the block page, and a service blocked ones may not reach
OPEN = 8000  # a second HTTP server on the upstream, not on any allow-list
SUB1 = ["100.64.1.2/32", "2001:db8:100:1::/64"]
SUB2 = ["100.64.2.2/32", "2001:db8:100:2::/64"]
LOCAL = ["100.64.0.0/10", "2001:db8:100::/48"]


def enforcer(lab, code: str, **kw) -> str:
    """Run ``code`` with ``e = Enforcer(**kw)`` in the gateway namespace; its stdout."""
    prelude = (f"import sys, json; sys.path.insert(0, {str(REPO)!r}); from policy.nft import Enforcer; "
               f"e = Enforcer(**{kw!r}); ")
    return netns(lab.gw, sys.executable, "-c", prelude + code, check=True).stdout


def ruleset(lab) -> str:
    return netns(lab.gw, "nft", "list", "ruleset").stdout


def queue_rules(lab) -> str:
    return netns(lab.gw, "iptables-nft", "-S", "FORWARD").stdout + netns(lab.gw, "ip6tables-nft", "-S", "FORWARD").stdout


def curl(lab, i: int, url: str, *opts: str) -> subprocess.CompletedProcess:
    return netns(lab.sub(i), "curl", "-s", "-m", "5", *opts, url, timeout=20)


def ping(lab, i: int, dst: str, count: int = 1, size: int = 56) -> subprocess.CompletedProcess:
    return netns(lab.sub(i), "ping", "-c", str(count), "-i", "0.01", "-s", str(size), "-W", "2", dst, timeout=20)


def dns_answer(lab, i: int) -> str:
    """An A query from subscriber i to the gateway's DNS; the address answered."""
    code = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); "
            "q = bytes.fromhex('12340100000100000000000003777777076578616d706c650000010001'); "
            f"s.sendto(q, ('{lab.gw_addr4(i)}', 53)); r = s.recv(512); print(socket.inet_ntoa(r[-4:]))")
    return netns(lab.sub(i), sys.executable, "-c", code, timeout=20).stdout.strip()


@pytest.fixture
def clean(lab):
    """Whatever a test installs is removed; the lab's own table must survive."""
    yield
    enforcer(lab, "e.remove()")
    assert "table inet lab" in ruleset(lab)


SERVERS = f"""
import http.server, socket, threading
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
def handler(text):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(text)
        def log_message(self, *a): pass
    return H
a = Server(("::", {PORTAL}), handler(b"BLOCKED"))
b = Server(("::", {OTHER}), handler(b"OTHER"))
threading.Thread(target=a.serve_forever, daemon=True).start()
print("ready", flush=True)
b.serve_forever()
"""


@pytest.fixture
def servers(lab):
    """The block page and another service on the gateway; a second HTTP server upstream."""
    procs = [subprocess.Popen(["ip", "netns", "exec", lab.gw, sys.executable, "-c", SERVERS],
                              stdout=subprocess.PIPE, text=True),
             subprocess.Popen(["ip", "netns", "exec", lab.up, sys.executable, "-m", "http.server", str(OPEN),
                               "--bind", "::", "--directory", str(REPO / "policy")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        assert procs[0].stdout.readline().strip() == "ready"
        for _ in range(50):
            if f":{OPEN} " in netns(lab.up, "ss", "-Hltn").stdout:
                break
            time.sleep(0.1)
        yield
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


# ---- install, remove, restore ----------------------------------------------------


def test_install_twice_restore_twice_then_remove_leaves_nothing(lab):
    before, xt_before = ruleset(lab), queue_rules(lab)
    native = enforcer(lab, "print(e.has_native_queue())").strip() == "True"
    kw = dict(queues=(0, 1), local_networks=LOCAL)
    enforcer(lab, "e.install(); e.install(); "
                  "e.restore(['100.64.1.2/32'], ['100.64.1.2/32', '100.64.2.2/32', '2001:db8:100:1::/64']); "
                  "e.restore(['100.64.1.2/32'], ['100.64.1.2/32', '100.64.2.2/32', '2001:db8:100:1::/64'])", **kw)
    table = netns(lab.gw, "nft", "list", "table", "inet", "tollgate").stdout
    assert ruleset(lab).count("table inet tollgate") == 1
    if native:
        assert table.count(" queue num 0-1 fanout,bypass") == 4 and "NFQUEUE" not in queue_rules(lab)
    else:  # this kernel: the xtables fallback, once per direction and family, balanced over 2 queues
        rules = queue_rules(lab)
        assert rules.count("NFQUEUE") == 4, rules
        assert rules.count("--queue-balance 0:1") == 4 and rules.count("--queue-bypass") == 4
        assert "queue" not in table.replace("queue-", "")
    sets = json.loads(netns(lab.gw, "nft", "-j", "list", "table", "inet", "tollgate").stdout)["nftables"]
    elems = {s["set"]["name"]: s["set"].get("elem", []) for s in sets if "set" in s}
    assert {p: sum(len(v) for k, v in elems.items() if k.startswith(p)) for p in ("blocked", "up", "down")} \
        == {"blocked": 1, "up": 3, "down": 3}
    assert len(elems["up6_64"]) == len(elems["down6_64"]) == 1  # a /64 goes to the hashed /64 set
    # a second daemon start with other queues replaces our queue rules, not adds to them
    enforcer(lab, "e.install()", queues=(2,), local_networks=LOCAL, fail_open=False)
    if not native:
        rules = queue_rules(lab)
        assert rules.count("NFQUEUE") == 4 and rules.count("--queue-num 2") == 4 and "bypass" not in rules, rules
    enforcer(lab, "e.remove(); e.remove()")  # whatever queues it was installed with; twice is fine
    assert netns(lab.gw, "nft", "list", "table", "inet", "tollgate").returncode != 0
    assert queue_rules(lab) == xt_before
    assert "table inet lab" in before and ruleset(lab) == before


def test_reinstall_from_a_config_keeps_blocks_and_counters(lab, clean):
    """What a config reload does: install again with the new allow-list;
    nobody is unblocked and the counters go on."""
    from_config = ("import tomllib; from gateway.config import parse_config; from gateway.lab import lab_config; "
                   f"e = Enforcer.from_config(parse_config(tomllib.loads(lab_config({lab.n}))), portal_port={PORTAL}); ")
    enforcer(lab, from_config + f"e.install(); e.restore({SUB1!r}, {SUB1 + SUB2!r})")
    assert ping(lab, 2, UP4, count=3).returncode == 0
    assert "Packet filtered" in ping(lab, 1, UP4).stdout
    table = enforcer(lab, from_config + "e.install(); print(e.dump())")
    allowed = [line.strip() for line in table.splitlines() if "ip daddr 100.64.2.1 " in line]
    assert allowed and all(line.endswith("dport 53 accept") for line in allowed), table  # the config's allow-list
    c = json.loads(enforcer(lab, "print(json.dumps([sorted(e.blocked()), e.counters()]))"))
    assert c[0] == SUB1
    assert c[1]["100.64.2.2/32"]["up_packets"] == 3 and c[1]["100.64.2.2/32"]["up_bytes"] == 3 * 84
    assert "Packet filtered" in ping(lab, 1, UP4).stdout


def test_bad_address_changes_nothing(lab, clean):
    out = enforcer(lab, "e.install(); e.restore([], []); e.block(['100.64.3.2'])\n"
                        "try:\n    e.block(['100.64.1.2', 'not-an-address'])\n"
                        "except Exception as exc:\n    print(type(exc).__name__, exc)\n"
                        "print(sorted(e.blocked()))", local_networks=LOCAL)
    assert out.splitlines()[0].startswith("PolicyError 'not-an-address'")
    assert out.splitlines()[1] == "['100.64.3.2/32']"


# ---- counters against the far end --------------------------------------------------

FAR_END = """table inet farend {
  chain input { type filter hook input priority 0; policy accept;
    ip saddr 198.18.0.1 counter
    ip6 saddr 2001:db8:198::1 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } return
    ip6 saddr 2001:db8:198::1 counter
  }
  chain output { type filter hook output priority 0; policy accept;
    ip daddr 198.18.0.1 counter
    ip6 daddr 2001:db8:198::1 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } return
    ip6 daddr 2001:db8:198::1 counter
  }
}
"""


def far_end(lab) -> dict:
    """Bytes and packets the upstream received from / sent to the gateway
    (all subscribers masquerade to it), by its own counters."""
    doc = json.loads(netns(lab.up, "nft", "-j", "list", "table", "inet", "farend", check=True).stdout)["nftables"]
    found = {}
    for item in doc:
        rule = item.get("rule")
        if not rule:
            continue
        exprs = rule["expr"]
        counter = next((x["counter"] for x in exprs if "counter" in x), None)
        if counter is None:
            continue
        fam = exprs[0]["match"]["left"]["payload"]["protocol"]
        way = "up" if rule["chain"] == "input" else "down"
        found[f"{way}{'4' if fam == 'ip' else '6'}"] = (counter["bytes"], counter["packets"])
    return found


def test_kernel_counters_equal_the_far_end_and_known_sizes(lab, clean):
    subprocess.run(["ip", "netns", "exec", lab.up, "nft", "-f", "-"], input=FAR_END, text=True, check=True)
    try:
        enforcer(lab, f"e.install(); e.restore([], {SUB1 + SUB2!r})", local_networks=LOCAL)
        def counters() -> dict:
            return json.loads(enforcer(lab, "print(json.dumps(e.counters()))"))

        # 1. packets of known size: 20 echo requests of 1000 bytes each way are 20 x (1000 + 8 + 20) IPv4
        #    bytes and 20 x (1000 + 8 + 40) IPv6 bytes
        assert ping(lab, 1, UP4, count=20, size=1000).returncode == 0
        assert ping(lab, 1, UP6, count=20, size=1000).returncode == 0
        c = counters()
        assert c["100.64.1.2/32"] == {"up_bytes": 20 * 1028, "up_packets": 20, "down_bytes": 20 * 1028, "down_packets": 20}
        assert c["2001:db8:100:1::/64"] == {"up_bytes": 20 * 1048, "up_packets": 20,
                                            "down_bytes": 20 * 1048, "down_packets": 20}
        assert c["100.64.2.2/32"]["up_packets"] == c["100.64.2.2/32"]["down_packets"] == 0
        # 2. bulk TCP both ways, both families: equal to what the far end counted, to the byte
        for fam in ("-4", "-6"):
            host = UP4 if fam == "-4" else f"[{UP6}]"
            got = curl(lab, 1, f"http://{host}/big.bin", fam, "-o", "/dev/null", "-w", "%{size_download}")
            assert got.stdout == str(BIG)
            up = netns(lab.sub(2), "iperf3", fam, "-c", UP4 if fam == "-4" else UP6, "-t", "2", "-J", timeout=30)
            assert up.returncode == 0, up.stderr
            assert json.loads(up.stdout)["end"]["sum_received"]["bytes"] > BIG
        c, far = counters(), far_end(lab)
        for v, nets in (("4", ("100.64.1.2/32", "100.64.2.2/32")), ("6", ("2001:db8:100:1::/64", "2001:db8:100:2::/64"))):
            for way in ("up", "down"):
                mine = (sum(c[n][f"{way}_bytes"] for n in nets), sum(c[n][f"{way}_packets"] for n in nets))
                assert mine == far[f"{way}{v}"], (way, v, mine, far)
        # the download of a known file is in subscriber 1's download, headers on top
        assert c["100.64.1.2/32"]["down_bytes"] > BIG and c["2001:db8:100:1::/64"]["down_bytes"] > BIG
    finally:
        netns(lab.up, "nft", "delete", "table", "inet", "farend")


# ---- blocking ---------------------------------------------------------------------------


def test_block_rejects_redirects_to_portal_keeps_dns_then_unblock(lab, clean, servers):
    kw = dict(local_networks=LOCAL, portal_port=PORTAL, allow=[("198.18.0.2/32", 6, 5201, 5201)])
    enforcer(lab, f"e.install(); e.restore([], {SUB1 + SUB2!r}); e.block({SUB1!r})", **kw)
    # TCP: a reset at once (curl's 7, "connection refused"), not a timeout (28), though the port is open
    started = time.monotonic()
    for fam, host in (("-4", UP4), ("-6", f"[{UP6}]")):
        assert curl(lab, 1, f"http://{host}:{OPEN}/", fam).returncode == 7
    print(f"\nblocked: two refused connections took {time.monotonic() - started:.3f} s")
    # ICMP: administratively prohibited from the gateway
    assert "Packet filtered" in ping(lab, 1, UP4).stdout
    assert "Administratively prohibited" in ping(lab, 1, UP6).stdout
    # HTTP: the block page, for IPv4 and IPv6
    assert curl(lab, 1, f"http://{UP4}/").stdout == "BLOCKED"
    assert curl(lab, 1, f"http://[{UP6}]/").stdout == "BLOCKED"
    # DNS on the gateway works, other services on it do not
    assert dns_answer(lab, 1) == UP4
    assert curl(lab, 1, f"http://{lab.gw_addr4(1)}:{OTHER}/").returncode == 7
    # the allow-list reaches through the block, both directions
    connect = f"import socket; socket.create_connection(('{UP4}', 5201), 3).close(); print('ok')"
    assert netns(lab.sub(1), sys.executable, "-c", connect, timeout=20).stdout.strip() == "ok"
    # subscriber 2 is not affected
    assert curl(lab, 2, f"http://{UP4}:{OPEN}/nft.py").returncode == 0
    assert curl(lab, 2, f"http://{UP4}/").stdout.startswith("<h1>upstream")
    assert curl(lab, 2, f"http://{lab.gw_addr4(2)}:{OTHER}/").stdout == "OTHER"

    enforcer(lab, f"e.unblock({SUB1!r}); print(sorted(e.blocked()))")
    assert curl(lab, 1, f"http://{UP4}:{OPEN}/nft.py").returncode == 0
    assert curl(lab, 1, f"http://[{UP6}]/").stdout.startswith("<h1>upstream")
    assert ping(lab, 1, UP4).returncode == 0 and ping(lab, 1, UP6).returncode == 0
    assert curl(lab, 1, f"http://{lab.gw_addr4(1)}:{OTHER}/").stdout == "OTHER"

    # an allow-listed web server is not redirected to the portal
    kw["allow"] = [("198.18.0.2/32", 6, 80, 80)]
    enforcer(lab, f"e.install(); e.restore({SUB1!r}, {SUB1 + SUB2!r})", **kw)
    assert curl(lab, 1, f"http://{UP4}/").stdout.startswith("<h1>upstream")
    assert curl(lab, 1, f"http://[{UP6}]/").stdout == "BLOCKED"


# ---- the queue ----------------------------------------------------------------------------


def test_queue_takes_subscriber_traffic_only_and_runs_after_the_block(lab, clean, servers):
    """Fail-closed queue 7 with no reader: traffic it takes stops; what it
    does not take flows; a blocked subscriber still gets its reset at once."""
    xt_before = queue_rules(lab)
    native = enforcer(lab, "print(e.has_native_queue())").strip() == "True"
    kw = dict(queues=(7,), fail_open=False, portal_port=PORTAL,
              local_networks=["100.64.2.0/24", "2001:db8:100:2::/64"])
    enforcer(lab, f"e.install(); e.restore([], {SUB1 + SUB2!r})", **kw)
    if not native:
        assert queue_rules(lab).count("--queue-num 7") == 4
    assert curl(lab, 2, f"http://{UP4}:{OPEN}/nft.py", "-m", "2").returncode == 28  # queued, nobody reads: dropped
    assert curl(lab, 2, f"http://[{UP6}]:{OPEN}/nft.py", "-m", "2").returncode == 28
    assert curl(lab, 1, f"http://{UP4}:{OPEN}/nft.py").returncode == 0  # not a queued network
    enforcer(lab, f"e.block({SUB2!r})")
    assert curl(lab, 2, f"http://{UP4}:{OPEN}/").returncode == 7  # rejected before the queue
    assert curl(lab, 2, f"http://{UP4}/").stdout == "BLOCKED"  # the portal is local: not queued
    # fail-open: the same queue without a reader lets traffic through
    enforcer(lab, f"e.install(); e.restore([], {SUB2!r})", **{**kw, "fail_open": True})
    assert curl(lab, 2, f"http://{UP4}:{OPEN}/nft.py").returncode == 0
    enforcer(lab, "e.remove()")
    assert queue_rules(lab) == xt_before


# ---- update rate ----------------------------------------------------------------------------

RATE = """
import ipaddress, time
e.install(); e.restore([], [])
base = int(ipaddress.ip_address("100.65.0.0"))
n = 0
for size, rounds in ((1, 2000), (100, 100), (10000, 5)):
    nets = [[str(ipaddress.ip_address(base + n + r * size + k)) for k in range(size)] for r in range(rounds)]
    n += rounds * size
    t = time.perf_counter()
    for batch in nets:
        e.block(batch)
    add = rounds * size / (time.perf_counter() - t)
    t = time.perf_counter()
    for batch in nets:
        e.unblock(batch)
    rm = rounds * size / (time.perf_counter() - t)
    print(size, rounds, round(add), round(rm), len(e.blocked()))
"""


def test_batched_element_updates(lab, clean):
    """Elements per second for block/unblock batches of 1, 100 and 10k
    (printed; run with -s to see). Every batch must land and go again."""
    out = enforcer(lab, RATE, local_networks=LOCAL)
    print("\nbatch  rounds  block elem/s  unblock elem/s")
    for line in out.splitlines():
        size, rounds, add, rm, left = map(int, line.split())
        print(f"{size:5d}  {rounds:6d}  {add:12d}  {rm:14d}")
        assert left == 0
    assert len(out.splitlines()) == 3


# ---- the running gateway --------------------------------------------------------------------


def test_sighup_reloads_and_a_broken_config_is_refused(lab, tmp_path):
    gw = Gateway(lab.gw, tmp_path, lab_config(lab.n, {})).start()
    try:
        gw.config.write_text(lab_config(lab.n, {}, price_mb="0.05"))
        gw.proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        gw.config.write_text("[gateway]\ncurrency = 5\n")
        gw.proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        log = (tmp_path / "gateway.log").read_text()
        assert "config reloaded" in log
        assert "reload refused" in log and "gateway.currency" in log
        assert gw.proc.poll() is None  # still running on the previous config
        assert netns(lab.sub(1), "curl", "-s", "-m", "3", "-o", "/dev/null", "http://198.18.0.2/").returncode == 0
    finally:
        gw.stop()
        enforcer(lab, "e.remove()")


def test_counters_of_some_networks_equal_the_listing(lab, clean):
    """What a drift check reads (Enforcer.counters_of, elements asked for by value in batches) equals the
    whole table's listing for the same networks, for more networks than one `get element` may carry
    (libnftables 1.0.6 crashes from 255 IPv4 or 129 IPv6 elements), with /32, /64 and an interval-set prefix."""
    many = [f"100.65.{i // 250}.{i % 250 + 1}/32" for i in range(600)] + [f"2001:db8:100:{i:x}::/64"
                                                                           for i in range(0x100, 0x200)]
    subs = SUB1 + SUB2 + ["100.64.3.0/28"] + many
    enforcer(lab, f"e.install(); e.restore([], {subs!r})", local_networks=LOCAL)
    assert ping(lab, 1, UP4, count=5, size=500).returncode == 0
    assert ping(lab, 2, UP6, count=3, size=300).returncode == 0
    out = json.loads(enforcer(lab, f"print(json.dumps([e.counters(), e.counters_of({subs!r}), "
                                    f"e.counters_of({SUB1!r})]))"))
    listing, some, one = out
    assert set(some) == {n for n in subs} and some == {n: listing[n] for n in subs}
    assert one == {n: listing[n] for n in SUB1} and one["100.64.1.2/32"]["up_bytes"] == 5 * (500 + 8 + 20)
