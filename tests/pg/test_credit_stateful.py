"""A hypothesis state machine over the credit store on a real PostgreSQL:
reserve / report (replayed too) / extend / expire / pay / kill and revive a
gateway (a killed gateway's grants are abandoned until their validity ends;
back, it reports late) / release_all, with three gateways and two or three
accounts. At every step:

* charged + outstanding grants <= opening + payments + credit, per account,
  from the database's own rows (``CreditStore.check`` sums grants, reports
  and payments, and the account row's cache must agree with them);
* no report is counted twice (a replay answers as the first time and moves
  nothing; every grant's ``used`` is the sum of its reports' charges);
* balances are integer-exact: the database equals a model kept in Python
  integers, to the nano-unit.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from accounting.credit.pg import CreditStore

GATEWAYS = ("gw1", "gw2", "gw3")


@pytest.fixture(scope="module")
def machine_store(pg_cluster, pg_template):
    conninfo = pg_cluster.create_database("credit_stateful", template=pg_template)
    store = CreditStore.open(conninfo, pool_size=2, retry_for=5)
    try:
        yield store
    finally:
        store.close()


class CreditMachine(RuleBasedStateMachine):
    store: CreditStore = None

    def __init__(self) -> None:
        super().__init__()
        with self.store.pool.connection() as conn:
            conn.execute("TRUNCATE credit.reports, credit.requests, credit.payments, credit.changes, credit.grants,"
                         " credit.accounts RESTART IDENTITY; UPDATE credit.feed_head SET last = 0")
        self.now = 0
        self.accounts: dict[int, dict] = {}
        self.grants: dict[int, dict] = {}
        self.reports: dict[str, tuple] = {}  # id -> (args, result)
        self.payments: dict[str, tuple[int, int]] = {}
        self.alive = set(GATEWAYS)
        self.ids = itertools.count(1)

    @initialize(openings=st.lists(st.integers(-50, 400), min_size=2, max_size=3), data=st.data())
    def open_accounts(self, openings, data):
        for n, opening in enumerate(openings, 1):
            credit = data.draw(st.integers(max(0, -opening), 100), label=f"credit {n}")
            assert self.store.open_account(n, opening, credit)
            self.accounts[n] = {"opening": opening, "credit": credit, "paid": 0, "balance": opening, "reserved": 0}

    def spare(self, a: dict) -> int:
        return a["balance"] + a["credit"] - a["reserved"]

    # ---- rules ---------------------------------------------------------------------------------

    @rule(data=st.data(), amount=st.integers(1, 250), validity=st.integers(1, 40))
    def reserve(self, data, amount, validity):
        account = data.draw(st.sampled_from(sorted(self.accounts)), label="account")
        gateway = data.draw(st.sampled_from(sorted(self.alive)), label="gateway") if self.alive else None
        if gateway is None:
            return
        a = self.accounts[account]
        want = min(amount, self.spare(a))
        g = self.store.reserve(account, gateway, amount, validity, now=self.now)
        assert g.granted == want and g.final == (want < amount)
        if want:
            a["reserved"] += want
            self.grants[g.id] = {"account": account, "gateway": gateway, "amount": want, "used": 0, "open": True,
                                 "until": self.now + validity}
        else:
            assert g.id is None

    def _grant_of_alive(self, data):
        mine = sorted(gid for gid, g in self.grants.items() if g["gateway"] in self.alive)
        return data.draw(st.sampled_from(mine), label="grant") if mine else None

    @rule(data=st.data(), used=st.integers(0, 160), final=st.booleans(), more=st.integers(0, 120))
    def report(self, data, used, final, more):
        gid = self._grant_of_alive(data)
        if gid is None:
            return
        if final:
            more = 0
        g, a = self.grants[gid], self.accounts[self.grants[gid]["account"]]
        charged = returned = granted = extra = 0
        if g["open"]:
            charged = min(used, g["amount"] - g["used"])
            returned = g["amount"] - g["used"] - charged if final else 0
            a["balance"] -= charged
            a["reserved"] -= charged + returned
        if used > charged:
            extra = min(used - charged, self.spare(a))
            a["balance"] -= extra
        if g["open"] and more:
            granted = min(more, self.spare(a))
            a["reserved"] += granted
        g["used"] += charged + extra
        g["amount"] += extra + granted
        if final:
            g["open"] = False
        rid = f"r{next(self.ids)}"
        r = self.store.report(gid, rid, used, final=final, more=more, now=self.now)
        assert (r.charged, r.unpaid, r.returned, r.granted, r.replay) == \
            (charged + extra, used - charged - extra, returned, granted, False)
        self.reports[rid] = ((gid, used, final, more), r)

    @precondition(lambda self: self.reports)
    @rule(data=st.data())
    def replay_report(self, data):
        rid = data.draw(st.sampled_from(sorted(self.reports)), label="report id")
        (gid, used, final, more), first = self.reports[rid]
        again = self.store.report(gid, rid, used, final=final, more=more, now=self.now)
        assert again.replay
        assert (again.charged, again.unpaid, again.returned, again.granted) == \
            (first.charged, first.unpaid, first.returned, first.granted)

    @rule(data=st.data(), amount=st.integers(1, 120))
    def extend(self, data, amount):
        gid = self._grant_of_alive(data)
        if gid is None:
            return
        g, a = self.grants[gid], self.accounts[self.grants[gid]["account"]]
        want = min(amount, self.spare(a)) if g["open"] else 0
        assert self.store.extend(gid, amount, now=self.now).granted == want
        a["reserved"] += want
        g["amount"] += want

    @rule(step=st.integers(0, 30))
    def expire(self, step):
        self.now += step
        due = [(gid, g["account"], g["amount"] - g["used"]) for gid, g in sorted(self.grants.items())
               if g["open"] and g["until"] <= self.now]
        assert self.store.expire(now=self.now) == due
        for gid, account, back in due:
            self.grants[gid]["open"] = False
            self.accounts[account]["reserved"] -= back

    @rule(data=st.data(), amount=st.integers(1, 300), replay=st.booleans())
    def pay(self, data, amount, replay):
        if replay and self.payments:
            key = data.draw(st.sampled_from(sorted(self.payments)), label="replayed key")
            account, amount = self.payments[key]
            assert not self.store.pay(account, amount, key).new
            return
        account = data.draw(st.sampled_from(sorted(self.accounts)), label="account")
        key = f"p{next(self.ids)}"
        assert self.store.pay(account, amount, key).new
        self.payments[key] = (account, amount)
        self.accounts[account]["paid"] += amount
        self.accounts[account]["balance"] += amount

    @precondition(lambda self: self.alive)
    @rule(data=st.data())
    def kill_gateway(self, data):
        """SIGKILL: its grants are left open, unreported, until they expire."""
        self.alive.discard(data.draw(st.sampled_from(sorted(self.alive)), label="killed"))

    @precondition(lambda self: len(self.alive) < len(GATEWAYS))
    @rule(data=st.data())
    def revive_gateway(self, data):
        self.alive.add(data.draw(st.sampled_from(sorted(set(GATEWAYS) - self.alive)), label="revived"))

    @precondition(lambda self: self.alive)
    @rule(data=st.data())
    def release_all(self, data):
        gateway = data.draw(st.sampled_from(sorted(self.alive)), label="released")
        due = [(gid, g["account"], g["amount"] - g["used"]) for gid, g in sorted(self.grants.items())
               if g["open"] and g["gateway"] == gateway]
        assert self.store.release_all(gateway, now=self.now) == due
        for gid, account, back in due:
            self.grants[gid]["open"] = False
            self.accounts[account]["reserved"] -= back

    # ---- invariants ----------------------------------------------------------------------------

    @invariant()
    def database_equals_the_model_and_holds_the_rule(self):
        if not self.accounts:
            return
        assert self.store.check() == []  # from the rows: balances, reservations, reports, the inequality
        for account, a in self.accounts.items():
            row = self.store.account(account)
            assert (row["balance"], row["reserved"], row["credit_limit"]) == (a["balance"], a["reserved"],
                                                                               a["credit"])
            charged = a["opening"] + a["paid"] - row["balance"]
            assert charged + row["reserved"] <= a["opening"] + a["paid"] + a["credit"]
            assert all(type(v) is int for v in row.values())


def test_credit_state_machine(machine_store):
    CreditMachine.store = machine_store
    run_state_machine_as_test(CreditMachine, settings=settings(
        max_examples=40, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
