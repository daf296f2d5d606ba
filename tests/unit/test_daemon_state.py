"""What the gateway keeps across restarts (ledger schema 13) and how it
shows a dead thread; no root needed: no kernel is touched. On both
backends (``[sqlite]``, ``[pg]``: tests/conftest.py's ledger_target)."""

from __future__ import annotations

import time

import pytest

from accounting.ledger import Ledger
from ext.constants import BLOCK_LIMIT, BLOCK_MANUAL
from ext.errors import LedgerError
from gateway.daemon import Gateway, RunOptions
from gateway.lab import lab_config
from gateway.runtime import ledger_rows


@pytest.fixture
def ledger(ledger_target):
    led = Ledger.open(ledger_target())
    yield led
    led.close()


def test_kernel_marks_follow_inline_flushes_only(ledger):
    a = ledger.add_subscriber("a", "basic", "EUR")
    b = ledger.add_subscriber("b", "basic", "EUR")
    rows = [(a, 1, 0, 60, 1000, 2, 5), (a, 2, 0, 60, 500, 1, 0), (a, 1, 1, 60, 40, 1, 0), (b, 1, 1, 120, 7, 1, 0)]
    assert ledger.apply_flush("f1", rows, 1, kernel_marks=True)
    assert ledger.kernel_marks() == {(a, 0): (1500, 3), (a, 1): (40, 1), (b, 1): (7, 1)}
    assert not ledger.apply_flush("f1", rows, 1, kernel_marks=True)  # a replayed flush moves nothing
    ledger.apply_flush("f2", [(b, 1, 1, 120, 3, 1, 0)], 2)  # a passive source's flush: not the kernel's count
    assert ledger.kernel_marks()[(b, 1)] == (7, 1)
    ledger.adjust_kernel_marks({(a, 0): (-1500, -3)})
    ledger.set_kernel_marks({(b, 1): (2 ** 63 - 1, 0)})
    assert ledger.kernel_marks() == {(a, 0): (0, 0), (a, 1): (40, 1), (b, 1): (2 ** 63 - 1, 0)}
    with pytest.raises(LedgerError):
        ledger.adjust_kernel_marks({(a, 2): (1, 1)})


def test_block_state_says_whether_money_came_after_it(ledger):
    a = ledger.add_subscriber("a", "basic", "EUR")
    b = ledger.add_subscriber("b", "basic", "EUR")
    pid = ledger.add_payment(b, 5)
    ledger.save_block_state([(a, BLOCK_LIMIT, pid, 0), (b, BLOCK_LIMIT, pid, 0)], 10,
                            records=[(a, "block", "limit", 9, 3), (b, "block", "limit", None, None)])
    ledger.add_adjustment(a, 1, "goodwill", "test")
    states = ledger.block_states()
    assert states[a]["paid_since"] and not states[b]["paid_since"]
    assert [(r["kind"], r["reason"], r["packet_ts_ns"], r["balance"]) for r in ledger.blocks(a)] == \
        [("block", "limit", 9, 3)]
    ledger.save_block_state([(b, 0, pid, 0)], 11)
    assert ledger.block_states()[b]["blocked"] == 0


def gateway(tmp_path, target: str, balances=None) -> Gateway:
    config = tmp_path / "tollgate.toml"
    config.write_text(lab_config(2, balances))
    gw = Gateway(RunOptions(str(config), target))
    gw.acct.seed_ledger()
    gw.acct.load_subscribers(ledger_rows(gw.ledger))
    return gw


def test_a_limit_block_comes_back_until_money_comes(tmp_path, ledger_target):
    target = ledger_target()
    gw = gateway(tmp_path, target)
    s1 = gw.ledger.get_subscriber("s1")["id"]
    s2 = gw.ledger.get_subscriber("s2")["id"]
    # blocked at the breaching packet with money left (the packet was dropped, not charged)
    gw.ledger.save_block_state([(s1, BLOCK_LIMIT, 0, 0), (s2, BLOCK_LIMIT | BLOCK_MANUAL, 0, 0)])
    gw.pusher.restore()
    assert gw.acct.engine.subscriber(s1).blocked == BLOCK_LIMIT
    assert gw.acct.engine.subscriber(s2).blocked == BLOCK_LIMIT  # manual comes from its own records only
    gw.ledger.close()
    again = gateway(tmp_path, target)
    again.ledger.add_payment(s1, 1)
    again.pusher.restore()
    assert again.acct.engine.subscriber(s1).blocked == 0  # a payment after the block lifts it
    assert again.acct.engine.subscriber(s2).blocked == BLOCK_LIMIT
    again.ledger.close()


def test_a_dying_thread_turns_health_red(tmp_path, ledger_target):
    gw = gateway(tmp_path, ledger_target())
    assert gw.health()["status"] == "ok"
    gw._spawn("doomed", lambda: 1 // 0)
    gw._spawn("quitter", lambda: None)
    assert gw.fatal.wait(5)
    deadline = time.monotonic() + 5
    while len(gw.failed) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    health = gw.health()
    assert health["status"] == "failed"
    assert health["failed_threads"]["doomed"].startswith("ZeroDivisionError")
    assert health["failed_threads"]["quitter"] == "returned while the gateway was running"
    gw.ledger.close()
