"""Operations of ``tollgate run --source ebpf`` in the lab: the heartbeat and
the fallback.

* Fallback: where the program cannot be loaded or attached (an interface
  that is not there, an object file that is not a BPF object, one that is
  missing, subscriber ids that do not fit the maps), ``tollgate run`` exits 2
  with a message that names the reason and the way out, and leaves nothing
  attached and nothing pinned (the maps it had loaded for the failed start
  are unpinned again).
* Heartbeat: the tc program taken away behind the daemon's back, once by
  deleting our filter and once by deleting the clsact qdisc with it, is an
  alarm in the log, in /metrics (``tollgate_bpf_heartbeat_alarms_total``) and
  in /healthz, and it is attached again, the pinned program on both hooks, so
  that a subscriber's traffic is metered by it again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.lab import UPSTREAM4
import lablib
from lablib import REPO, lab_config, netns
from test_ebpf_gateway import wait_for

PIN = f"/sys/fs/bpf/tollgate-test-ops-{os.getpid()}"
SUBS = (1, 2)
IFACES = tuple(f"s{i}" for i in SUBS)


def run_ebpf(lab, work: Path, *options: str, port: int = 8091) -> subprocess.CompletedProcess:
    """``tollgate run --source ebpf`` that is expected to stop at start (bounded by a timeout)."""
    cfg = work / "tollgate.toml"
    cfg.write_text(lab_config(lab.n))
    opts = [x for o in (f"pin_dir={PIN}", *options) for x in ("--source-option", o)]
    return subprocess.run(["nsenter", f"--net=/run/netns/{lab.gw}", sys.executable, "-m", "gateway.cli", "run",
                           "-c", str(cfg), "--db", str(work / "ledger.db"), "--port", str(port), "--source", "ebpf",
                           *opts], cwd=REPO, capture_output=True, text=True, timeout=60)


def nothing_left(lab) -> None:
    from policy import bpf

    assert not Path(PIN).exists(), f"{PIN} left pinned: {sorted(p.name for p in Path(PIN).iterdir())}"
    assert bpf.attached(lab.gw) == {}, "a tc filter of ours was left behind"
    for i in range(1, lab.n + 1):
        qdiscs = json.loads(netns(lab.gw, "tc", "-j", "qdisc", "show", "dev", f"s{i}", check=True).stdout or "[]")
        assert not any(q.get("kind") == "clsact" for q in qdiscs), f"clsact left on s{i}"


@pytest.fixture
def clean(lab):
    from ext.bpfmaps import Maps
    from policy import bpf

    Maps.unpin(PIN)
    yield lab
    try:
        bpf.detach(None, PIN, netns=lab.gw, unpin=False)
    finally:
        Maps.unpin(PIN)
        netns(lab.gw, "nft", "delete", "table", "inet", "tollgate")


@pytest.mark.parametrize("case", ["no-interface", "some-interface-missing", "garbage-object", "missing-object",
                                  "ids-beyond-slots"])
def test_fallback_exits_2_and_leaves_nothing(clean, tmp_path, case):
    lab = clean
    if case == "no-interface":
        proc = run_ebpf(lab, tmp_path, "interfaces=tgnosuch0")
        reason = "no interface tgnosuch0"
    elif case == "some-interface-missing":
        proc = run_ebpf(lab, tmp_path, "interfaces=s1,tgnosuch0")
        reason = "no interface tgnosuch0"
    elif case == "garbage-object":
        obj = tmp_path / "garbage.bpf.o"
        obj.write_bytes(b"\x7fELF not a BPF object at all" + bytes(200))
        proc = run_ebpf(lab, tmp_path, "interfaces=s1,s2", f"object={obj}")
        reason = "cannot open"
    elif case == "missing-object":
        proc = run_ebpf(lab, tmp_path, "interfaces=s1,s2", f"object={tmp_path / 'none.bpf.o'}")
        reason = "is not built"
    else:  # the lab's subscribers have ids 1..4: 2 slots hold ids 0 and 1 only; found after the load
        proc = run_ebpf(lab, tmp_path, "interfaces=s1,s2", "max_slots=2")
        reason = "do not fit the maps' 2 slots"
    print(f"\n  {case}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--source ebpf" in proc.stderr and reason in proc.stderr, proc.stderr[-2000:]
    if case in ("garbage-object", "missing-object"):
        assert "--source nfqueue" in proc.stderr  # the way out
    nothing_left(lab)


def heartbeat_counts(gw) -> dict:
    health = json.loads(netns(gw.ns, "curl", "-s", "-m", "2", "http://127.0.0.1:8080/healthz", check=True).stdout)
    return health["queue"]["ebpf"]


def alarms_metric(gw) -> float:
    text = gw.metrics()
    m = re.search(r"^tollgate_bpf_heartbeat_alarms_total (\S+)$", text, re.M)
    assert m, f"no tollgate_bpf_heartbeat_alarms_total in /metrics: {text[:500]!r}"
    return float(m.group(1))


def pinged(lab, i: int) -> bool:
    return subprocess.run(["ip", "netns", "exec", lab.sub(i), "ping", "-c", "1", "-W", "1", UPSTREAM4],
                          capture_output=True).returncode == 0


class OpsGateway(lablib.EbpfGateway):
    """lablib's eBPF gateway with this module's pins and a heartbeat every 0.5 s."""

    pin, subs = PIN, SUBS

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.extra = ["--source-option", "heartbeat=0.5", *self.extra]


def test_heartbeat_alarms_and_attaches_again(clean, tmp_path):
    from ext.bpfmaps import Maps
    from policy import bpf

    lab = clean
    gw = OpsGateway(lab.gw, tmp_path, lab_config(lab.n))
    try:
        gw.start()
        assert bpf.present(IFACES, PIN, netns=lab.gw)
        assert heartbeat_counts(gw)["heartbeat_alarms"] == 0 and alarms_metric(gw) == 0
        with Maps.open(PIN) as maps:
            before = maps.counter(1, 1, 0).packets  # s1's uploads to the external zone
        assert pinged(lab, 1)
        takes = [("filter", ["filter", "del", "dev", "s1", "ingress", "pref", str(bpf.PREF), "handle", bpf.HANDLE,
                             "bpf"]),
                 ("clsact", ["qdisc", "del", "dev", "s2", "clsact"])]
        for n, (what, cmd) in enumerate(takes, 1):
            netns(lab.gw, "tc", *cmd, check=True)
            took = wait_for(f"alarm {n} ({what} deleted)", lambda: heartbeat_counts(gw)["heartbeat_alarms"] >= n,
                            timeout=10, step=0.1)
            wait_for(f"attached again after the {what} went", lambda: bpf.present(IFACES, PIN, netns=lab.gw),
                     timeout=10, step=0.1)
            counts = heartbeat_counts(gw)
            print(f"\n  {what} deleted: alarm after {took:.2f} s; /healthz {({k: counts[k] for k in ('heartbeat_alarms', 'reattached', 'attached', 'last_alarm_time')})}")
            assert counts["reattached"] >= n and counts["last_alarm_time"] > 0
            assert alarms_metric(gw) == counts["heartbeat_alarms"]
        wait_for("healthz says attached", lambda: heartbeat_counts(gw)["attached"] is True, timeout=10, step=0.1)
        log = (gw.dir / "gateway.log").read_text()
        assert log.count("heartbeat: the tc program is not attached") >= 2
        # the pinned program meters s1 again: its uploads are counted by it
        assert pinged(lab, 1)
        with Maps.open(PIN) as maps:
            assert maps.counter(1, 1, 0).packets > before
    finally:
        gw.stop(signal.SIGTERM)


def test_a_start_grants_the_rest_from_the_loop(clean, tmp_path):
    """``start_grants=1``: one subscriber is granted before the attach, the other by the source's loop
    (at a million subscribers the grants were 40 s of a 90 s start). /healthz counts the rest down to 0, the
    log says when everyone is granted, and both subscribers have grants and pass traffic."""
    from ext.bpfmaps import Maps

    lab = clean
    gw = OpsGateway(lab.gw, tmp_path, lab_config(lab.n), ("--source-option", "start_grants=1"))
    try:
        gw.start()
        wait_for("every subscriber granted", lambda: heartbeat_counts(gw)["start_grants_left"] == 0,
                 timeout=10, step=0.1)
        assert "every subscriber granted" in (gw.dir / "gateway.log").read_text()
        with Maps.open(PIN) as maps:
            for sid in SUBS:
                assert maps.counter(sid, 1, 0).grant > 0 and maps.counter(sid, 1, 1).grant > 0, sid
        assert pinged(lab, 1) and pinged(lab, 2)
    finally:
        gw.stop(signal.SIGTERM)
