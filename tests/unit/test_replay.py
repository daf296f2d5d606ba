"""``tollgate replay`` end to end: a scapy-made capture whose bytes and charges
are worked out here, from the packets as scapy built them, never from the
engine. Runs the real CLI in a subprocess for both engines."""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from scapy.all import ICMP, IP, TCP, UDP, Dot1Q, Ether, IPv6, Raw, wrpcap
from scapy.layers.inet6 import ICMPv6EchoRequest

from ext import ENGINES

REPO = Path(__file__).resolve().parents[2]


def ETH(**kw):
    # explicit addresses: without them scapy looks up routes and ARP for every frame
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", **kw)
TOLLGATE = [sys.executable, "-m", "gateway.cli"]
ENGINE_IDS = ["c", "py"]

# 2026-11-02 21:58:00 UTC, a Monday: two minutes of day price, then night
T0 = 1793656680
NIGHT = 1793656800  # 22:00:00 UTC

CONFIG = """
[gateway]
currency = "EUR"
timezone = "UTC"
local_networks = ["100.64.0.0/10", "2001:db8:100::/48"]

[[zone]]
name = "peering"
networks = ["198.18.0.0/16", "2001:db8:198::/56"]

[[zone]]
name = "video"
networks = ["198.19.0.0/16"]
protocol = "tcp"
ports = "443"

[schedule]
slots = ["day", "night"]
[[schedule.rule]]
slot = "night"
from = "22:00"
to = "06:00"

[[tariff]]
name = "home"
price_unit = "GB"
[tariff.prices]
external = { upload = "1.00", download = "2.00" }
"external.night" = "0.50"
peering = "0.20"
video = { upload = "0.10", download = "1.50" }

[[subscriber]]
name = "alice"
tariff = "home"
balance = "100.00"
addresses = ["100.64.1.2/32", "2001:db8:100:1::/64"]

[[subscriber]]
name = "bob"
tariff = "home"
balance = "100.00"
addresses = ["100.64.2.0/29"]

[[subscriber]]
name = "carol"
tariff = "home"
balance = "0.000001"
addresses = ["2001:db8:100:300::/56"]
"""

# EUR per GB, by (zone, direction, night?) - the same table as CONFIG, typed in again
PRICE = {
    ("external", "upload", False): Fraction(1), ("external", "download", False): Fraction(2),
    ("external", "upload", True): Fraction(1, 2), ("external", "download", True): Fraction(1, 2),
    ("peering", "upload", False): Fraction(1, 5), ("peering", "download", False): Fraction(1, 5),
    ("peering", "upload", True): Fraction(1, 5), ("peering", "download", True): Fraction(1, 5),
    ("video", "upload", False): Fraction(1, 10), ("video", "download", False): Fraction(3, 2),
    ("video", "upload", True): Fraction(1, 10), ("video", "download", True): Fraction(3, 2),
    ("local", "upload", False): Fraction(0), ("local", "download", False): Fraction(0),
    ("local", "upload", True): Fraction(0), ("local", "download", True): Fraction(0),
}
NANO = 10 ** 9

HOSTS = {
    "alice": ["100.64.1.2", "2001:db8:100:1::5"],
    "bob": ["100.64.2.3", "100.64.2.6"],
    "carol": ["2001:db8:100:3ff::9"],
}
REMOTES = {  # remote address -> zone (for non-video traffic)
    "198.18.5.5": "peering", "2001:db8:198:10::1": "peering",
    "198.19.1.1": "external", "203.0.113.7": "external", "2001:db8:beef::1": "external",
}


class Expect:
    """What the test knows about the capture it wrote."""

    def __init__(self):
        self.usage = {}  # (sub, zone, dir) -> [bytes, packets, Fraction cost in EUR]
        self.packets = 0
        self.malformed = 0

    def add(self, sub, zone, direction, length, night):
        u = self.usage.setdefault((sub, zone, direction), [0, 0, Fraction(0)])
        u[0] += length
        u[1] += 1
        u[2] += Fraction(length, NANO) * PRICE[(zone, direction, night)]

    def charged_nano(self, sub, zone, direction):
        # floor of the exact cost in nano-EUR: the remainder is carried, never rounded per packet
        return int(self.usage[(sub, zone, direction)][2] * NANO // 1)


def _ip(src, dst):
    return IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)


def build_capture(path: Path, seed: int = 7) -> Expect:
    rng = random.Random(seed)
    exp = Expect()
    frames = []
    t = Fraction(T0)
    for _ in range(1200):
        t += Fraction(rng.randint(1, 400_000), 1_000_000)  # ~240 s in total, crossing 22:00
        sub = rng.choice(["alice", "bob"])
        local = rng.choice(HOSTS[sub])
        v6 = ":" in local
        kind = rng.random()
        direction = rng.choice(["upload", "download"])
        if kind < 0.15:  # internal: alice <-> bob (v4 only: bob has no v6)
            other = "bob" if sub == "alice" else "alice"
            local = HOSTS[sub][0]
            remote = HOSTS[other][0]
            zone = "local"
            l4 = UDP(sport=5000, dport=5001)
        elif kind < 0.30:  # video: tcp/443 to 198.19/16; other ports there are external
            local = HOSTS[sub][0]
            remote = "198.19.1.1"
            port = rng.choice([443, 443, 80])
            zone = "video" if port == 443 else "external"
            l4 = TCP(sport=port, dport=40000) if direction == "download" else TCP(sport=40000, dport=port)
        else:
            remote = rng.choice([r for r in REMOTES if (":" in r) == v6])
            zone = REMOTES[remote]
            l4 = rng.choice([UDP(sport=53000, dport=53), TCP(sport=1234, dport=80),
                             ICMPv6EchoRequest() if v6 else ICMP()])
        src, dst = (local, remote) if direction == "upload" else (remote, local)
        payload = Raw(bytes(rng.randint(0, 1400)))
        ip = _ip(src, dst) / l4 / payload
        raw = bytes(ip)
        frame = ETH() / (Dot1Q(vlan=7) / ip if rng.random() < 0.1 else ip)
        frame.time = t
        frames.append(frame)
        night = t >= NIGHT
        exp.packets += 1
        exp.add(sub, zone, direction, len(raw), night)
        if zone == "local":  # the other subscriber sees the same packet the other way
            other = "bob" if sub == "alice" else "alice"
            exp.add(other, "local", "download" if direction == "upload" else "upload", len(raw), night)
        if rng.random() < 0.02:  # garbage claiming to be IPv4, and a cut IPv6 header
            for junk in (b"\x45\x00\x01" + bytes(rng.randrange(256) for _ in range(9)), b"\x60\x00\x00"):
                g = ETH(type=0x86DD if junk[0] == 0x60 else 0x0800) / Raw(junk)
                g.time = t
                frames.append(g)
                exp.packets += 1
                exp.malformed += 1
    # carol: a v6 prefix, and a balance worth ~1 kB of external download; the tiny
    # ICMP echo keeps the Ethernet minimum-frame padding in play
    for i in range(20):
        frame = ETH() / IPv6(src="2001:db8:beef::1", dst="2001:db8:100:3ff::9") / UDP(sport=443, dport=5000) / Raw(bytes(200))
        frame.time = Fraction(NIGHT + 100) + i
        frames.append(frame)
    # 42 bytes of frame padded to Ethernet's 60: the padding is not IP bytes
    pad = Ether(bytes(ETH() / IP(src="100.64.1.2", dst="203.0.113.7") / ICMP()) + bytes(18))
    pad.time = Fraction(NIGHT + 130)
    frames.append(pad)
    exp.packets += 21
    exp.add("alice", "external", "upload", 28, True)
    wrpcap(str(path), frames)
    return exp


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    d = tmp_path_factory.mktemp("replay")
    path = d / "traffic.pcap"
    exp = build_capture(path)
    (d / "tollgate.toml").write_text(CONFIG)
    return d, path, exp


def run(*args, expect=0):
    proc = subprocess.run(TOLLGATE + [str(a) for a in args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stderr + proc.stdout
    return proc


@pytest.mark.parametrize("engine", ENGINE_IDS)
def test_replay_exact_bytes_and_charges(capture, engine, tmp_path):
    if engine not in ENGINES:
        pytest.fail(f"engine {engine} is not built")
    d, pcap, exp = capture
    db = tmp_path / "ledger.db"
    out = json.loads(run("replay", "--config", d / "tollgate.toml", "--db", db, "--engine", engine, "--json", pcap).stdout)
    assert out["engine"] == engine
    assert out["packets"] == exp.packets
    assert out["malformed_packets"] == exp.malformed
    subs = {s["name"]: s for s in out["subscribers"]}
    for name in ("alice", "bob"):
        got = {(u["zone"], u["direction"]): u for u in subs[name]["usage"]}
        want = {(z, dr): v for (s, z, dr), v in exp.usage.items() if s == name}
        assert set(got) == set(want), name
        for key, (nbytes, npackets, _cost) in want.items():
            assert got[key]["bytes"] == nbytes, (name, key)
            assert got[key]["packets"] == npackets, (name, key)
            assert got[key]["charged"] == exp.charged_nano(name, *key), (name, key)
        total = sum(exp.charged_nano(name, *k) for k in want)
        assert subs[name]["charged"] == total
        assert subs[name]["balance"] == 100 * NANO - total
        assert subs[name]["blocked"] is None

    # carol: 1000 nano-EUR at 0.50 EUR/GB night download = 2000 bytes; each
    # packet is 248 IP bytes: 8 packets fit (1984 bytes), the 9th is dropped
    carol = subs["carol"]
    assert carol["blocked"]["packet"] == exp.packets - 21 + 9
    assert carol["blocked"]["reason"] == "limit" and carol["blocked"]["time"].startswith("20")
    assert carol["dropped_packets"] == 12
    assert carol["usage"] == [{"zone": "external", "direction": "download", "bytes": 8 * 248, "packets": 8,
                               "charged": 992, "charged_text": carol["usage"][0]["charged_text"]}]
    assert carol["balance"] == 1000 - 992

    # the ledger holds the same, per minute, and its balances follow
    con = sqlite3.connect(db)
    for name in ("alice", "bob", "carol"):
        (sid,) = con.execute("select id from subscribers where name=?", (name,)).fetchone()
        nbytes, charged = con.execute("select sum(bytes), sum(amount) from usage where subscriber_id=?", (sid,)).fetchone()
        want_bytes = sum(v[0] for (s, _z, _d), v in exp.usage.items() if s == name) if name != "carol" else 8 * 248
        assert nbytes == want_bytes
        assert charged == subs[name]["charged"]
        (balance,) = con.execute("select balance from subscribers where id=?", (sid,)).fetchone()
        assert balance == subs[name]["balance"]
    minutes = {m for (m,) in con.execute("select distinct minute from usage")}
    assert len(minutes) >= 4  # 21:58 .. 22:02 at least
    con.close()


def test_replay_twice_is_refused_and_dry_run_writes_nothing(capture, tmp_path):
    d, pcap, _exp = capture
    db = tmp_path / "ledger.db"
    cfg = d / "tollgate.toml"
    run("replay", "-c", cfg, "--db", db, "-q", pcap)
    before = sqlite3.connect(db).execute("select sum(amount), count(*) from usage").fetchone()
    again = run("replay", "-c", cfg, "--db", db, "-q", pcap, expect=1)
    assert "already replayed" in again.stderr
    dry = json.loads(run("replay", "-c", cfg, "--db", db, "--dry-run", "--json", pcap).stdout)
    assert dry["dry_run"] is True
    after = sqlite3.connect(db).execute("select sum(amount), count(*) from usage").fetchone()
    assert before == after


def test_replay_prints_a_readable_report(capture, tmp_path):
    d, pcap, _exp = capture
    out = run("replay", "-c", d / "tollgate.toml", "--dry-run", pcap).stdout
    assert "alice (id" in out and "peering" in out and "blocked at packet" in out
    assert re.search(r"blocked at packet [\d,]+ at \S+ \(limit\)", out), out


def test_missing_capture_is_exit_2(capture, tmp_path):
    d, _pcap, _exp = capture
    proc = run("replay", "-c", d / "tollgate.toml", "--dry-run", tmp_path / "nope.pcap", expect=2)
    assert "nope.pcap" in proc.stderr


def test_unreadable_capture_is_exit_2(capture, tmp_path):
    d, _pcap, _exp = capture
    proc = run("replay", "-c", d / "tollgate.toml", "--dry-run", tmp_path, expect=2)
    assert "cannot read" in proc.stderr


def test_garbage_capture_is_a_clear_error(capture, tmp_path):
    d, _pcap, _exp = capture
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(os.urandom(4096))
    proc = run("replay", "-c", d / "tollgate.toml", "--dry-run", junk, expect=2)
    assert "capture" in proc.stderr


def test_broken_config_names_the_field(capture, tmp_path):
    _d, pcap, _exp = capture
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG.replace('peering = "0.20"', 'peering = "-0.20"'))
    proc = run("replay", "-c", bad, "--dry-run", pcap, expect=2)
    assert "tariff[0].prices.peering" in proc.stderr
