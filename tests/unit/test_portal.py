"""The subscriber portal (api/portal.py) over a ledger alone: logins and their
limits, sessions, one subscriber never seeing another's data, prepaid cards,
tariff changes, CSRF, the admin API refusing the portal's cookie, and the
block page's link into the portal."""

from __future__ import annotations

import re
import time
import warnings

import pytest

from accounting import prepaid
from accounting.audit import AuditLog
from accounting.ledger import Ledger
from accounting.money import format_amount, parse_amount
from accounting.operations import Operations
from api.app import LedgerView, create_app, portal_login_url
from api.auth import PortalPasswords, SessionSigner, TokenStore, session_secret
from api.portal import COOKIE, FailureLimit, csrf_token
from ext.errors import ConfigError
from gateway.config import load_config
from gateway.lab import lab_config

warnings.filterwarnings("ignore", message=".*httpx.*")  # starlette would rather have httpx2; httpx works
from starlette.testclient import TestClient  # noqa: E402  (after the filter: it warns on import)

A_ADDR, B_ADDR = "100.64.1.2", "100.64.2.2"
PASSWORD_A, PASSWORD_B = "correct horse battery", "another good one"
EXTRA_TARIFFS = """
[[tariff]]
name = "flat"
selectable = true
price_unit = "MB"
[tariff.prices]
external = "0.001"

[[tariff]]
name = "premium"
price_unit = "MB"
[tariff.prices]
external = "0.0001"
"""


class RecordingView(LedgerView):
    """A ledger-only view that remembers which subscribers it was asked to refresh."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.refreshed: list[int] = []

    def refresh_subscriber(self, sid: int) -> None:
        self.refreshed.append(sid)


@pytest.fixture
def world(tmp_path):
    """A config with a selectable tariff, a ledger with subscribers A and B (passwords set), the app."""
    path = tmp_path / "tollgate.toml"
    # the lab config's subscribers are not loaded into a ledger here: only its gateway and tariff tables
    path.write_text(lab_config(1).split("[[subscriber]]")[0] + EXTRA_TARIFFS)
    config = load_config(path)
    db = tmp_path / "ledger.db"
    ledger = Ledger.open(db)
    ops = Operations(ledger, config, "test")
    a = ops.add("alice", "lab", [f"{A_ADDR}/32"], "0.01", contract="C-1001")
    b = ops.add("bob", "lab", [f"{B_ADDR}/32"], "7.77", credit_limit="3.00", contract="C-1002")
    ops.topup(b["id"], "12.34", "bob-secret-payment", comment="bob-secret-comment")
    PortalPasswords(ledger).set(a["id"], PASSWORD_A)
    PortalPasswords(ledger).set(b["id"], PASSWORD_B)
    view = RecordingView(config, db)
    app = create_app(view)

    class World:
        pass

    w = World()
    w.config, w.ledger, w.view, w.app, w.a, w.b = config, ledger, view, app, a["id"], b["id"]
    w.client = lambda addr=A_ADDR: TestClient(app, client=(addr, 40000), follow_redirects=False)
    yield w
    ledger.close()


def login(client, who="C-1001", password=PASSWORD_A):
    return client.post("/portal/login", data={"login": who, "password": password})


def logged_in(world, who="C-1001", password=PASSWORD_A, addr=A_ADDR):
    client = world.client(addr)
    assert login(client, who, password).status_code == 303
    return client


def csrf_of(page: str) -> str:
    return re.search(r"name=csrf value='([^']+)'", page).group(1)


# ---- login ---------------------------------------------------------------------------

def test_login_by_contract_sets_a_portal_session_cookie(world):
    client = world.client()
    r = login(client)
    assert r.status_code == 303 and r.headers["location"] == "/portal"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "path=/portal", "samesite=lax", "max-age=28800"} <= attrs
    value = client.cookies[COOKIE]
    signer = SessionSigner(session_secret(world.ledger))
    assert signer.verify(value, "portal") == str(world.a)
    assert signer.verify(value, "admin") is None  # bound to the portal audience
    page = client.get("/portal")
    assert page.status_code == 200 and "alice" in page.text
    assert page.headers["cache-control"] == "no-store" and "frame-ancestors 'none'" in page.headers[
        "content-security-policy"]


def test_login_by_name_works_too(world):
    assert login(world.client(), "bob", PASSWORD_B).status_code == 303


def test_wrong_password_and_unknown_account_answer_alike(world):
    wrong = login(world.client(), "C-1001", "not the password")
    unknown = login(world.client("100.64.9.9"), "C-9999", "not the password")
    for r in (wrong, unknown):
        assert r.status_code == 401 and COOKIE not in r.headers.get("set-cookie", "")
        assert 'action="/portal/login"' in r.text  # the form again
        assert "Login failed: check what you typed and try again." in r.text
    # the same words whatever was wrong: nothing says which part
    strip = lambda text: re.sub(r'value="[^"]*"', "", text)  # noqa: E731  (the login typed is echoed)
    assert strip(wrong.text) == strip(unknown.text)
    assert "password is wrong" not in wrong.text.lower() and "unknown" not in unknown.text.lower()


def test_a_burst_of_bad_logins_gets_429_before_the_20th(world):
    client = world.client()
    first_429 = None
    answers = []
    for attempt in range(1, 1001):
        r = login(client, "C-1001", f"guess number {attempt}")
        answers.append(r.status_code)
        if r.status_code == 429 and first_429 is None:
            first_429 = attempt
            assert int(r.headers["retry-after"]) >= 1
        if first_429 is not None and attempt >= first_429 + 5:
            break
    assert first_429 is not None and first_429 <= 20, answers
    assert set(answers[:first_429 - 1]) == {401} and set(answers[first_429 - 1:]) == {429}
    # while limited even the right password is refused, before any hashing
    assert login(client).status_code == 429


def test_the_limit_holds_per_account_across_addresses_and_per_address_across_accounts(world):
    codes = [login(world.client(f"100.64.50.{i}"), "C-1001", "wrong wrong").status_code for i in range(1, 16)]
    assert 429 in codes and codes.index(429) <= 10, codes  # the 11th address is refused: the account is limited
    client = world.client("100.64.60.1")
    codes = [login(client, f"nobody-{i}", "wrong wrong").status_code for i in range(15)]
    assert 429 in codes and codes.index(429) <= 10, codes  # one address guessing many accounts
    assert login(world.client("100.64.70.1"), "bob", PASSWORD_B).status_code == 303  # others are unaffected


def test_failure_limit_counts_attempts_in_flight():
    limit = FailureLimit(3, 60)
    keys = (("address", "x"),)
    assert [limit.begin(keys, now=0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.begin(keys, now=0) > 0  # three guesses still being checked fill the budget
    for _ in range(3):
        limit.end(keys, failed=False, now=1)  # all three were right: nothing counted
    assert limit.begin(keys, now=1) == 0.0
    limit.end(keys, failed=True, now=1)
    limit.begin(keys, now=2), limit.end(keys, failed=True, now=2)
    limit.begin(keys, now=3), limit.end(keys, failed=True, now=3)
    assert limit.begin(keys, now=4) == pytest.approx(57)  # the oldest failure leaves the window at 61
    assert limit.begin(keys, now=61.5) == 0.0


# ---- sessions --------------------------------------------------------------------------

def test_the_portal_needs_a_session(world):
    client = world.client()
    for cookie in (None, "garbage", "MQ.9999999999.AAAA"):
        if cookie:
            client.cookies.set(COOKIE, cookie, domain="testserver", path="/portal")
        r = client.get("/portal")
        assert r.status_code == 303 and r.headers["location"] == "/portal/login"
    signer = SessionSigner(session_secret(world.ledger))
    for value in (signer.issue(str(world.a), "admin", 3600),  # another audience
                  signer.issue(str(world.a), "portal", 60, now=time.time() - 3600)):  # expired
        client.cookies.set(COOKIE, value, domain="testserver", path="/portal")
        assert client.get("/portal").status_code == 303
    for path in ("/portal/card", "/portal/tariff"):
        assert client.post(path, data={"code": "X", "tariff": "flat"}).headers["location"] == "/portal/login"


def test_a_subscriber_sees_only_their_own_data(world):
    page = logged_in(world).get("/portal").text
    assert "alice" in page and "C-1001" in page
    for secret in ("bob", "C-1002", "bob-secret-comment", "12.34", "7.77", "3.00"):
        assert secret not in page, secret
    bob = logged_in(world, "C-1002", PASSWORD_B, B_ADDR).get("/portal").text
    assert "bob-secret-comment" in bob and "alice" not in bob and "C-1001" not in bob
    # the subscriber comes from the signed session only: a cookie naming bob without bob's signature fails
    value = logged_in(world).cookies[COOKIE]
    _, expiry, mac = value.split(".")
    forged = f"Mg.{expiry}.{mac}"  # "2" in base64url, alice's MAC
    client = world.client()
    client.cookies.set(COOKIE, forged, domain="testserver", path="/portal")
    assert client.get("/portal").status_code == 303


def test_the_page_shows_balance_credit_tariff_block_reason_usage_and_payments(world):
    minute = int(time.time()) // 60 * 60
    world.ledger.apply_flush("f1", [(world.a, 1, 1, minute, 5_000_000, 4000, 0)], time.time_ns())
    world.ledger.record_block(world.a, "block", "limit")
    page = logged_in(world).get("/portal").text
    assert re.search(r"<b id=balance>([^<]+)</b>", page).group(1) == format_amount(
        world.ledger.get_subscriber(world.a)["balance"], "EUR")
    assert "Internet access is paused: your balance has run out." in page
    assert "<svg id=usage-chart" in page and "5.00 MB" in page  # the day's bar and the zone table
    assert "<table id=zones>" in page and "external" in page
    assert "No payments yet." in page and "<td id=tariff>lab</td>" in page


def test_the_live_balance_hook_is_used_when_the_view_has_it(world):
    world.view.live_balance = lambda sid: parse_amount("42.00", "EUR") if sid == world.a else None
    page = logged_in(world).get("/portal").text
    assert re.search(r"<b id=balance>([^<]+)</b>", page).group(1) == format_amount(parse_amount("42.00", "EUR"),
                                                                                     "EUR")


def test_logout_clears_the_cookie(world):
    client = logged_in(world)
    token = csrf_of(client.get("/portal").text)
    assert client.post("/portal/logout", data={}).status_code == 403  # a logout needs the token too
    r = client.post("/portal/logout", data={"csrf": token})
    assert r.status_code == 303 and r.headers["location"] == "/portal/login?out=1"
    assert f'{COOKIE}=""' in r.headers["set-cookie"] and "Path=/portal" in r.headers["set-cookie"]
    assert client.get("/portal").status_code == 303


# ---- prepaid cards ------------------------------------------------------------------------

def test_a_card_raises_the_balance_with_its_audit_row(world):
    expires = time.time_ns() + 86_400 * 10**9
    [(serial, code)] = prepaid.generate(world.ledger, 1, parse_amount("5.00", "EUR"), "EUR", expires)
    before = world.ledger.balance(world.a)
    client = logged_in(world)
    r = client.post("/portal/card", data={"code": code.lower(), "csrf": csrf_of(client.get("/portal").text)})
    assert r.status_code == 303 and r.headers["location"].startswith("/portal?")
    assert world.ledger.balance(world.a) == before + parse_amount("5.00", "EUR")
    page = client.get(r.headers["location"]).text
    assert f"Card {serial} activated" in page and "class=ok id=flash" in page
    assert f"prepaid card {serial}" in page  # in the payments table
    rows = [row for row in AuditLog(world.ledger).rows(limit=1000) if row["action"] == "card.activate"]
    assert len(rows) == 1 and rows[0]["actor"] == f"portal:{world.a}"
    assert rows[0]["target"] == f"subscriber:{world.a}"
    assert world.view.refreshed == [world.a]
    # a second use of the same card is refused and changes nothing
    r = client.post("/portal/card", data={"code": code, "csrf": csrf_of(page)})
    assert "has been used" in client.get(r.headers["location"]).text
    assert world.ledger.balance(world.a) == before + parse_amount("5.00", "EUR")


def test_wrong_card_codes_are_rate_limited(world):
    expires = time.time_ns() + 86_400 * 10**9
    [(_, good)] = prepaid.generate(world.ledger, 1, parse_amount("5.00", "EUR"), "EUR", expires)
    client = logged_in(world)
    token = csrf_of(client.get("/portal").text)
    codes = []
    for k in range(30):
        r = client.post("/portal/card", data={"code": f"AAAA-BBBB-CCCC-{k:04d}", "csrf": token})
        codes.append(r.status_code)
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            break
    assert codes[-1] == 429 and len(codes) <= 11, codes
    before = world.ledger.balance(world.a)
    assert client.post("/portal/card", data={"code": good, "csrf": token}).status_code == 429
    assert world.ledger.balance(world.a) == before  # not even a right code while limited
    # the limit is per address too: bob from alice's address is refused as well
    bob = logged_in(world, "C-1002", PASSWORD_B, A_ADDR)
    assert bob.post("/portal/card", data={"code": good, "csrf": csrf_of(bob.get("/portal").text)}).status_code == 429


# ---- tariffs ----------------------------------------------------------------------------------

def test_the_tariff_changes_only_to_a_selectable_one(world):
    client = logged_in(world)
    page = client.get("/portal").text
    assert "<option>flat</option>" in page and "premium" not in page
    token = csrf_of(page)
    for name in ("premium", "nonexistent", ""):
        assert client.post("/portal/tariff", data={"tariff": name, "csrf": token}).status_code == 403
    assert not world.ledger.db.execute("SELECT 1 FROM tariff_changes").fetchall()
    r = client.post("/portal/tariff", data={"tariff": "flat", "csrf": token})
    assert r.status_code == 303
    [(sid, tariff, applied)] = world.ledger.db.execute(
        "SELECT subscriber_id, tariff, applied_ns FROM tariff_changes").fetchall()
    assert (sid, tariff, applied) == (world.a, "flat", None)  # scheduled for now; the gateway applies it
    assert "changing to flat" in client.get(r.headers["location"]).text
    rows = [row for row in AuditLog(world.ledger).rows(limit=1000) if row["action"] == "subscriber.update"]
    assert rows[-1]["actor"] == f"portal:{world.a}"
    assert world.view.refreshed == [world.a]


def test_selectable_is_a_boolean_that_defaults_to_false(tmp_path, world):
    assert world.config.tariffs["flat"].selectable and not world.config.tariffs["lab"].selectable
    path = tmp_path / "bad.toml"
    path.write_text(lab_config(1).replace('name = "lab"\n', 'name = "lab"\nselectable = "yes"\n'))
    with pytest.raises(ConfigError, match="selectable"):
        load_config(path)


# ---- CSRF and origins ---------------------------------------------------------------------------

def test_posts_need_the_sessions_csrf_token_and_a_same_origin(world):
    expires = time.time_ns() + 86_400 * 10**9
    [(_, code)] = prepaid.generate(world.ledger, 1, parse_amount("1.00", "EUR"), "EUR", expires)
    alice = logged_in(world)
    token = csrf_of(alice.get("/portal").text)
    bob_token = csrf_of(logged_in(world, "C-1002", PASSWORD_B, B_ADDR).get("/portal").text)
    before = world.ledger.balance(world.a)
    for data in ({"code": code}, {"code": code, "csrf": ""}, {"code": code, "csrf": bob_token},
                 {"code": code, "csrf": token[:-2] + "AA"}):
        assert alice.post("/portal/card", data=data).status_code == 403
    for origin in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Referer": "http://evil.example/x"}):
        assert alice.post("/portal/card", data={"code": code, "csrf": token}, headers=origin).status_code == 403
    assert world.ledger.balance(world.a) == before
    r = alice.post("/portal/card", data={"code": code, "csrf": token}, headers={"Origin": "http://testserver"})
    assert r.status_code == 303 and world.ledger.balance(world.a) > before
    # a login posted from another site is refused too (login CSRF)
    r = world.client().post("/portal/login", data={"login": "C-1001", "password": PASSWORD_A},
                            headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    assert csrf_token(session_secret(world.ledger), "a") != csrf_token(session_secret(world.ledger), "b")


def test_a_forged_flash_message_is_not_shown(world):
    client = logged_in(world)
    page = client.get("/portal", params={"kind": "ok", "msg": "Call 555 to top up", "sig": "x"}).text
    assert "Call 555" not in page


def test_forms_must_be_urlencoded(world):
    client = logged_in(world)
    r = client.post("/portal/login", content=b'{"login": "C-1001"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 415


# ---- audiences ------------------------------------------------------------------------------------

def test_the_admin_api_refuses_the_portal_cookie(world):
    client = logged_in(world)
    value = client.cookies[COOKIE]
    api = world.client("127.0.0.1")  # an operator's address: the refusal must come from the credential
    assert api.get("/api/v1/subscribers", headers={"Cookie": f"{COOKIE}={value}"}).status_code == 401
    assert api.get("/api/v1/subscribers", headers={"Authorization": f"Bearer {value}"}).status_code == 401
    token = TokenStore(world.ledger).create("ops", "admin")
    assert api.get("/api/v1/subscribers", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    # nor does the portal take an admin token as a session
    api.cookies.set(COOKIE, token, domain="testserver", path="/portal")
    assert api.get("/portal").status_code == 303


# ---- the block page -------------------------------------------------------------------------------

def test_the_block_page_links_to_the_portal(world):
    world.ledger.record_block(world.a, "block", "limit")
    r = world.client(A_ADDR).get("/big.bin", headers={"Host": "198.18.0.2"})
    assert r.status_code == 511 and r.headers["cache-control"] == "no-store"
    assert "Log in to your account to top up" in r.text
    # the gateway's own address (the socket's), not the Host the browser sent
    assert 'href="http://testserver/portal/login"' in r.text and "198.18.0.2/portal" not in r.text
    assert "Log in to your account" in world.client(B_ADDR).get("/").text  # not blocked: still a way in


@pytest.mark.parametrize("server, url", [
    (("100.64.1.1", 8080), "http://100.64.1.1:8080/portal/login"),
    (("100.64.1.1", 80), "http://100.64.1.1/portal/login"),
    (("2001:db8:100:1::1", 8080), "http://[2001:db8:100:1::1]:8080/portal/login"),
    (("::ffff:100.64.1.1", 8080), "http://100.64.1.1:8080/portal/login"),
    (None, "/portal/login"),
])
def test_the_portal_link_uses_the_address_the_request_reached(server, url):
    from starlette.requests import Request

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"host", b"198.18.0.2")], "server": server}
    assert portal_login_url(Request(scope)) == url


def test_the_access_state_is_the_views_live_one(world):
    """The gateway's engine knows before the ledger (a flush later) that a top-up lifted a block."""
    world.ledger.record_block(world.a, "block", "limit")
    client = logged_in(world)
    assert "paused: your balance has run out" in client.get("/portal").text
    world.view.subscriber_page = lambda address: {"id": world.a, "reasons": []} if address == A_ADDR else None
    assert "Internet access is on." in client.get("/portal").text
    world.view.subscriber_page = lambda address: {"id": world.a, "reasons": ["manual", "schedule"]}
    assert ("paused: the operator paused it; it is outside your access hours." in client.get("/portal").text)


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kathmandu", "America/St_Johns"])
def test_the_day_chart_sums_each_local_day(world, zone):
    """The 30 days are summed by SQLite in quarter hours (issue 12: a page, not every minute of a month), then
    into the config's days: every bar equals the sum of its day's minutes, also where the zone is off UTC by
    45 or 30 minutes."""
    import datetime as dt
    import random
    from zoneinfo import ZoneInfo

    from accounting.money import format_volume

    world.view.config.timezone = zone
    tz, rng = ZoneInfo(zone), random.Random(zone)
    now = int(time.time()) // 60 * 60
    rows, per_day = {}, {}
    for _ in range(400):
        minute = now - 60 * rng.randint(0, 29 * 1440)
        key = (world.a, rng.randint(0, 1), rng.randint(0, 1), minute)
        rows[key] = rows.get(key, 0) + rng.randint(1, 10**7)
    for (_s, _z, _d, minute), b in rows.items():
        day = dt.datetime.fromtimestamp(minute, tz).date()
        per_day[day] = per_day.get(day, 0) + b
    world.ledger.apply_flush(f"days-{zone}", [(*k, b, 1, 0) for k, b in rows.items()], time.time_ns())
    page = logged_in(world).get("/portal").text
    bars = dict(re.findall(r"<title>(\d{4}-\d\d-\d\d): ([^<]+)</title>", page))
    assert len(bars) == 30
    for day, text in bars.items():
        assert text == format_volume(per_day.get(dt.date.fromisoformat(day), 0)), day
    assert sum(1 for t in bars.values() if t != format_volume(0)) > 20
