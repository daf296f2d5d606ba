"""The block page under ``tollgate run --source ebpf``: a blocked subscriber's browser is sent to the
gateway's block page, as on the nfqueue path (tests/linux/test_gateway.py), and nothing else of it gets out.

The tc program runs at ingress, before netfilter: it used to drop a blocked subscriber's tcp/80 before
nft's portal chain could redirect it to the block-page server, so the browser timed out. Now it passes that
traffic, uncounted, only while the subscriber's redirected flag is set (nft's blocked set holds its
networks: "Redirected" in ext/bpf/tollgate.bpf.c). Truth from outside the gateway, as in
tests/linux/test_ebpf_gateway.py: nft counters in the upstream namespace (what arrived from the gateway's
upstream address: only s1 sends anything there in this module) and in s1's namespace (what arrived from
the upstream), forwarded packets only (TTL 63: the gateway's own, neighbour discovery, are not s1's).

* money out: the block page over HTTP (IPv4 and IPv6, bounded by curl -m), another port and ICMP still
  refused, not one byte through the gateway while blocked, the ledger equal to the far ends to the byte,
  the balance never below 0; a top-up flows again within 1 s;
* a manual block, twice: the block page, the rest refused, nothing through the gateway and nothing charged
  while blocked (the far ends and the program's counters still); after the unblock the real page again;
* the order of the block step (no lab): the pusher sets the program's blocked flag before the nft block
  and the redirected flag after it, clears the redirected flag before the nft unblock and the blocked flag
  after it, also for a block and an unblock in one batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import time

import pytest

from gateway.lab import GATEWAY_UP4, GATEWAY_UP6, UPSTREAM4, UPSTREAM6
import lablib
from lablib import lab_config, netns

PIN = f"/sys/fs/bpf/tollgate-test-blockpage-{os.getpid()}"
C_BLOCKED, C_REDIRECTED = 1, 2  # ext.bpfmaps
SUBS = (1, 2, 3, 4)
S1 = 1


class EbpfGateway(lablib.EbpfGateway):
    pin, subs = PIN, SUBS


def far_end_tables(lab) -> None:
    subprocess.run(["ip", "netns", "exec", lab.sub(S1), "nft", "-f", "-"], check=True, text=True, input=(
        "table inet tgblock {\n  chain in { type filter hook input priority 0; policy accept;\n"
        f"    ip saddr {UPSTREAM4} ip ttl 63 counter\n    ip6 saddr {UPSTREAM6} ip6 hoplimit 63 counter\n"
        "  }\n}\n"))
    subprocess.run(["ip", "netns", "exec", lab.up, "nft", "-f", "-"], check=True, text=True, input=(
        "table inet tgblock {\n  chain in { type filter hook input priority 0; policy accept;\n"
        f"    ip saddr {GATEWAY_UP4} ip ttl 63 counter\n    ip6 saddr {GATEWAY_UP6} ip6 hoplimit 63 counter\n"
        "  }\n}\n"))


def finish(procs, timeout: float = 30) -> None:
    """Waits for bounded traffic (``procs``) to end; one that overruns ``timeout`` is killed."""
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def far_end(lab) -> int:
    """Bytes of s1's traffic that crossed the gateway: arrived upstream, and arrived from it."""
    return sum(far_end_parts(lab))


def far_end_parts(lab) -> list[int]:
    """[arrived upstream, arrived in s1's namespace] (bytes)."""
    out = []
    for ns in (lab.up, lab.sub(S1)):
        doc = json.loads(netns(ns, "nft", "-j", "list", "table", "inet", "tgblock", check=True).stdout)["nftables"]
        out.append(sum(x["counter"]["bytes"] for i in doc if "rule" in i for x in i["rule"]["expr"] if "counter" in x))
    return out


def ledger(db) -> tuple[int, int]:
    """(bytes charged to s1 in the external zone, its balance)."""
    con = sqlite3.connect(db)
    try:
        charged = con.execute("SELECT coalesce(sum(bytes), 0) FROM usage WHERE subscriber_id = 1 AND zone = 1"
                              ).fetchone()[0]
        return charged, con.execute("SELECT balance FROM subscribers WHERE name = 's1'").fetchone()[0]
    finally:
        con.close()


def slot_flags() -> int:
    """s1's flags in the maps (C_BLOCKED, C_REDIRECTED), read through the pins."""
    from ext.bpfmaps import Maps

    with Maps.open(PIN) as maps:
        return maps.counter(S1, 0, 0).flags


def slot_used() -> int:
    """What the program has passed against s1's grants, every zone and direction (live, no flush)."""
    from ext.bpfmaps import Maps

    with Maps.open(PIN) as maps:
        return sum(maps.counter(S1, z, d).used for z in range(maps.n_zones) for d in (0, 1))


def blocked_in_kernel(lab) -> bool:
    return lab.sub_addr4(S1) in netns(lab.gw, "nft", "-j", "list", "set", "inet", "tollgate", "blocked4",
                                      check=True).stdout


def wait_for(what, cond, timeout: float = 15.0, step: float = 0.05) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(step)
    return time.monotonic() - t0


def curl(lab, url: str, seconds: float = 4) -> subprocess.CompletedProcess:
    return netns(lab.sub(S1), "curl", "-s", "-g", "-m", str(seconds), url, timeout=seconds + 5)


def assert_block_page(lab) -> None:
    for url in (f"http://{UPSTREAM4}/anything", f"http://[{UPSTREAM6}]/anything"):
        page = curl(lab, url)
        assert "Internet access paused" in page.stdout, f"{url}: no block page (curl exit {page.returncode})"


def assert_refused(lab) -> None:
    """Everything but the block page: another port (TCP, IPv4 and IPv6) and ICMP."""
    for url in (f"http://{UPSTREAM4}:5201/", f"http://[{UPSTREAM6}]:5201/"):
        assert curl(lab, url, seconds=2).returncode != 0, f"{url} answered a blocked subscriber"
    assert netns(lab.sub(S1), "ping", "-c", "1", "-W", "1", UPSTREAM4).returncode != 0
    assert netns(lab.sub(S1), "ping", "-6", "-c", "1", "-W", "1", UPSTREAM6).returncode != 0


@contextlib.contextmanager
def far_end_gateway(lab, gateway_class, workdir, config: str, extra=()):
    """``gateway_class`` (an ``lablib.EbpfGateway``, its pins fresh) started with ``config`` behind the far
    ends' counters (``far_end_tables``), and ``TG_TEST_EBPF_OPTIONS`` from the environment (e.g.
    ``--source-option object=OLD.bpf.o``); on exit the gateway removed and the counters' tables deleted."""
    from ext.bpfmaps import BpfError, Maps

    far_end_tables(lab)
    try:
        Maps.unpin(gateway_class.pin)
    except BpfError:
        pass
    gw = gateway_class(lab.gw, workdir, config, (*extra, *os.environ.get("TG_TEST_EBPF_OPTIONS", "").split()))
    try:
        gw.start()
        yield gw
    finally:
        try:
            gw.remove(lab)
        finally:
            for ns in (lab.up, lab.sub(S1)):
                netns(ns, "nft", "delete", "table", "inet", "tgblock")


@pytest.fixture(scope="module")
def blockpage_lab(lab, tmp_path_factory):
    # s1: 0.02 EUR at 0.01 EUR/MB both ways: 2,000,000 bytes
    with far_end_gateway(lab, EbpfGateway, tmp_path_factory.mktemp("blockpage"), lab_config(lab.n, {S1: "0.02"})) as gw:
        yield lab, gw


def test_money_out_block_page_and_top_up(blockpage_lab):
    lab, gw = blockpage_lab
    got = netns(lab.sub(S1), "curl", "-s", "-m", "10", "-o", "/dev/null", "-w", "%{size_download}",
                f"http://{UPSTREAM4}/big.bin", timeout=20)
    assert 0 < int(got.stdout or 0) <= 2_000_000
    wait_for("s1 blocked", lambda: blocked_in_kernel(lab))
    wait_for("s1 redirected in the maps", lambda: slot_flags() & C_REDIRECTED)
    before = far_end(lab)
    assert_block_page(lab)
    assert_refused(lab)
    assert far_end(lab) == before, "bytes crossed the gateway for a blocked subscriber"
    time.sleep(2.5)  # flushed
    charged, balance = ledger(gw.db)
    print(f"\n  s1: {charged:,} B charged, far ends {far_end(lab):,} B, balance {balance}")
    assert charged == far_end(lab), "the ledger and the far ends disagree"
    assert balance >= 0, "s1 got more than its balance bought"
    # a top-up: flows again within a second
    assert gw.tollgate("topup", "s1", "1.00").returncode == 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3:
        # -m 0.3: a SYN the program dropped in the instant before its grants came back is not waited for (TCP
        # sends it again after 1 s); the next curl goes
        if netns(lab.sub(S1), "curl", "-s", "-m", "0.3", "-o", "/dev/null", "-w", "%{http_code}",
                 f"http://{UPSTREAM4}/index.html").stdout == "200":
            break
        time.sleep(0.05)
    waited = time.monotonic() - t0
    print(f"  a top-up flowed again after {waited:.2f} s")
    assert waited < 1.0, f"unblocked only after {waited:.2f} s"


def test_manual_block_block_page_and_unblock(blockpage_lab):
    lab, gw = blockpage_lab
    assert gw.tollgate("topup", "s1", "5.00").returncode == 0  # money enough: only the manual block blocks
    wait_for("s1 unblocked", lambda: not blocked_in_kernel(lab))
    for _ in range(2):  # twice: a block after an unblock starts from the flags the unblock left
        proc = gw.tollgate("block", "s1", "--reason", "test: block page")
        assert proc.returncode == 0, proc.stderr
        wait_for("s1 blocked", lambda: blocked_in_kernel(lab))
        # and in the maps, in the pusher's same step (blocked before nft's block, redirected after it; the
        # ledger against the far ends across a manual block: tests/linux/test_ebpf_block_step.py)
        wait_for("s1 blocked and redirected in the maps", lambda: slot_flags() & (C_BLOCKED | C_REDIRECTED)
                 == C_BLOCKED | C_REDIRECTED)
        before, used = far_end(lab), slot_used()
        assert_block_page(lab)
        assert_refused(lab)
        assert far_end(lab) == before, "bytes crossed the gateway for a blocked subscriber"
        proc = gw.tollgate("unblock", "s1", "--reason", "test over")
        assert proc.returncode == 0, proc.stderr
        wait_for("s1 unblocked", lambda: not blocked_in_kernel(lab))
        assert not slot_flags() & C_REDIRECTED, "redirected after nft's unblock"
        assert far_end(lab) == before and slot_used() == used, "s1 got or paid for something while blocked"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3:
            if netns(lab.sub(S1), "curl", "-s", "-m", "0.3", "-o", "/dev/null", "-w", "%{http_code}",
                     f"http://{UPSTREAM4}/index.html").stdout == "200":
                break
            time.sleep(0.05)
        assert time.monotonic() - t0 < 3, "s1 does not flow again after the unblock"
        page = curl(lab, f"http://{UPSTREAM4}/index.html")
        assert page.returncode == 0 and "Internet access paused" not in page.stdout
    program = json.loads(netns(lab.gw, "curl", "-s", "-m", "2", "http://127.0.0.1:8080/healthz").stdout)["queue"]["ebpf"]
    print(f"\n  the program passed {program['program_redirected']} packets to the block page, uncounted")
    assert program["program_redirected"] > 0
    assert ledger(gw.db)[1] >= 0


# ---- the order of operations, without a lab: the pusher against a recording enforcer and source ----------------

class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []


def _pusher(blocked_now: set):
    """A PolicyPusher on a stand-in gateway whose enforcer and eBPF source write one shared log."""
    import threading
    from types import SimpleNamespace

    from gateway.daemon.pusher import PolicyPusher

    log = _Recorder()

    class Enforcer:
        def block(self, nets):
            log.calls.append(("nft block", tuple(nets)))

        def unblock(self, nets):
            log.calls.append(("nft unblock", tuple(nets)))

    class Source:  # the eBPF source's block step, recorded as what it does to the program's flags
        def before_nft_block(self, sids):
            log.calls.append(("program blocked", tuple(sids)))

        def after_nft_block(self, sids):
            log.calls.append(("redirected", tuple(sids), True))

        def before_nft_unblock(self, sids):
            log.calls.append(("redirected", tuple(sids), False))

        def after_nft_unblock(self, sids):
            log.calls.append(("program unblocked", tuple(sids)))

    nets = {1: ["100.64.1.2/32"], 2: ["100.64.2.2/32"]}
    engine = SimpleNamespace(subscriber=lambda sid: SimpleNamespace(blocked=sid in blocked_now))
    gw = SimpleNamespace(credit=None, networks=lambda sid: nets[sid], enforcer=Enforcer(), readers=[Source()],
                         enforcer_lock=threading.Lock(), acct=SimpleNamespace(engine=engine),
                         metrics=SimpleNamespace(nft_latency=SimpleNamespace(observe=lambda s: None)))
    pusher = PolicyPusher(gw)
    pusher.record = lambda events, done: None
    pusher._reset_connections = lambda networks: None
    return pusher, log


def test_order_of_the_block_step():
    """The program's blocked flag is set before the nft block and cleared after the nft unblock (it meters
    before nft's forward hook: what it passes of a subscriber nft refuses is charged, never delivered); the
    redirected flag may be set only while nft's blocked set holds the networks: after the block is committed,
    cleared before the unblock (a wrong order is a window in which the program passes tcp/80 that nft
    forwards). Also for a block and an unblock in one batch."""
    import ext
    from ext.constants import BLOCK_LIMIT, BLOCK_MANUAL, EV_BLOCK, EV_UNBLOCK

    pusher, log = _pusher(blocked_now={1})
    pusher.push([(ext.Event(EV_BLOCK, 1, -1, BLOCK_LIMIT, 0), None), (ext.Event(EV_UNBLOCK, 2, 5, BLOCK_MANUAL, 0), None)])
    assert log.calls == [("program blocked", (1,)), ("nft block", ("100.64.1.2/32",)), ("redirected", (1,), True),
                         ("redirected", (2,), False), ("nft unblock", ("100.64.2.2/32",)), ("program unblocked", (2,))]
    pusher, log = _pusher(blocked_now=set())  # blocked and unblocked in one batch: nft ends unblocked, flags clear
    pusher.push([(ext.Event(EV_BLOCK, 1, -1, BLOCK_LIMIT, 0), None), (ext.Event(EV_UNBLOCK, 1, 5, BLOCK_LIMIT, 0), None)])
    assert log.calls == [("program blocked", (1,)), ("nft block", ("100.64.1.2/32",)), ("redirected", (1,), True),
                         ("redirected", (1,), False), ("nft unblock", ("100.64.1.2/32",)), ("program unblocked", (1,))]
