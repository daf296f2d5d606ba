"""Credit grants in the ledger (schema 22), on both backends: what several gateways sharing one ledger
may spend. Amounts are worked out here from what was fed in, never read back to be trusted."""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from accounting.ledger import Ledger
from ext.errors import LedgerError

M = 60
LATER = 2 * 10 ** 18  # a validity far ahead


def at(target: str, gateway: str) -> Ledger:
    led = Ledger.open(target)
    led.gateway = gateway
    return led


def flush(led: Ledger, fid: str, sid: int, charged: int) -> bool:
    return led.apply_flush(fid, [(sid, 0, 1, M, charged, 1, charged)], 1, grants=True)


def test_a_grant_is_what_the_balance_and_credit_can_pay(ledger_target):
    with at(ledger_target(), "g1") as led:
        rich = led.add_subscriber("rich", "t", "EUR", opening_balance=1000, credit_limit=500)
        poor = led.add_subscriber("poor", "t", "EUR", opening_balance=0)
        owes = led.add_subscriber("owes", "t", "EUR", opening_balance=-10, credit_limit=5)
        assert led.reserve({rich: 600, poor: 100, owes: 1}, LATER) == {rich: 600}
        assert led.reserve({rich: 1000}, LATER) == {rich: 900}  # all that is left of 1000 + 500
        assert led.grants() == {rich: (1500, LATER)}
        assert led.reserve({rich: 1}, LATER) == {}  # nothing left: absent, not 0
        assert led.get_subscriber(rich)["reserved"] == 1500
        with pytest.raises(LedgerError, match="gateway"):
            Ledger(led.db).reserve({rich: 1}, LATER)  # a connection of no gateway takes nothing
        assert led.check_invariants() == []


def test_flushes_charge_the_grant_once_and_the_rest_returns(ledger_target):
    target = ledger_target()
    with at(target, "g1") as g1, at(target, "g2") as g2:
        sid = g1.add_subscriber("a", "t", "EUR", opening_balance=1000)
        assert g1.reserve({sid: 300}, LATER) == {sid: 300}
        assert g2.reserve({sid: 300}, LATER) == {sid: 300}
        assert flush(g1, "g1:1", sid, 120) and not flush(g1, "g1:1", sid, 120)  # the report id is the flush id
        assert flush(g2, "g2:1", sid, 50)
        assert g1.grants() == {sid: (180, LATER)} and g2.grants() == {sid: (250, LATER)}
        row = g1.get_subscriber(sid)
        assert (row["balance"], row["reserved"]) == (1000 - 170, 180 + 250)
        # a charge beyond the grant (the gateway served on a grant that expired meanwhile): charged all the same
        assert flush(g1, "g1:2", sid, 400)
        assert g1.grants() == {sid: (0, LATER)}
        assert g1.get_subscriber(sid)["reserved"] == 250 and g1.balance(sid) == 1000 - 570
        assert g2.release_grants() == [("g2", sid, 250)]
        assert g2.grants() == {} and g1.get_subscriber(sid)["reserved"] == 0
        assert g1.reserve({sid: 10 ** 6}, LATER) == {sid: 430}  # all that is left is takeable again
        assert g1.check_invariants() == []


def test_grants_not_renewed_expire_back_to_the_balance(ledger_target):
    target = ledger_target()
    with at(target, "g1") as g1, at(target, "g2") as g2:
        sid = g1.add_subscriber("a", "t", "EUR", opening_balance=1000)
        g1.reserve({sid: 400}, 100)
        g2.reserve({sid: 400}, 100)
        g2.renew_grants(300)  # g2 is alive; g1 was killed
        assert g2.expire_grants(200) == [("g1", sid, 400)]  # any gateway returns another's expired grants
        assert g2.expire_grants(200) == []
        assert g1.grants() == {} and g2.grants() == {sid: (400, 300)}
        assert g1.get_subscriber(sid)["reserved"] == 400
        assert g2.reserve({sid: 10 ** 6}, 300) == {sid: 600}


def test_grants_are_not_changes_of_the_subscriber(ledger_target):
    """Reserves and grant charges move ``reserved`` with every flush: the change feed, which makes every
    gateway refresh a subscriber, must not hear of them; a change of its terms it must."""
    with at(ledger_target(), "g1") as led:
        sid = led.add_subscriber("a", "t", "EUR", opening_balance=1000)
        last = led.last_change_id()
        led.reserve({sid: 100}, LATER)
        flush(led, "f1", sid, 10)
        led.release_grants()
        assert led.changes_since(last)[1] == {}
        led.set_terms(sid, discount_bp=10)
        assert led.changes_since(last)[1] == {sid: {"subscriber"}}


def test_three_gateways_reserving_at_once_never_take_more_than_there_is(ledger_target):
    target = ledger_target()
    with Ledger.open(target) as led:
        subs = [led.add_subscriber(f"s{k}", "t", "EUR", opening_balance=1000, credit_limit=200) for k in range(3)]
    taken: dict[str, dict[int, int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def gateway(name: str) -> None:
        try:
            with at(target, name) as g:
                start.wait(timeout=60)
                mine: dict[int, int] = {}
                for i in range(60):
                    for sid, took in g.reserve({sid: 7 + i % 5 for sid in subs}, LATER).items():
                        mine[sid] = mine.get(sid, 0) + took
                    if i % 4 == 0:
                        for sid in subs:  # spend some of it, as traffic would
                            flush(g, f"{name}:{i}:{sid}", sid, min(3, g.grants().get(sid, (0, 0))[0]))
                taken[name] = mine
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=gateway, args=(f"g{k}",)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == [] and not any(t.is_alive() for t in threads)
    with Ledger.open(target) as led:
        for sid in subs:
            row = led.get_subscriber(sid)
            charged = sum(c["amount"] for c in led.charges(sid))
            got = sum(mine.get(sid, 0) for mine in taken.values())
            assert got == 1200  # everything was taken, by someone, and no more
            assert row["balance"] == 1000 - charged and row["reserved"] == got - charged
            assert charged + row["reserved"] <= 1000 + 200
        assert led.check_invariants() == []


class GrantMachine(RuleBasedStateMachine):
    """Reserve, charge, renew, expire, pay and kill, from three gateways, in any order: at every step
    charged + outstanding grants <= opening + payments + credit, reserved == the sum of the grants,
    and the balance is opening + payments - charged (worked out here)."""

    target_factory = None  # set by the test below: one new ledger per run

    @initialize()
    def open(self):
        self.target = GrantMachine.target_factory()
        self.led = {g: at(self.target, g) for g in ("g1", "g2", "g3")}
        self.sid = self.led["g1"].add_subscriber("a", "t", "EUR", opening_balance=500, credit_limit=100)
        self.paid = 0
        self.charged = 0
        self.now = 1000
        self.flushes = 0

    def teardown(self):
        for led in getattr(self, "led", {}).values():
            led.close()

    @rule(g=st.sampled_from(["g1", "g2", "g3"]), asked=st.integers(0, 400))
    def reserve(self, g, asked):
        self.led[g].reserve({self.sid: asked}, self.now + 50)

    @rule(g=st.sampled_from(["g1", "g2", "g3"]), part=st.integers(0, 100), replay=st.booleans())
    def charge(self, g, part, replay):
        held = self.led[g].grants().get(self.sid, (0, 0))[0]
        amount = held * part // 100  # the engine spends at most its grant
        self.flushes += 1
        fid = f"{g}:{self.flushes}"
        if flush(self.led[g], fid, self.sid, amount):
            self.charged += amount
        if replay:
            assert not flush(self.led[g], fid, self.sid, amount)

    @rule(g=st.sampled_from(["g1", "g2", "g3"]))
    def renew(self, g):
        self.led[g].renew_grants(self.now + 50)

    @rule(step=st.integers(1, 60))
    def tick_and_expire(self, step):
        self.now += step
        self.led["g1"].expire_grants(self.now)

    @rule(amount=st.integers(1, 300))
    def pay(self, amount):
        self.led["g2"].add_payment(self.sid, amount)
        self.paid += amount

    @rule(g=st.sampled_from(["g1", "g2", "g3"]))
    def stop(self, g):
        self.led[g].release_grants()

    @invariant()
    def covered(self):
        if not hasattr(self, "led"):
            return
        led = self.led["g3"]
        row = led.get_subscriber(self.sid)
        outstanding = sum(g.grants().get(self.sid, (0, 0))[0] for g in self.led.values())
        assert row["reserved"] == outstanding
        assert row["balance"] == 500 + self.paid - self.charged
        assert self.charged + outstanding <= 500 + self.paid + 100


@pytest.mark.slow
def test_grants_hold_the_rule_at_every_step(ledger_target):
    GrantMachine.target_factory = staticmethod(ledger_target)
    GrantMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                                              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.too_slow])
    GrantMachine.TestCase().runTest()
