"""policy/limits.py in the lab: speed limits measured by iperf3 at the far end
(IPv4 and IPv6, upload and download), connection limits by what connect()
sees, a restart that keeps the kernel's state (and the count of open
connections), bad input refused with nothing changed; and access hours
(accounting/access.py) enforced in the kernel with a faked clock.

``Limits`` runs as ``ip netns exec <gw> python -c ...``: a process in the
gateway namespace, as the daemon would.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import time

import pytest
from lablib import REPO, netns

UP4, UP6 = "198.18.0.2", "2001:db8:198::2"
M = 10 ** 6
UP_LIMIT, DOWN_LIMIT = 8 * M, 16 * M
SUB1 = ["100.64.1.2/32", "2001:db8:100:1::/64"]
SUB2 = ["100.64.2.2/32", "2001:db8:100:2::/64"]


def limits(lab, code: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` with ``l = Limits(<the lab's interfaces>)`` installed, in the gateway namespace."""
    lan = [f"s{i}" for i in range(1, lab.n + 1)]
    prelude = (f"import sys, json; sys.path.insert(0, {str(REPO)!r}); "
               f"from policy.limits import Limits, PolicyError; l = Limits({lan!r}, 'uplink'); l.install(); ")
    return netns(lab.gw, sys.executable, "-c", prelude + code, check=check)


def state(lab) -> str:
    """Everything of ours the kernel holds: the table and the qdiscs and classes of the interfaces."""
    devs = ["uplink"] + [f"s{i}" for i in range(1, lab.n + 1)]
    tc = "".join(netns(lab.gw, "tc", what, "show", "dev", dev).stdout for what in ("qdisc", "class") for dev in devs)
    return netns(lab.gw, "nft", "list", "ruleset").stdout + re.sub(r"direct_packets_stat \d+", "", tc)


@pytest.fixture
def limited(lab):
    limits(lab, f"l.set_subscriber(1, {SUB1!r}, up_bps='8M', down_bps='16M', max_connections=3)")
    yield
    limits(lab, "l.remove()")


def iperf(lab, i: int, server: str, reverse: bool, seconds: int = 3) -> float:
    """Bits per second the receiving end counted over ``seconds`` of TCP (the first one left out)."""
    out = netns(lab.sub(i), "iperf3", "-c", server, "-t", str(seconds), "-O", "1", "-J", *(["-R"] if reverse else []),
                timeout=30, check=True).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"]


# ---- speed ---------------------------------------------------------------------------------


@pytest.mark.parametrize("server", [UP4, UP6], ids=["ipv4", "ipv6"])
def test_speed_limit_both_directions(lab, limited, server):
    up, down = iperf(lab, 1, server, reverse=False), iperf(lab, 1, server, reverse=True)
    print(f"\n  {server}: upload {up / M:.2f} Mbit/s (limit 8), download {down / M:.2f} Mbit/s (limit 16)")
    assert abs(up - UP_LIMIT) <= 0.1 * UP_LIMIT
    assert abs(down - DOWN_LIMIT) <= 0.1 * DOWN_LIMIT


def test_unlimited_subscriber_is_not_shaped(lab, limited):
    assert iperf(lab, 2, UP4, reverse=True, seconds=2) > 3 * DOWN_LIMIT


def test_changed_rate_applies(lab, limited):
    limits(lab, f"l.set_subscriber(1, {SUB1!r}, up_bps='8M', down_bps='6M', max_connections=3)")
    down = iperf(lab, 1, UP4, reverse=True)
    assert abs(down - 6 * M) <= 0.1 * 6 * M


# ---- connections ---------------------------------------------------------------------------

# Opens connections to the upstream's HTTP server one by one, holding them; each
# line of stdin is a command: "open 4" / "open 6" / "close" (the oldest); prints the outcome.
CONNECTOR = """
import socket, sys
held = []
for line in sys.stdin:
    verb, *arg = line.split()
    if verb == "close":
        held.pop(0).close()
        print("closed", flush=True)
        continue
    family, host = (socket.AF_INET, "198.18.0.2") if arg == ["4"] else (socket.AF_INET6, "2001:db8:198::2")
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, 80))
        held.append(s)
        print("open", flush=True)
    except OSError as exc:
        s.close()
        print(type(exc).__name__, flush=True)
"""


class Connector:
    def __init__(self, lab, i: int) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", lab.sub(i), sys.executable, "-c", CONNECTOR],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def closed_in_conntrack(lab) -> int:
    """Subscriber 1's closed (TIME_WAIT) IPv4 connections to the upstream's HTTP server, by the gateway's conntrack."""
    out = netns(lab.gw, "conntrack", "-L", "-p", "tcp", "--state", "TIME_WAIT", "-s", "100.64.1.2", "--dport", "80")
    return out.stdout.count("TIME_WAIT")


def wait_closed_in_conntrack(lab, before: int, timeout: float = 3.0) -> None:
    """Until the gateway's conntrack has one more closed connection than ``before``
    (the FIN exchange after close() takes a round trip or two)."""
    deadline = time.monotonic() + timeout
    while closed_in_conntrack(lab) <= before:
        assert time.monotonic() < deadline, "the closed connection never reached TIME_WAIT"
        time.sleep(0.05)


@pytest.fixture
def connector(lab):
    made = []

    def make(i: int) -> Connector:
        made.append(Connector(lab, i))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_connection_limit_counts_ipv4_and_ipv6_together(lab, limited, connector):
    c = connector(1)
    assert [c("open 4"), c("open 6"), c("open 4")] == ["open"] * 3
    t = time.monotonic()
    assert c("open 6") == "ConnectionRefusedError"  # a TCP reset: refused at once, not timed out
    assert c("open 4") == "ConnectionRefusedError"
    assert time.monotonic() - t < 2
    closed = closed_in_conntrack(lab)
    assert c("close") == "closed"
    wait_closed_in_conntrack(lab, closed)  # the count forgets a connection conntrack has seen closed
    assert c("open 6") == "open"
    assert c("open 4") == "ConnectionRefusedError"
    other = connector(2)  # a subscriber without limits
    assert [other("open 4") for _ in range(6)] == ["open"] * 6


def test_restart_keeps_the_kernel_state_and_the_count(lab, limited, connector):
    c = connector(1)
    assert [c("open 4") for _ in range(3)] == ["open"] * 3
    before = state(lab)
    # a new process, as after a daemon restart: it reads the state back; restoring the same changes nothing
    got = limits(lab, f"print(json.dumps([l.subscribers[1].networks, l.subscribers[1].up_bps, l.minor])); "
                      f"l.restore([dict(sid=1, networks={SUB1!r}, up_bps='8M', down_bps='16M', max_connections=3)])")
    networks, up, minor = json.loads(got.stdout)
    assert networks == SUB1 and up == UP_LIMIT and minor == {"1": 1}
    assert state(lab) == before
    assert c("open 4") == "ConnectionRefusedError"  # the three open connections are still counted


def test_restore_sets_and_removes(lab, limited, connector):
    limits(lab, f"l.restore([({2}, {SUB2!r}, None, None, 2)])")
    out = limits(lab, "print(sorted(l.subscribers), l.subscribers[2].max_connections)").stdout.split()
    assert out == ["[2]", "2"]
    c1, c2 = connector(1), connector(2)
    assert [c1("open 4") for _ in range(4)] == ["open"] * 4  # subscriber 1 has no limits any more
    assert [c2("open 6"), c2("open 4"), c2("open 4")] == ["open", "open", "ConnectionRefusedError"]
    assert "class htb 1:1 " not in state(lab)


def test_interface_added_to_the_configuration_gets_the_classes(lab):
    sub1 = f"dict(sid=1, networks={SUB1!r}, down_bps='16M')"
    code = "l = Limits({lan!r}, 'uplink'); l.install(); l.restore([" + sub1 + "])"
    limits(lab, code.format(lan=["s1", "s2"]))
    assert "1:1" not in netns(lab.gw, "tc", "class", "show", "dev", "s3").stdout
    limits(lab, code.format(lan=["s1", "s2", "s3"]))
    assert "class htb 1:1 root leaf" in netns(lab.gw, "tc", "class", "show", "dev", "s3").stdout
    # and one left out loses our qdisc, the others keep theirs
    netns(lab.gw, sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); from policy.limits import "
                                        f"Limits; l = Limits(['s1', 's3'], 'uplink'); l.install(); l.restore([{sub1}])",
          check=True)
    roots = {dev: netns(lab.gw, "tc", "qdisc", "show", "dev", dev, "root").stdout.split()[1]
             for dev in ("s1", "s2", "s3", "s4", "uplink")}
    assert roots == {"s1": "htb", "s2": "noqueue", "s3": "htb", "s4": "noqueue", "uplink": "htb"}
    limits(lab, "l.remove()")


def test_install_twice_and_remove_leave_only_what_was_there(lab):
    before = state(lab)
    limits(lab, f"l.install(); l.set_subscriber(5, {SUB2!r}, down_bps='1G'); l.remove_subscriber(5); "
                f"l.set_subscriber(6, {SUB2!r}); assert not l.subscribers; "
                f"l.set_subscriber(5, {SUB2!r}, up_bps='2M'); l.remove(); l.remove()")
    assert state(lab) == before
    # without knowing the interfaces (a configuration that no longer names them): the table knows them
    limits(lab, f"l.set_subscriber(5, {SUB2!r}, up_bps='2M'); Limits().remove(); Limits().remove()")
    assert state(lab) == before
    assert "table inet lab" in before


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    ("l.set_subscriber(2, ['100.64.1.2/32'], up_bps='1M')", "belongs to subscriber 1"),
    ("l.set_subscriber(2, ['100.64.2.2/33'], up_bps='1M')", "is not an address or network"),
    ("l.set_subscriber(2, [], up_bps='1M')", "no networks"),
    ("l.set_subscriber(0, ['100.64.2.2'], up_bps='1M')", "subscriber id"),
    ("l.set_subscriber(2, ['100.64.2.2'], up_bps='fast')", "is not a rate"),
    ("l.set_subscriber(2, ['100.64.2.2'], max_connections=0)", "max_connections"),
    ("l.restore([(2, ['100.64.2.2'], '1M'), (2, ['100.64.3.2'], '1M')])", "given twice"),
    ("Limits(['s1'], ['s1'])", "both ways"),
    ("Limits(['s1 ; flush ruleset'], ['uplink'])", "not an interface name"),
    ("Limits(['s1'], []).install()", "wan_interfaces: name at least one"),
    ("Limits(['s1'], ['nosuchdev']).install()", "no interface 'nosuchdev'"),
])
def test_bad_input_is_refused_and_changes_nothing(lab, limited, call, message):
    before = state(lab)
    out = limits(lab, f"""
try:
    {call}
    print("accepted")
except PolicyError as exc:
    print(exc)
""").stdout
    assert message in out
    assert state(lab) == before
    limits(lab, "assert l.subscribers[1].down_bps == 16_000_000")


def test_parse_rate():
    from policy.limits import PolicyError, parse_rate

    assert [parse_rate(t) for t in ("10M", "512k", "1G", "1.5M", "20Mbit", "64kbit/s", "800000", 2_000_000)] == \
        [10 ** 7, 512_000, 10 ** 9, 1_500_000, 2 * 10 ** 7, 64_000, 800_000, 2_000_000]
    for bad, why in (("fast", "not a rate"), ("10 MB", "bytes?"), ("8Mbps", "bytes?"), ("-5M", "not a rate"),
                     ("0", "1k to 100G"), ("999", "1k to 100G"), ("101G", "1k to 100G"),
                     ("1.0005k", "whole number"), ("", "not a rate"), (None, "not a rate"), (True, "not a rate")):
        with pytest.raises(PolicyError, match=why.replace("?", r"\?")):
            parse_rate(bad)


# ---- access hours with a faked clock ---------------------------------------------------------

# The gateway's side of access hours, as the daemon does it once a second: evaluate
# the schedule on the system clock, block or unblock the subscriber in policy.nft's
# table. It runs under faketime, so the clock it reads is the one the test chose.
EVALUATOR = f"""
import json, sys, time
sys.path.insert(0, {str(REPO)!r})
from accounting.access import allowed, next_change, parse_access
from policy.nft import Enforcer
schedule, networks, seconds = parse_access(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3])
enforcer = Enforcer(queues=(), local_networks=["100.64.0.0/10", "2001:db8:100::/48"])
enforcer.install()
was, end = None, time.monotonic() + seconds
while time.monotonic() < end:
    now = time.time_ns()
    is_open = allowed(schedule, now, "Europe/Berlin")
    if is_open != was:
        (enforcer.unblock if is_open else enforcer.block)(networks)
        print("open" if is_open else "closed", now, next_change(schedule, now, "Europe/Berlin"), flush=True)
        was = is_open
    time.sleep(0.1)
"""


def reaches_upstream(lab) -> list[bool]:
    """Whether subscriber 1 gets the upstream's page over IPv4 and over IPv6."""
    return [netns(lab.sub(1), "curl", "-s", "-m", "2", "-g", url, timeout=10).stdout.startswith("<h1>upstream")
            for url in (f"http://{UP4}/", f"http://[{UP6}]/")]


@pytest.mark.parametrize("clock, before, after", [
    ("2026-03-02 06:59:56", "closed", "open"),  # Monday 07:59:56 in Berlin (CET): opens at 08:00
    ("2026-03-06 18:59:56", "open", "closed"),  # Friday 19:59:56: closes at 20:00 for the weekend
], ids=["opens-at-8", "closes-at-20"])
def test_access_hours_enforced_with_a_faked_clock(lab, clock, before, after):
    if shutil.which("faketime") is None:
        pytest.fail("faketime is not installed: run `make system-deps`", pytrace=False)
    edge = int(dt.datetime.fromisoformat(clock).replace(tzinfo=dt.UTC).timestamp() + 4) * 10 ** 9
    proc = subprocess.Popen(["ip", "netns", "exec", lab.gw, "env", "TZ=UTC", "faketime", "-f", f"@{clock}",
                             sys.executable, "-c", EVALUATOR, "Mon-Fri 08:00-20:00", json.dumps(SUB1), "7"],
                            stdout=subprocess.PIPE, text=True)
    try:
        state, now, change = proc.stdout.readline().split()
        assert state == before and int(now) < edge and int(change) == edge
        assert reaches_upstream(lab) == [before == "open"] * 2
        state, now, _change = proc.stdout.readline().split()  # about 4 s later, by the faked clock
        assert state == after and edge <= int(now) < edge + 10 ** 9
        assert reaches_upstream(lab) == [after == "open"] * 2
    finally:
        proc.wait(timeout=15)
        netns(lab.gw, sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                                            "from policy.nft import Enforcer; Enforcer().remove()", check=True)
