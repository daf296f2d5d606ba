"""Vouchers and portal logins that bind a device (issue 15, phase 2; schema 18): a voucher opens a guest account
on its first use (value as balance, volume as volume limit, valid from first use), binds the redeeming device
as a portal session, the device limit holds, a password login from an address that belongs to no one binds it,
logout and expiry unbind; IPv4 and IPv6; the block page of an unknown address leads to the portal. Through the
app over a ledger alone (api.app.LedgerView), the client address set by the test client."""

from __future__ import annotations

import re
import warnings

import pytest

from accounting.audit import AuditLog
from accounting.ledger import Ledger
from accounting.operations import OperationError, Operations
from api.app import LedgerView, create_app
from api.auth import PortalPasswords
from gateway.config import load_config

warnings.filterwarnings("ignore", message=".*httpx.*")
from starlette.testclient import TestClient  # noqa: E402

S = 10 ** 9
CONFIG = """
[gateway]
currency = "EUR"
local_networks = ["100.64.0.0/10", "2001:db8:100::/48"]

[[tariff]]
name = "lab"
price_unit = "MB"
[tariff.prices]
external = "0.01"

[[tariff]]
name = "guest"
price_unit = "MB"
[tariff.prices]
external = "0"

[sessions]
portal_login = true
portal_session = 3600
voucher_tariff = "guest"
"""
GUEST4, GUEST6, OTHER4 = "100.64.9.2", "2001:db8:100:9::2", "100.64.9.3"


class View(LedgerView):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.refreshed: list[int] = []
        self.neighbours: dict[str, tuple[str | None, list[str]]] = {}

    def refresh_subscriber(self, sid: int) -> None:
        self.refreshed.append(sid)

    def device_neighbours(self, address):
        return self.neighbours.get(address, (None, []))


@pytest.fixture
def world(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(CONFIG)
    cfg = load_config(path)
    ledger = Ledger.open(tmp_path / "l.db")
    ops = Operations(ledger, cfg, "cli:test")
    alice = ops.add("alice", "lab", ["100.64.1.2/32"], "10.00", contract="C-1")
    PortalPasswords(ledger).set(alice["id"], "alice's password")
    view = View(cfg, tmp_path / "l.db")
    app = create_app(view)

    class W:
        pass

    w = W()
    w.ops, w.ledger, w.view, w.alice = ops, ledger, view, alice["id"]
    w.client = lambda addr=GUEST4: TestClient(app, client=(addr, 40000), follow_redirects=False)
    yield w
    ledger.close()


def live(ops) -> dict[str, str]:
    return {r["network"]: r["subscriber"] for r in ops.sessions(live=True)}


def redeem(client, code):
    return client.post("/portal/voucher", data={"code": code})


def test_generate_checks_what_it_is_given(world):
    ops = world.ops
    for kw, why in (({}, "value, a volume"), ({"volume": "-1"}, "volume"), ({"value": "0"}, "more than zero"),
                    ({"value": "1", "days": 0}, "1 to 3660 days"), ({"value": "1", "devices": 0}, "device limit"),
                    ({"value": "1", "tariff": "nope"}, "unknown tariff")):
        with pytest.raises(OperationError, match=why):
            ops.generate_vouchers(1, **kw)
    made = ops.generate_vouchers(3, volume="1MB", days=1, devices=2)
    assert len({v["code"] for v in made}) == 3 and all(re.fullmatch(r"([0-9A-Z]{4}-){3}[0-9A-Z]{4}", v["code"])
                                                        for v in made)
    # only hashes kept
    assert not world.ledger.db.execute("SELECT 1 FROM vouchers WHERE code_sha256 = ?", (made[0]["code"],)).fetchone()
    assert "vouchers.generate" in [r["action"] for r in AuditLog(world.ledger).rows(limit=100)]


def test_first_use_opens_a_guest_account_and_binds_the_device(world):
    ops = world.ops
    v = ops.generate_vouchers(1, value="5.00", volume="1MB", days=1)[0]
    r = ops.redeem_voucher(v["code"].lower().replace("-", " "), GUEST4, now=1000 * S)  # typed loosely
    assert r["first_use"] and r["ends_ns"] == 1000 * S + 86400 * S
    guest = world.ledger.get_subscriber(r["subscriber_id"])
    assert (guest["name"], guest["tariff"], guest["volume_limit"]) == ("guest-" + v["serial"].lower(), "guest",
                                                                       1_000_000)
    assert ops.get(r["subscriber_id"])["balance"] == "5.00 EUR"
    assert guest["addresses"] == [f"{GUEST4}/32"]
    assert live(ops) == {f"{GUEST4}/32": guest["name"]}
    [row] = ops.sessions(live=True)
    assert (row["source"], row["session_key"], row["expires_ns"]) == ("portal", GUEST4, 1000 * S + 3600 * S)
    # the second use: the same account, no second one
    again = ops.redeem_voucher(v["code"], GUEST6, now=2000 * S)
    assert again["subscriber_id"] == r["subscriber_id"] and not again["first_use"]
    assert world.ledger.db.execute("SELECT count(*) FROM subscribers WHERE name LIKE 'guest-%'").fetchone()[0] == 1
    assert live(ops) == {f"{GUEST4}/32": guest["name"], f"{GUEST6}/128": guest["name"]}
    # after the voucher ends: refused, and sessions never outlive it
    with pytest.raises(OperationError, match="ended") as exc:
        ops.redeem_voucher(v["code"], OTHER4, now=1000 * S + 86400 * S)
    assert exc.value.status == 409
    late = ops.redeem_voucher(v["code"], GUEST4, now=1000 * S + 86000 * S)
    assert late["session"]["sessions"][0]["expires_ns"] == 1000 * S + 86400 * S
    ops.expire_sessions(now=1000 * S + 86401 * S)
    assert live(ops) == {}


def test_the_device_limit_counts_live_portal_sessions(world):
    ops = world.ops
    v = ops.generate_vouchers(1, volume="1GB", days=1, devices=2)[0]
    ops.redeem_voucher(v["code"], GUEST4)
    ops.redeem_voucher(v["code"], GUEST6)
    ops.redeem_voucher(v["code"], GUEST4)  # the same device again: a renewal, not a third device
    with pytest.raises(OperationError, match="in use on 2 devices") as exc:
        ops.redeem_voucher(v["code"], OTHER4)
    assert exc.value.status == 409
    assert f"{OTHER4}/32" not in live(ops)
    assert ops.portal_logout(GUEST6)["status"] == "stopped"
    ops.redeem_voucher(v["code"], OTHER4)
    assert sorted(live(ops)) == [f"{GUEST4}/32", f"{OTHER4}/32"]


def test_wrong_codes_are_limited_per_address_and_an_unused_voucher_expires(world):
    ops = world.ops
    v = ops.generate_vouchers(1, value="1.00", redeem_days=1)[0]
    for _ in range(5):
        with pytest.raises(OperationError, match="no voucher") as exc:
            ops.redeem_voucher("0000-0000-0000-0000", GUEST4)
        assert exc.value.status == 404
    with pytest.raises(OperationError, match="too many") as exc:
        ops.redeem_voucher(v["code"], GUEST4)  # the right one too, from that address
    assert exc.value.status == 429
    with pytest.raises(OperationError, match="expired unused"):
        ops.redeem_voucher(v["code"], OTHER4, now=ops._ns(None) + 2 * 86400 * S)
    assert live(ops) == {} and world.ledger.db.execute("SELECT count(*) FROM subscribers").fetchone()[0] == 1


def test_a_voucher_never_takes_a_subscribers_address(world):
    v = world.ops.generate_vouchers(1, value="1.00")[0]
    with pytest.raises(OperationError, match="static address") as exc:
        world.ops.redeem_voucher(v["code"], "100.64.1.2")
    assert exc.value.status == 409
    # nothing written: no guest account, the voucher unused
    assert world.ledger.db.execute("SELECT first_used_ns FROM vouchers").fetchone() == (None,)
    assert world.ledger.db.execute("SELECT count(*) FROM subscribers").fetchone()[0] == 1


# ---- through the portal ---------------------------------------------------------------------------------------

def test_an_unknown_address_gets_the_login_page_and_a_voucher_binds_it(world):
    client = world.client(GUEST4)
    page = client.get("/some/page")
    assert page.status_code == 511 and "not logged in" in page.text and "/portal/login" in page.text
    form = client.get("/portal/login")
    assert 'action="/portal/voucher"' in form.text and 'action="/portal/login"' in form.text
    v = world.ops.generate_vouchers(1, volume="100MB", days=1, devices=1)[0]
    world.view.neighbours[GUEST4] = ("52:54:00:AA:00:09", [GUEST6, "100.64.1.2", "198.18.0.9"])
    r = redeem(client, v["code"])
    assert r.status_code == 303 and r.headers["location"].startswith("/portal?")
    guest = "guest-" + v["serial"].lower()
    # the device's IPv6 address from the neighbour table too; alice's address and non-local ones never
    assert live(world.ops) == {f"{GUEST4}/32": guest, f"{GUEST6}/128": guest}
    assert world.ops.sessions(live=True)[0]["mac"] == "52:54:00:aa:00:09"
    sid = world.ledger.get_subscriber(guest)["id"]
    assert world.view.refreshed == [sid]
    account = client.get(r.headers["location"])
    assert account.status_code == 200 and f"Voucher {v['serial']} accepted" in account.text
    assert "100.00 MB of traffic" in account.text
    # another device: the limit is 1
    other = world.client(OTHER4)
    r = redeem(other, v["code"])
    assert r.status_code == 409 and "in use on 1 devices" in r.text
    # logout unbinds this device
    csrf = re.search(r"name=csrf value='([^']+)'", account.text).group(1)
    assert client.post("/portal/logout", data={"csrf": csrf}).status_code == 303
    assert live(world.ops) == {}
    assert redeem(other, v["code"]).status_code == 303


def test_a_password_login_from_an_unknown_address_binds_it_and_not_from_a_known_one(world):
    client = world.client(GUEST6)
    r = client.post("/portal/login", data={"login": "C-1", "password": "alice's password"})
    assert r.status_code == 303
    assert live(world.ops) == {f"{GUEST6}/128": "alice"}
    assert world.ledger.get_subscriber("alice")["addresses"] == ["100.64.1.2/32", f"{GUEST6}/128"]
    assert "this device is online" in client.get(r.headers["location"]).text
    # from alice's own static address: logged in, nothing bound
    home = world.client("100.64.1.2")
    assert home.post("/portal/login", data={"login": "alice", "password": "alice's password"}).status_code == 303
    assert live(world.ops) == {f"{GUEST6}/128": "alice"}
    # a wrong password binds nothing
    stranger = world.client(OTHER4)
    assert stranger.post("/portal/login", data={"login": "alice", "password": "wrong!!!!"}).status_code == 401
    assert f"{OTHER4}/32" not in live(world.ops)


def test_without_portal_login_nothing_is_bound(world, tmp_path):
    path = tmp_path / "off.toml"
    path.write_text(CONFIG.replace("portal_login = true", "portal_login = false"))
    view = View(load_config(path), tmp_path / "l.db")
    client = TestClient(create_app(view), client=(GUEST4, 40000), follow_redirects=False)
    assert client.get("/").status_code == 200 and "belongs to no subscriber" in client.get("/").text
    assert client.post("/portal/voucher", data={"code": "X"}).status_code == 404
    assert client.post("/portal/login", data={"login": "C-1", "password": "alice's password"}).status_code == 303
    assert live(world.ops) == {}
