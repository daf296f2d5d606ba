"""``make demo-cluster``: two gateways sharing one PostgreSQL ledger (issue 13).

Starts a throwaway PostgreSQL cluster, builds a small cluster lab (gateways g1
and g2 on one upstream, one subscriber of its own behind each, and the shared
subscriber x, whose addresses are routed by source through g1 and through g2),
runs ``tollgate run`` on both gateways with one database (``[cluster]``
configs from ``gateway.lab.cluster_config``: credit grants), then shows x with
a small balance downloading through g1 until it runs out, blocked on both
gateways, topped up through g1's command line, and its traffic flowing through
g2 right after, with the bytes each gateway rated and the ledger's balance.
Everything it made (processes, namespaces, the PostgreSQL directory) is
removed at the end, whatever happens, Ctrl-C included. Needs root. Every
transfer has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "tgdc"
EUR = 10 ** 9
BALANCE = "0.05"  # x's: 5 MB of downloads at 0.01 EUR per MB (uploads free)
# A gateway's slice: g1, started first, takes all of x's money as its grant, g2 gets nothing. Larger
# than the balance so that after the top-up each gateway holds far more than a download spends: a
# refill waits for the next flush (1 s), and the first burst of a TCP download (its receive window:
# megabytes on a veth) spent a slice of 0.05 EUR in 0.2 s and was blocked with money in the ledger.
GRANT = "0.50"
RATE = "2M"  # x's downloads, as on a 16 Mbit/s line


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def pg_cluster_class():
    """The throwaway PostgreSQL cluster helper (accounting/store/pgcluster.py)."""
    from accounting.store.pgcluster import PgCluster

    return PgCluster


class Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.cluster = None  # gateway.lab.Cluster
        self.pg = None
        self.db = ""  # the ledger's conninfo
        self.gateways: dict[int, subprocess.Popen] = {}

    # ---- commands in the lab ---------------------------------------------------------------------

    def ns(self, name: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", name, *cmd], capture_output=True, text=True,
                              timeout=timeout)

    def fetch(self, k: int, path: str, timeout: float) -> tuple[int, str]:
        """One download by x from its address routed through gateway ``k``: (bytes, http code)."""
        link = self.cluster.shared.via(k)
        from .lab import UPSTREAM4

        out = self.ns(self.cluster.shared.ns, "curl", "-s", "-m", str(timeout), "--limit-rate", RATE,
                      "--interface", link.addr4,
                      "-o", "/dev/null", "-w", "%{size_download} %{http_code}", f"http://{UPSTREAM4}{path}",
                      timeout=timeout + 10).stdout
        size, _, code = (out or "0 000").partition(" ")
        return int(size or 0), code

    def page(self, k: int, path: str) -> str:
        """The text of what x gets for ``path`` through gateway ``k``."""
        from .lab import UPSTREAM4

        html = self.ns(self.cluster.shared.ns, "curl", "-s", "-m", "3", "--interface",
                       self.cluster.shared.via(k).addr4, f"http://{UPSTREAM4}{path}", timeout=15).stdout
        return " ".join(re.sub(r"<[^>]+>", " ", html.split("<body>")[-1]).split())

    def health(self, k: int) -> dict:
        out = self.ns(self.cluster.gw(k), "curl", "-s", "-m", "2", "http://127.0.0.1:8080/healthz").stdout
        try:
            return json.loads(out)
        except ValueError:
            return {}

    def rated(self, k: int, name: str) -> int:
        """Bytes gateway ``k`` rated (and charged) for ``name`` since it started, from its /metrics."""
        text = self.ns(self.cluster.gw(k), "curl", "-s", "-m", "2", "http://127.0.0.1:8080/metrics").stdout
        m = re.search(rf'^tollgate_subscriber_bytes(?:_total)?\{{subscriber="{name}"\}} (\S+)$', text, re.M)
        return int(float(m.group(1))) if m else 0

    def ledger(self, name: str) -> dict:
        """x in the shared ledger: balance, what the gateways hold as grants, bytes charged."""
        import psycopg

        with psycopg.connect(self.db, autocommit=True) as conn:
            sid, balance, reserved = conn.execute(
                "SELECT id, balance, reserved FROM subscribers WHERE name = %s", (name,)).fetchone()
            grants = dict(conn.execute("SELECT gateway, amount FROM grants WHERE subscriber_id = %s"
                                       " ORDER BY gateway", (sid,)).fetchall())
            charged = conn.execute("SELECT coalesce(sum(bytes), 0) FROM usage WHERE subscriber_id = %s",
                                   (sid,)).fetchone()[0]
        return {"balance": balance, "reserved": reserved, "grants": grants, "bytes": int(charged)}

    def show(self, name: str = "x") -> None:
        led = self.ledger(name)
        per = {k: self.rated(k, name) for k in sorted(self.gateways)}
        print("    " + ", ".join(f"g{k} rated {b:,} B of {name}" for k, b in per.items())
              + f" (together {sum(per.values()):,} B); the ledger charged {led['bytes']:,} B")
        grants = ", ".join(f"{g} {a / EUR:.4f}" for g, a in led["grants"].items()) or "none"
        print(f"    ledger: {name}'s balance {led['balance'] / EUR:.4f} EUR, held by the gateways as grants: {grants}")

    # ---- the gateways --------------------------------------------------------------------------------

    def start_gateway(self, k: int) -> None:
        from .lab import cluster_config

        config = self.work / f"g{k}.toml"
        config.write_text(cluster_config(self.cluster, k, {"x": BALANCE}, upload_free=True, grant=GRANT,
                                         grant_validity=30))
        log = open(self.work / f"g{k}.log", "w")
        # a session of its own: a Ctrl-C reaches us, and we stop the gateway cleanly (its grants go back)
        self.gateways[k] = proc = subprocess.Popen(
            ["ip", "netns", "exec", self.cluster.gw(k), sys.executable, "-m", "gateway.cli", "-v", "run", "-c",
             str(config), "--db", self.db], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"g{k} exited: {(self.work / f'g{k}.log').read_text()[-1500:]}")
            if self.health(k).get("status") == "ok":
                return
            time.sleep(0.2)
        raise RuntimeError(f"g{k} did not come up in 30 s: {(self.work / f'g{k}.log').read_text()[-1500:]}")

    def topup(self, k: int, name: str, amount: str) -> str:
        """A payment through gateway ``k``'s command line (run in its namespace, with its config)."""
        proc = subprocess.run(["ip", "netns", "exec", self.cluster.gw(k), sys.executable, "-m", "gateway.cli",
                               "topup", name, amount, "-c", str(self.work / f"g{k}.toml"), "--db", self.db],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        return (proc.stdout or proc.stderr).strip()

    # ---- the story -------------------------------------------------------------------------------------

    def run(self) -> None:
        from .lab import BIG_FILE, cluster_down, cluster_up

        say("starting a throwaway PostgreSQL 15 cluster (initdb as postgres, a Unix socket in a temp dir)")
        self.pg = pg_cluster_class()().start()
        self.db = self.pg.create_database("tollgate_demo")
        print(f"    ledger: {self.db}")

        say("building the cluster lab: gateways g1 and g2 on one upstream, one subscriber behind each, "
            "and x, routed by source through g1 and g2")
        cluster_down(PREFIX)
        self.cluster = cluster_up(2, 1, PREFIX)

        say(f"starting `tollgate run` on g1, then g2, on that one ledger ([cluster] gateway = \"g1\" / \"g2\"); "
            f"tariff 0.01 EUR per MB downloaded; x has {BALANCE} EUR, which buys 5,000,000 bytes; "
            f"a first grant is up to {GRANT} EUR")
        for k in (1, 2):
            self.start_gateway(k)
            credit = self.health(k).get("credit") or {}
            print(f"    g{k} up: credit grants as gateway {credit.get('gateway')!r}, "
                  f"on_failure = {credit.get('on_failure')}")
        self.show()

        say(f"x downloads the {BIG_FILE:,}-byte file through g1 at {RATE}B/s (10 s at most): more than its "
            "balance buys")
        size, code = self.fetch(1, "/big.bin", timeout=10)
        print(f"    x received {size:,} bytes through g1, then g1 blocked it: the grant was the final unit")
        time.sleep(1.5)  # the last flush
        self.show()

        say("x is blocked on both gateways: g1 spent the last of x's money, g2 holds no grant for x")
        for k in (1, 2):
            size, code = self.fetch(k, "/big.bin", timeout=3)
            if code == "000":
                print(f"    through g{k}: the connection is reset as g{k} blocks x (it found no grant for x)")
                size, code = self.fetch(k, "/big.bin", timeout=3)
            what = "the block page, not the file" if size < BIG_FILE // 100 else "part of the file!"
            print(f"    x asks for /big.bin through g{k}: HTTP {code}, {size:,} bytes ({what})")
        print("    g2's block page: " + self.page(2, "/")[:300])

        say("the operator tops x up by 1.00 EUR with g1's command line")
        print("    " + self.topup(1, "x", "1.00"))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5 and self.fetch(2, "/index.html", timeout=1)[1] != "200":
            time.sleep(0.05)
        print(f"    x's traffic flows through g2 {time.monotonic() - t0:.2f} s after the payment on g1")
        size, code = self.fetch(2, "/big.bin", timeout=10)
        print(f"    x downloads the file through g2 at {RATE}B/s: HTTP {code}, {size:,} bytes")
        time.sleep(1.5)
        self.show()

    def close(self) -> None:
        from .lab import cluster_down

        say("cleaning up: stopping the gateways (their grants go back), removing the lab and PostgreSQL")
        for k, proc in sorted(self.gateways.items(), reverse=True):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.gateways and self.pg is not None and self.pg.running:
            try:
                led = self.ledger("x")
                print(f"    after the stops: x's balance {led['balance'] / EUR:.4f} EUR, "
                      f"outstanding grants {led['reserved'] / EUR:.4f} EUR")
            except Exception as exc:  # the ledger is going away anyway: say so, go on cleaning
                print(f"    (could not read the ledger: {exc})")
        try:
            cluster_down(PREFIX)
        finally:
            if self.pg is not None:
                try:
                    self.pg.close()
                except Exception as exc:  # e.g. the server stopped already: its directory is removed anyway
                    print(f"    PostgreSQL: {exc}")
        print(f"    the gateways' configs and logs stay in {self.work}")


def main() -> int:
    if os.geteuid() != 0:
        print("make demo-cluster needs root: it builds network namespaces", file=sys.stderr)
        return 2
    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C cleans up, even if started with it ignored
    signal.signal(signal.SIGTERM, interrupted)  # a kill runs the cleanup as Ctrl-C does
    demo = Demo(Path(tempfile.mkdtemp(prefix="tollgate-demo-cluster-")))
    try:
        demo.run()
        return 0
    except KeyboardInterrupt:
        print("\n    interrupted", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        demo.close()


if __name__ == "__main__":
    sys.exit(main())
