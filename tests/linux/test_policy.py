"""Our nftables table and the queue rule, installed and removed in the lab's
gateway namespace; and a config reload of the running gateway."""

from __future__ import annotations

import signal
import sys
import time

from lablib import REPO, Gateway, lab_config, netns

RUN = [sys.executable, "-c"]
PRELUDE = f"import sys; sys.path.insert(0, {str(REPO)!r}); from policy.nft import Enforcer; "


def enforcer(lab, code: str):
    return netns(lab.gw, *RUN, PRELUDE + code, check=True).stdout


def queue_rules(lab) -> str:
    return netns(lab.gw, "iptables-nft", "-S", "FORWARD").stdout + netns(lab.gw, "ip6tables-nft", "-S", "FORWARD").stdout


def test_install_twice_then_remove_leaves_nothing(lab):
    native = enforcer(lab, "print(Enforcer().has_native_queue())").strip() == "True"
    make = "e = Enforcer(queues=(0, 1), local_networks=['100.64.0.0/10', '2001:db8:100::/48']); "
    enforcer(lab, make + "e.install(); e.install(); e.restore(['100.64.1.2/32'], ['100.64.1.2/32', '100.64.2.2/32'])")
    table = netns(lab.gw, "nft", "list", "table", "inet", "tollgate").stdout
    if native:
        assert table.count("queue") == 4 and queue_rules(lab).count("NFQUEUE") == 0
    else:  # this kernel: the xtables fallback, once per direction and family, balanced over 2 queues
        rules = queue_rules(lab)
        assert rules.count("NFQUEUE") == 4, rules
        assert rules.count("--queue-balance 0:1") == 4 and rules.count("--queue-bypass") == 4
        assert "queue" not in table.replace("queue-", "")
    assert table.count("100.64.1.2") == 3  # blocked4, up4, down4
    enforcer(lab, "e = Enforcer(); e.remove(); e.remove()")  # whatever queues it was installed with
    assert netns(lab.gw, "nft", "list", "table", "inet", "tollgate").returncode != 0
    assert "NFQUEUE" not in queue_rules(lab)
    assert "table inet lab" in netns(lab.gw, "nft", "list", "ruleset").stdout  # not ours: untouched


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
        netns(lab.gw, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")
