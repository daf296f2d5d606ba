"""Helpers for the root tests: commands in namespaces, a lab config, and
``tollgate run`` as a separate process in the lab's gateway namespace."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from gateway.lab import lab_config  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[2]
TOLLGATE = [sys.executable, "-m", "gateway.cli"]


def netns(ns: str, *cmd: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{ns}: {' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc


class Gateway:
    """``tollgate run`` in the lab's gateway namespace."""

    def __init__(self, ns: str, workdir: Path, config: str, extra=()) -> None:
        self.ns = ns
        self.dir = workdir
        self.config = workdir / "tollgate.toml"
        self.config.write_text(config)
        self.db = workdir / "ledger.db"
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Gateway":
        log = open(self.dir / "gateway.log", "a")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *TOLLGATE, "-v", "run", "-c", str(self.config),
                                      "--db", str(self.db), *self.extra], cwd=REPO, stdout=log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited: {(self.dir / 'gateway.log').read_text()[-2000:]}")
            if netns(self.ns, "curl", "-s", "-m", "1", "http://127.0.0.1:8080/healthz").returncode == 0:
                return self
            time.sleep(0.2)
        raise AssertionError(f"gateway did not come up: {(self.dir / 'gateway.log').read_text()[-2000:]}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tollgate(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*TOLLGATE, *args, "-c", str(self.config), "--db", str(self.db)], cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    def metrics(self) -> str:
        return netns(self.ns, "curl", "-s", "-m", "2", "http://127.0.0.1:8080/metrics").stdout

    def kernel_counters(self) -> dict:
        code = ("import json; from policy.nft import Enforcer; "
                "print(json.dumps(Enforcer().counters()))")
        import json

        out = netns(self.ns, sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); {code}",
                    check=True).stdout
        return json.loads(out)


def ledger_bytes(db) -> dict[str, int]:
    """Bytes charged per subscriber name, from the ledger file."""
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT s.name, coalesce(sum(u.bytes), 0) FROM subscribers s "
                                "LEFT JOIN usage u ON u.subscriber_id = s.id GROUP BY s.id"))
    finally:
        con.close()


def kernel_bytes(counters: dict, lab, i: int) -> int:
    """Bytes our nft table counted for lab subscriber ``i`` (both directions, IPv4 and IPv6)."""
    return sum(counters[n]["up_bytes"] + counters[n]["down_bytes"]
               for n in (f"{lab.sub_addr4(i)}/32", f"2001:db8:100:{i:x}::/64"))


# ---- the cluster lab (gateway.lab.cluster_up): several gateways on one ledger ----------------------

def cluster_kernel_bytes(counters: dict, sub) -> int:
    """Bytes one gateway's nft table counted for cluster subscriber ``sub`` (a
    ``gateway.lab.ClusterSubscriber``): both directions, all its networks, IPv4 and IPv6. A gateway
    that lists a network it never sees has a zero counter for it."""
    return sum(counters[n]["up_bytes"] + counters[n]["down_bytes"] for n in sub.networks if n in counters)


def charged_bytes_of(target: str) -> dict[str, int]:
    """Bytes charged per subscriber name in a ledger (a file or a PostgreSQL conninfo), through the
    ledger's own interface; subscribers without usage are absent."""
    from accounting.ledger import Ledger

    with Ledger.open(target) as led:
        names = {s["id"]: s["name"] for s in led.subscribers()}
        return {names[u["subscriber_id"]]: u["bytes"] for u in led.usage(group_by="subscriber_id")}


class EbpfGateway(Gateway):
    """``tollgate run --source ebpf``, entered with nsenter --net, not ip netns exec: the latter mounts a
    sysfs of its own, and with it a bpffs that dies with the process (the pins must outlive it). A test
    module names its pin directory and its subscribers' interfaces (``pin``, ``subs``: s1, s2, ...)."""

    pin = ""
    subs: tuple = ()

    def start(self) -> "EbpfGateway":
        log = open(self.dir / "gateway.log", "a")
        self.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns}", sys.executable, "-m", "gateway.cli",
                                      "-v", "run", "-c", str(self.config), "--db", str(self.db), "--source", "ebpf",
                                      "--source-option", f"pin_dir={self.pin}", "--source-option",
                                      f"interfaces={','.join(f's{i}' for i in self.subs)}", *self.extra],
                                     cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited: {(self.dir / 'gateway.log').read_text()[-3000:]}")
            if netns(self.ns, "curl", "-s", "-m", "1", "http://127.0.0.1:8080/healthz").returncode == 0:
                return self
            time.sleep(0.2)
        raise AssertionError(f"gateway did not come up: {(self.dir / 'gateway.log').read_text()[-3000:]}")

    def remove(self, lab) -> None:
        """Killed, its program detached and unpinned and our nft table deleted (what stays of a gateway
        after a SIGKILL, on purpose: no fail-open window); fails if a tc filter of ours stayed."""
        from ext.bpfmaps import Maps
        from policy import bpf

        self.stop(signal.SIGKILL)
        try:
            bpf.detach([f"s{i}" for i in self.subs], self.pin, netns=lab.gw, unpin=False)
        finally:
            Maps.unpin(self.pin)
            netns(lab.gw, "nft", "delete", "table", "inet", "tollgate")
        assert not bpf.attached(lab.gw), "a tc filter of ours was left behind"
