"""What is committed to the ledger while a start loads it reaches the engine (gateway/daemon/gateway.py
``Gateway.load_from_ledger``, gateway/daemon/changes.py), without root: the load is the real one, the
kernel's enforcer a stand-in that records what it is told; on both backends (``[sqlite]``, ``[pg]``: the load
reads in one snapshot, SQLite's read transaction or PostgreSQL's REPEATABLE READ).

The load takes seconds at a million subscribers; the CLI, the API and other processes keep writing meanwhile.
The change feed's id used to be read after the load, so a subscriber added (or changed) during it was taken as
loaded and never reached the engine; payment ids likewise, so a top-up to a subscriber already read was lost
from the live balance until the next restart.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from accounting.ledger import Ledger
from accounting.operations import Operations
from gateway import runtime
from gateway.daemon import Gateway, RunOptions
from gateway.lab import lab_config


def gateway(tmp_path, target: str) -> Gateway:
    config = tmp_path / "tollgate.toml"
    config.write_text(lab_config(3))
    gw = Gateway(RunOptions(str(config), target))
    gw.acct.seed_ledger()
    calls = []
    gw.enforcer = SimpleNamespace(add_subscriber_addresses=lambda nets: calls.append(("add", tuple(nets))),
                                  remove_subscriber_addresses=lambda nets: calls.append(("forget", tuple(nets))),
                                  block=lambda nets: calls.append(("block", tuple(nets))),
                                  unblock=lambda nets: calls.append(("unblock", tuple(nets))))
    gw.enforcer.calls = calls
    return gw


def load_with(gw: Gateway, during) -> None:
    """``gw.load_from_ledger()`` with ``during()`` run (another connection's writes) once the load has read
    its first chunk of rows and before it reads the rest (a chunk of one row here: the rest is read after)."""
    load, chunk = gw.acct.load_chunks, runtime.ROW_CHUNK

    def chunks_then(chunks):
        def stream():
            it = iter(chunks)
            yield next(it)
            during()
            yield from it
        return load(stream())

    gw.acct.load_chunks, runtime.ROW_CHUNK = chunks_then, 1
    try:
        gw.load_from_ledger()
    finally:
        gw.acct.load_chunks, runtime.ROW_CHUNK = load, chunk


def other(gw):
    ledger = Ledger.open(gw.opts.db_path)
    return ledger, Operations(ledger, gw.config, "test")


def test_a_subscriber_added_during_the_load_reaches_the_engine(tmp_path, ledger_target):
    gw = gateway(tmp_path, ledger_target())
    ledger, ops = other(gw)
    load_with(gw, lambda: ops.add("late", "lab", ["100.64.7.7/32"], balance="5.00"))
    late = ledger.get_subscriber("late")["id"]
    gw.changes.poll()
    assert late in gw.acct.subscribers
    assert gw.acct.engine.subscriber(late).balance == ledger.get_subscriber(late)["balance"]
    assert ("add", ("100.64.7.7/32",)) in gw.enforcer.calls
    assert gw.acct.engine.lookup_subscriber("100.64.7.7") == late


def test_a_change_replayed_for_a_subscriber_loaded_as_it_is_changes_nothing(tmp_path, ledger_target):
    gw = gateway(tmp_path, ledger_target())
    ledger, ops = other(gw)
    s3 = ledger.get_subscriber("s3")["id"]
    taken = gw.changes.start_from_ledger

    def then_change():  # after the feed's id is read, before the load reads the rows: loaded, and replayed
        taken()
        ops.update("s3", credit_limit="2.00")
        ops.topup("s3", "3.00", None)

    gw.changes.start_from_ledger = then_change
    gw.load_from_ledger()
    before = gw.acct.engine.subscriber(s3)
    assert before.credit == ledger.get_subscriber(s3)["credit_limit"] > 0
    assert before.balance == ledger.get_subscriber(s3)["balance"]
    gw.changes.poll()
    after = gw.acct.engine.subscriber(s3)
    assert (after.balance, after.credit, after.tariff, after.blocked) == \
        (before.balance, before.credit, before.tariff, before.blocked)
    assert gw.acct.subscribers[s3].addresses == tuple(ledger.get_subscriber(s3)["addresses"])


@pytest.mark.parametrize("who", ["s1", "s3"])  # the first row (read before the payment), a later one
def test_a_payment_during_the_load_is_in_the_live_balance_once(tmp_path, ledger_target, who):
    gw = gateway(tmp_path, ledger_target())
    ledger, ops = other(gw)
    load_with(gw, lambda: ops.topup(who, "7.00", None))
    sid = ledger.get_subscriber(who)["id"]
    gw.changes.poll()
    gw.changes.poll()  # a second poll replays nothing either
    assert gw.acct.engine.subscriber(sid).balance == ledger.get_subscriber(sid)["balance"]
