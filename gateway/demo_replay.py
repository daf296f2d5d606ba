"""The replay demo: an afternoon-into-night of made-up traffic, rated offline.

Writes a capture with scapy for the subscribers of ``examples/tollgate.toml``
(alice, bob and a third one, dave, with a small balance), replays it into a
fresh ledger, then asks what the same traffic would have cost under another
tariff with ``--dry-run``. Every step says what it does.
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START = 1793655000  # 2026-11-02 21:30:00 UTC: the night price starts at 23:00 local (UTC)


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def make_capture(path: Path, packets: int = 30000) -> None:
    from scapy.all import IP, TCP, UDP, Ether, IPv6, Raw
    from scapy.utils import PcapWriter

    rng = random.Random(2026)
    hosts = {"alice": ["100.64.1.2", "2001:db8:100:1::10"], "bob": ["100.64.2.1", "100.64.2.5"],
             "dave": ["100.64.3.2"]}
    remotes = ["198.18.7.7", "198.19.0.9", "203.0.113.80", "2001:db8:198::53", "2001:db8:feed::1"]
    t = START
    with PcapWriter(str(path), sync=False) as out:
        for _ in range(packets):
            t += rng.expovariate(1 / 0.3)  # ~ 90 minutes across the night boundary
            sub = rng.choices(list(hosts), weights=[5, 4, 1])[0]
            local = rng.choice(hosts[sub])
            remote = rng.choice([r for r in remotes if (":" in r) == (":" in local)])
            ip = IPv6 if ":" in local else IP
            size = rng.choice([40, 52, 576, 1200, 1400])
            if rng.random() < 0.7:  # mostly downloads
                pkt = ip(src=remote, dst=local) / TCP(sport=443, dport=50000) / Raw(bytes(size))
            else:
                pkt = ip(src=local, dst=remote) / UDP(sport=50000, dport=443) / Raw(bytes(size // 4))
            frame = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / pkt
            frame.time = t
            out.write(frame)


DEMO_SUBSCRIBER = """
[[subscriber]]
name = "dave"
tariff = "basic"
balance = "0.0002"
addresses = ["100.64.3.2/32"]
"""


def main() -> int:
    from .cli import main as tollgate

    work = Path(tempfile.mkdtemp(prefix="tollgate-demo-"))
    config = work / "tollgate.toml"
    config.write_text((REPO / "examples" / "tollgate.toml").read_text() + DEMO_SUBSCRIBER)
    capture = work / "evening.pcap"
    say(f"writing 30,000 packets of made-up traffic to {capture} (scapy)")
    make_capture(capture)
    db = work / "ledger.db"
    say(f"tollgate replay --config {config} --db {db} {capture}")
    code = tollgate(["replay", "--config", str(config), "--db", str(db), str(capture)])
    if code:
        return code
    say("the same capture again is refused: the ledger remembers it")
    tollgate(["replay", "--config", str(config), "--db", str(db), "-q", str(capture)])
    cheaper = work / "cheaper.toml"
    cheaper.write_text(config.read_text().replace('external = { upload = "1.00", download = "2.00" }',
                                                  'external = { upload = "0.50", download = "0.80" }'))
    say("what would it have cost with external traffic at 0.50/0.80 per GB? (--dry-run, nothing written)")
    code = tollgate(["replay", "--config", str(cheaper), "--db", str(db), "--dry-run", str(capture)])
    say(f"done; the files are in {work}")
    return code


if __name__ == "__main__":
    sys.exit(main())
