"""The change follower's order against the eBPF program's maps (gateway/daemon/changes.py), without a
kernel: a stand-in gateway whose engine, nft enforcer and eBPF source write one shared log.

The program meters before nft and the engine: a network that leaves a subscriber must leave the maps
before nft unblocks it (else a blocked subscriber's tcp/80 from it passes the program uncounted, as
redirected, and nft forwards it: tests/linux/test_ebpf_block_step.py shows it with packets), and a network
that arrives must reach the maps before the engine has it (else the program passes it as unknown,
uncharged, while the engine already rates it as the subscriber's). Both used to wait for the source's next
``sync_addresses``.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

from gateway.daemon.changes import ChangeFollower


def follower(row: dict, info=None):
    log: list[tuple] = []

    class Engine:
        def add_address(self, sid, net):
            log.append(("engine add", net))

        def remove_address(self, net):
            log.append(("engine remove", net))

        def subscriber(self, sid):
            return SimpleNamespace(blocked=1)

    class Enforcer:
        def add_subscriber_addresses(self, nets):
            log.append(("nft add", tuple(nets)))

        def remove_subscriber_addresses(self, nets):
            log.append(("nft forget", tuple(nets)))

        def unblock(self, nets):
            log.append(("nft unblock", tuple(nets)))

        def block(self, nets):
            log.append(("nft block", tuple(nets)))

    class Source:  # the eBPF source's hooks, recorded as what they do to the maps
        def before_nft_release(self, nets):
            log.append(("maps remove", tuple(nets)))

        def before_engine_add(self, sid, nets):
            log.append(("maps add", sid, tuple(nets)))

    acct = SimpleNamespace(subscribers={1: info} if info else {}, engine=Engine(), tariff_ids={"lab"},
                           update_terms=lambda sid, row: [],
                           load_subscribers=lambda rows: log.append(("engine add", tuple(rows[0]["addresses"]))) or [],
                           open_billing=lambda sid, now: (None, []))
    gw = SimpleNamespace(ledger=SimpleNamespace(get_subscriber=lambda sid: row), serves=lambda row: True, acct=acct,
                         engine_lock=threading.RLock(), enforcer_lock=threading.Lock(), enforcer=Enforcer(),
                         readers=[Source()], quiesce=lambda: None, opts=SimpleNamespace(kernel_marked=False),
                         post=lambda events: None, limits=SimpleNamespace(update=lambda sid: None),
                         touch=lambda sids: None, credit=None, calendar_now=lambda: 0,
                         kernel=SimpleNamespace(subscribers_changed=lambda: None))
    return ChangeFollower(gw), log


def test_networks_leave_the_maps_before_nft_and_arrive_before_the_engine():
    info = SimpleNamespace(addresses=("100.64.1.2/32", "100.64.1.3/32"), tariff="lab", name="s1")
    row = {"addresses": ["100.64.1.3/32", "100.64.1.4/32"], "tariff": "lab", "name": "s1", "credit_limit": 0}
    changes, log = follower(row, info)
    changes.refresh(1)
    steps = [entry[0] for entry in log]
    assert ("maps remove", ("100.64.1.2/32",)) in log and ("maps add", 1, ("100.64.1.4/32",)) in log
    assert steps.index("maps remove") < steps.index("nft unblock") < steps.index("nft forget")
    assert steps.index("maps add") < steps.index("engine add")


def test_a_new_subscribers_networks_reach_the_maps_before_the_engine():
    row = {"id": 5, "addresses": ["100.64.5.2/32"], "tariff": "lab", "name": "s5", "credit_limit": 0,
           "balance": 100, "billing_since_ns": 0, "created_ns": 0}
    changes, log = follower(row)
    changes.refresh(5)
    assert log[0] == ("maps add", 5, ("100.64.5.2/32",))
    assert [e[0] for e in log].index("engine add") > 0
