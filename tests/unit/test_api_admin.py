"""The admin API through its ASGI app over a real ledger file: every route
against every kind of caller (the access matrix), the money and block routes
end to end, bad requests answered 4xx with what is wrong, and the audit log
holding every change."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from accounting.audit import AuditLog
from accounting.ledger import Ledger
from accounting.prepaid import generate
from api.app import LedgerView, create_app
from api.auth import SessionSigner, TokenStore, session_secret
from gateway.config import load_config
from gateway.lab import lab_config

LOCAL = ("127.0.0.1", 50000)  # inside gateway.admin_networks


@pytest.fixture
def api(tmp_path, ledger_target):
    """The admin API over a ledger alone, on SQLite and on PostgreSQL (whose request threads share one pool
    of connections: accounting/thread_ledgers.py)."""
    path = tmp_path / "tollgate.toml"
    path.write_text(lab_config(2))
    db = ledger_target()
    ledger = Ledger.open(db)
    tokens = {role: TokenStore(ledger).create(f"{role}-token", role) for role in ("admin", "operator", "cashier")}
    TokenStore(ledger).create("victim", "operator")
    config = load_config(str(path))
    a = ledger.add_subscriber("A", "lab", "EUR", 10 * 10**9, addresses=["100.64.1.2/32"])
    b = ledger.add_subscriber("B", "lab", "EUR", 10 * 10**9, addresses=["100.64.2.2/32"])
    signer = SessionSigner(session_secret(ledger))
    cookies = {"subscriber A": signer.issue(str(a), "portal", 3600), "subscriber B": signer.issue(str(b), "portal", 3600)}
    view = LedgerView(config, db)
    client = TestClient(create_app(view), client=LOCAL)
    yield client, ledger, tokens, cookies
    view.ledgers.close()
    ledger.close()


def headers(tokens, who: str) -> dict:
    return {"Authorization": f"Bearer {tokens[who]}"} if who in tokens else {}


# what each route is asked, with a body that is valid for it
BODIES = {
    ("POST", "/api/v1/subscribers"): {"name": "new-one", "tariff": "lab", "addresses": ["100.64.9.2/32"]},
    ("PATCH", "/api/v1/subscribers/{sid}"): {"credit_limit": "1.00"},
    ("POST", "/api/v1/subscribers/{sid}/block"): {"reason": "abuse report"},
    ("POST", "/api/v1/subscribers/{sid}/unblock"): {"reason": "cleared"},
    ("POST", "/api/v1/subscribers/{sid}/payments"): {"amount": "5.00"},
    ("POST", "/api/v1/subscribers/{sid}/adjustments"): {"amount": "-1.00", "reason": "refund of a fee"},
    ("POST", "/api/v1/subscribers/{sid}/cards"): {"code": "WRONG-CODE"},
    ("POST", "/api/v1/cards"): {"count": 1, "value": "5.00"},
    ("POST", "/api/v1/tokens"): {"name": "made-by-test", "role": "operator"},
    # JSON lines: one object is one line (sent as application/json by call(), which the route takes too)
    ("POST", "/api/v1/subscribers:import"): {"name": "bulk-one", "tariff": "lab", "addresses": ["100.64.9.3/32"]},
}
NOT_JSON_BODIES = {("POST", "/api/v1/subscribers:import")}  # JSON lines or CSV: not application/json routes
PERMISSION = {  # the permission each route needs (api/auth.py's table decides who has it)
    "GET": "read", "PATCH": "write", "DELETE": "write",
    ("POST", "/api/v1/subscribers"): "write", ("POST", "/api/v1/subscribers/{sid}/block"): "write",
    ("POST", "/api/v1/subscribers/{sid}/unblock"): "write", ("POST", "/api/v1/subscribers/{sid}/payments"): "payments",
    ("POST", "/api/v1/subscribers/{sid}/adjustments"): "payments", ("POST", "/api/v1/subscribers/{sid}/cards"):
    "payments", ("POST", "/api/v1/cards"): "payments", ("POST", "/api/v1/tokens"): "tokens",
    ("GET", "/api/v1/tokens"): "tokens", ("GET", "/api/v1/audit"): "tokens", ("DELETE", "/api/v1/tokens/{name}"): "tokens",
    ("POST", "/api/v1/subscribers:import"): "write",
}
GRANTS = {"admin": {"read", "write", "payments", "tokens"}, "operator": {"read"}, "cashier": {"read", "payments"}}
CALLERS = ("anonymous", "subscriber A", "subscriber B", "operator", "cashier", "admin")


def routes(client):
    """Every admin operation the OpenAPI document lists."""
    paths = client.get("/api/openapi.json").json()["paths"]
    return sorted((method.upper(), path) for path, ops in paths.items() if path.startswith("/api/v1")
                  for method in ops)


def call(client, tokens, cookies, who, method, path, sid=1):
    url = path.replace("{sid}", str(sid)).replace("{name}", "victim")
    h = headers(tokens, who)
    if method == "POST" and path.endswith("/payments"):
        h["Idempotency-Key"] = f"{who}-{sid}"
    client.cookies.clear()
    if who in cookies:
        client.cookies.set("tg_portal", cookies[who])
    return client.request(method, url, json=BODIES.get((method, path)), headers=h)


def test_every_route_against_every_caller(api):
    client, ledger, tokens, cookies = api
    table = routes(client)
    assert len(table) >= 18
    unexpected = []
    for method, path in table:
        need = PERMISSION.get((method, path), PERMISSION.get(method))
        assert need, f"{method} {path}: no permission listed in this test"
        for who in CALLERS:
            r = call(client, tokens, cookies, who, method, path)
            allowed = who in GRANTS and need in GRANTS[who]
            if who not in GRANTS:  # a portal session is no admin credential
                ok = r.status_code == 401
            elif not allowed:
                ok = r.status_code == 403
            else:
                ok = r.status_code < 500 and r.status_code not in (401, 403)
            if not ok:
                unexpected.append((who, method, path, r.status_code, r.text[:120]))
    assert unexpected == []


def test_the_api_answers_only_admin_networks(api):
    client, ledger, tokens, cookies = api
    outside = TestClient(client.app, client=("100.64.1.2", 40000))  # a subscriber's address
    r = outside.get("/api/v1/subscribers", headers=headers(tokens, "admin"))
    assert r.status_code == 403 and "admin_networks" in r.json()["detail"]


def test_money_blocks_and_the_audit_log(api):
    client, ledger, tokens, cookies = api
    admin, cashier = headers(tokens, "admin"), headers(tokens, "cashier")
    pay = {**cashier, "Idempotency-Key": "till-7-0001"}
    first = client.post("/api/v1/subscribers/1/payments", json={"amount": "2.50"}, headers=pay)
    again = client.post("/api/v1/subscribers/1/payments", json={"amount": "2.50"}, headers=pay)
    assert first.status_code == again.status_code == 201
    assert first.json()["payment_id"] == again.json()["payment_id"] and again.json()["replayed"]
    assert ledger.balance("A") == 12_500_000_000  # charged once
    other = client.post("/api/v1/subscribers/2/payments", json={"amount": "2.50"}, headers=pay)
    assert other.status_code == 409 and "idempotency key" in other.json()["detail"]
    assert client.post("/api/v1/subscribers/1/payments", json={"amount": "2.50"}, headers=cashier).status_code == 422

    [card] = [c for _s, c in generate(ledger, 1, 3 * 10**9, "EUR", 2**62)]
    r = client.post("/api/v1/subscribers/2/cards", json={"code": card}, headers=cashier)
    assert r.status_code == 200 and ledger.balance("B") == 13 * 10**9
    assert client.post("/api/v1/subscribers/1/cards", json={"code": card}, headers=cashier).status_code in (409, 422)

    r = client.post("/api/v1/subscribers/2/block", json={"reason": "abuse report #12"}, headers=admin)
    assert r.status_code == 200 and r.json()["manually_blocked"] and ledger.manually_blocked() == [2]
    assert client.post("/api/v1/subscribers/2/block", json={"reason": "twice"}, headers=admin).status_code == 409
    assert client.post("/api/v1/subscribers/2/unblock", json={"reason": "ok"}, headers=admin).json()["blocked"] is False

    r = client.patch("/api/v1/subscribers/1", json={"tariff": "lab", "addresses": ["100.64.2.2/32"]}, headers=admin)
    assert r.status_code == 409 and "belongs to" in r.json()["detail"]  # B's address; nothing changed
    assert ledger.get_subscriber(1)["addresses"] == ["100.64.1.2/32"]

    log = AuditLog(ledger)
    actions = [(row["actor"], row["action"]) for row in log.rows(limit=100)]
    assert actions == [("token:cashier-token", "payment.add"), ("token:cashier-token", "card.activate"),
                       ("token:admin-token", "subscriber.block"), ("token:admin-token", "subscriber.unblock")]
    assert log.verify() == (True, None)
    assert all(tokens["cashier"] not in str(row) for row in log.rows(limit=100))


@pytest.mark.parametrize("body, says", [
    ({"name": "x", "tariff": "nope"}, "Input should be 'lab'"),
    ({"name": "x y", "tariff": "lab"}, "name"),
    ({"name": "x", "tariff": "lab", "balance": "1.5e3"}, "balance"),
    ({"name": "x", "tariff": "lab", "addresses": ["100.64.300.1/32"]}, "100.64.300.1"),
    ({"name": "x", "tariff": "lab", "surprise": 1}, "surprise"),
    ({"name": "A", "tariff": "lab"}, "exists"),
])
def test_bad_requests_say_what_is_wrong_and_change_nothing(api, body, says):
    client, ledger, tokens, cookies = api
    before = ledger.subscribers()
    r = client.post("/api/v1/subscribers", json=body, headers=headers(tokens, "admin"))
    assert 400 <= r.status_code < 500 and says in r.text
    assert ledger.subscribers() == before


def test_invoice_as_html_and_pdf(api):
    client, ledger, tokens, cookies = api
    h = headers(tokens, "operator")
    page = client.get("/api/v1/subscribers/1/invoice", headers=h)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and "A" in page.text
    pdf = client.get("/api/v1/subscribers/1/invoice?format=pdf", headers=h)
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")
    assert client.get("/api/v1/subscribers/99/invoice", headers=h).status_code == 404


def test_oversized_and_malformed_bodies(api):
    client, ledger, tokens, cookies = api
    admin = {**headers(tokens, "admin"), "Content-Type": "application/json"}
    assert client.post("/api/v1/subscribers", content=b"{" * (10 << 20), headers=admin).status_code == 413

    def chunks():
        for _ in range(11):
            yield b" " * (1 << 20)

    assert client.post("/api/v1/subscribers", content=chunks(), headers=admin).status_code == 413
    assert client.post("/api/v1/subscribers", content=b"{not json", headers=admin).status_code == 422
    assert client.get("/api/v1/subscribers?limit=0", headers=admin).status_code == 422
    assert client.get("/api/v1/usage?since=-5", headers=admin).status_code == 422


# ---- issue 11: /metrics only to the admin networks, JSON numbers that are not JSON, the minor unit ----------

def test_metrics_are_served_only_to_the_admin_networks(tmp_path):
    from prometheus_client import Gauge

    path = tmp_path / "tollgate.toml"
    path.write_text(lab_config(1))
    view = LedgerView(load_config(str(path)), tmp_path / "ledger.db")
    Gauge("tollgate_subscriber_balance", "balance", ["subscriber"], registry=view.registry).labels("s1").set(42)
    app = create_app(view)
    # "::ffff:..." is how a dual-stack socket (--listen ::) shows an IPv4 client
    for admin in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        r = TestClient(app, client=(admin, 50000)).get("/metrics")
        assert r.status_code == 200 and 'tollgate_subscriber_balance{subscriber="s1"} 42.0' in r.text, admin
    for subscriber in ("100.64.1.2", "2001:db8:100:1::2", "198.18.0.1", "::ffff:100.64.1.2"):
        r = TestClient(app, client=(subscriber, 40000)).get("/metrics")
        assert r.status_code == 403 and "admin_networks" in r.json()["detail"], subscriber
        assert "tollgate_subscriber_balance" not in r.text
    # the block page stays open to subscribers
    assert TestClient(app, client=("100.64.1.2", 40000)).get("/").status_code == 200


def json_routes(client) -> list[tuple[str, str]]:
    paths = client.get("/api/openapi.json").json()["paths"]
    return sorted((method.upper(), path) for path, ops in paths.items() for method, op in ops.items()
                  if "application/json" in op.get("requestBody", {}).get("content", {}))


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 5000])
def test_numbers_json_does_not_have_are_refused_on_every_json_route(api, token):
    client, ledger, tokens, cookies = api
    routes = json_routes(client)
    assert len(routes) == 9 and set(routes) == set(BODIES) - NOT_JSON_BODIES
    before = list(ledger.db.dump())
    for method, path in routes:
        body = BODIES[(method, path)]
        for field in body:  # in the place of each field in turn, and as an extra one
            text = json.dumps({**body, field: "__X__"}).replace('"__X__"', token)
            for content_type in ("application/json", "application/merge-patch+json"):
                r = client.request(method, path.replace("{sid}", "1"), content=text,
                                   headers={**headers(tokens, "admin"), "Content-Type": content_type,
                                            "Idempotency-Key": "nan-1"})
                assert r.status_code == 422, (method, path, field, r.status_code, r.text[:200])
                assert any(w in r.json()["detail"][0]["msg"] for w in ("RFC 8259", "out of range")), r.text
        r = client.request(method, path.replace("{sid}", "1"), content=f'[{token}]',
                           headers={**headers(tokens, "admin"), "Content-Type": "application/json"})
        assert r.status_code == 422
    assert list(ledger.db.dump()) == before


def test_a_validation_error_quoting_a_non_finite_number_still_renders(api):
    """The 422 handler is the second line: whatever reaches it, it renders (FastAPI's own gave a 500)."""
    from fastapi.exceptions import RequestValidationError

    client, *_ = api
    handler = client.app.exception_handlers[RequestValidationError]
    error = RequestValidationError([{"type": "string_type", "loc": ("body", "amount"), "msg": "Input should be a "
                                     "valid string", "input": float("nan"), "ctx": {"limit": float("-inf")}}])
    r = handler(None, error)
    assert r.status_code == 422
    assert json.loads(r.body)["detail"][0]["input"] == "nan" and json.loads(r.body)["detail"][0]["ctx"] == \
        {"limit": "-inf"}


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/api/v1/subscribers", {"name": "x", "tariff": "lab", "balance": "0.001"}),
    ("POST", "/api/v1/subscribers", {"name": "x", "tariff": "lab", "credit_limit": "1.005"}),
    ("PATCH", "/api/v1/subscribers/1", {"credit_limit": "0.001"}),
    ("POST", "/api/v1/subscribers/1/payments", {"amount": "0.001"}),
    ("POST", "/api/v1/subscribers/1/payments", {"amount": "10.009"}),
    ("POST", "/api/v1/subscribers/1/adjustments", {"amount": "-0.005", "reason": "x"}),
    ("POST", "/api/v1/cards", {"count": 1, "value": "0.001"}),
])
def test_amounts_finer_than_a_cent_are_refused(api, method, path, body):
    client, ledger, tokens, cookies = api
    before = list(ledger.db.dump())
    r = client.request(method, path, json=body, headers={**headers(tokens, "admin"), "Idempotency-Key": "fine-1"})
    assert r.status_code == 422, r.text
    assert list(ledger.db.dump()) == before


def test_the_api_listings_add_up_to_the_balance(api):
    from decimal import Decimal

    client, ledger, tokens, cookies = api
    h = headers(tokens, "admin")
    assert client.post("/api/v1/subscribers", json={"name": "c", "tariff": "lab", "balance": "1.10"},
                       headers=h).status_code == 201
    sid = ledger.get_subscriber("c")["id"]
    for i, amount in enumerate(("0.01", "2.500", "7")):
        assert client.post(f"/api/v1/subscribers/{sid}/payments", json={"amount": amount},
                           headers={**h, "Idempotency-Key": f"sum-{i}"}).status_code == 201
    assert client.post(f"/api/v1/subscribers/{sid}/adjustments", json={"amount": "-0.03", "reason": "x"},
                       headers=h).status_code == 201
    paid = sum(Decimal(p["amount"].split()[0]) for p in client.get(f"/api/v1/subscribers/{sid}/payments",
                                                                   headers=h).json())
    balance = Decimal(client.get(f"/api/v1/subscribers/{sid}", headers=h).json()["balance"].split()[0])
    assert balance == Decimal("1.10") + paid - Decimal("0.03") == Decimal("10.58")
    schema = client.get("/api/openapi.json").json()["components"]["schemas"]
    assert "{1,2}" in schema["Payment"]["properties"]["amount"]["pattern"]  # the schema says it too


# ---- issue 12: the bulk import and pages by cursor --------------------------------------------------------

def ndjson(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def test_bulk_import_all_or_nothing_with_every_bad_line(api):
    client, ledger, tokens, cookies = api
    admin = {**headers(tokens, "admin"), "Content-Type": "application/x-ndjson"}
    good = [{"name": f"n{i}", "tariff": "lab", "balance": "1.00", "addresses": [f"100.64.9.{i}/32"]} for i in range(1, 6)]
    bad = good + [{"name": "n6", "tariff": "lab", "balance": 1.5},  # line 6: a float
                  {"name": "n7", "tariff": "lab", "addresses": ["100.64.1.0/24"]},  # line 7: around A's /32
                  {"name": "n2", "tariff": "lab"}]  # line 8: line 2's name
    before = list(ledger.db.dump())
    r = client.post("/api/v1/subscribers:import", content=ndjson(bad), headers=admin)
    assert r.status_code == 422, r.text
    assert [d["loc"] for d in r.json()["detail"]] == [["body", "line", 6], ["body", "line", 7], ["body", "line", 8]]
    assert "float" in r.json()["detail"][0]["msg"] and "belongs to subscriber 1 (A)" in r.json()["detail"][1]["msg"]
    assert list(ledger.db.dump()) == before
    # only conflicts: 409, lines listed the same way
    r = client.post("/api/v1/subscribers:import", content=ndjson(good + [{"name": "A", "tariff": "lab"}]), headers=admin)
    assert r.status_code == 409 and r.json()["lines"][0]["loc"] == ["body", "line", 6] and r.json()["bad_lines"] == 1
    assert list(ledger.db.dump()) == before
    # the good ones: added, then the same body again changes nothing
    r = client.post("/api/v1/subscribers:import", content=ndjson(good), headers=admin)
    assert r.status_code == 200 and (r.json()["added"], r.json()["first_id"], r.json()["last_id"]) == (5, 3, 7)
    after = list(ledger.db.dump())
    again = client.post("/api/v1/subscribers:import", content=ndjson(good), headers=admin)
    assert again.status_code == 200 and again.json()["added"] == 0 and again.json()["imported_before"]
    assert list(ledger.db.dump()) == after
    csv = client.post("/api/v1/subscribers:import", content=b"name,tariff,addresses\nc1,lab,100.64.8.1/32\n",
                      headers={**admin, "Content-Type": "text/csv; charset=utf-8"})
    assert csv.status_code == 200 and csv.json()["added"] == 1 and ledger.get_subscriber("c1")["addresses"] == [
        "100.64.8.1/32"]
    [row] = [r for r in AuditLog(ledger).rows(limit=100) if r["action"] == "subscriber.import"][:1]
    assert row["actor"] == "token:admin-token" and row["after"]["count"] == 5
    # operators and cashiers may not import
    for who in ("operator", "cashier"):
        r = client.post("/api/v1/subscribers:import", content=ndjson(good), headers={**headers(tokens, who),
                                                                                   "Content-Type": "application/x-ndjson"})
        assert r.status_code == 403


def test_bulk_import_body_limits_and_types(api):
    client, ledger, tokens, cookies = api
    admin = {**headers(tokens, "admin"), "Content-Type": "application/x-ndjson"}
    before = list(ledger.db.dump())
    line = json.dumps({"name": "x", "tariff": "lab"}).encode() + b"\n"
    # more than 1 MiB is fine here (the route's own limit is 64 MiB) ...
    many = ndjson({"name": f"m{i}", "tariff": "lab", "contract": "c" * 40} for i in range(20_000))
    assert len(many) > 1 << 20
    r = client.post("/api/v1/subscribers:import", content=many, headers=admin)
    assert r.status_code == 200 and r.json()["added"] == 20_000
    after = list(ledger.db.dump())
    # ... more than 64 MiB is not, declared or streamed without a length
    assert client.post("/api/v1/subscribers:import", content=line * ((64 << 20) // len(line) + 1),
                       headers=admin).status_code == 413

    def chunks():
        for _ in range(65):
            yield b" " * (1 << 20)

    assert client.post("/api/v1/subscribers:import", content=chunks(), headers=admin).status_code == 413
    assert client.post("/api/v1/subscribers:import", content=line,
                       headers={**admin, "Content-Type": "text/plain"}).status_code == 415
    assert client.post("/api/v1/subscribers:import", content=b"{bad\n", headers=admin).status_code == 422
    assert list(ledger.db.dump()) == after and after != before
    # other routes keep their 1 MiB
    assert client.post("/api/v1/subscribers", content=b" " * ((1 << 20) + 1),
                       headers={**admin, "Content-Type": "application/json"}).status_code == 413


def test_pages_by_cursor_and_by_offset_agree(api):
    client, ledger, tokens, cookies = api
    h = headers(tokens, "operator")
    with ledger.transaction():
        for i in range(40):
            ledger.add_subscriber(f"p{i}", "lab", "EUR", 0, addresses=[f"100.64.20.{i}/32"])
    want = [s["id"] for s in ledger.subscribers()]
    seen, cursor = [], 0
    while True:
        page = client.get(f"/api/v1/subscribers?limit=7&after_id={cursor}", headers=h).json()
        assert page["total"] == len(want)
        seen += [s["id"] for s in page["items"]]
        if page["next_after_id"] is None:
            break
        cursor = page["next_after_id"]
    assert seen == want
    assert [s["id"] for off in range(0, 42, 7) for s in
            client.get(f"/api/v1/subscribers?limit=7&offset={off}", headers=h).json()["items"]] == want
    page = client.get("/api/v1/subscribers?limit=5&name=p1&after_id=3", headers=h).json()
    assert [s["name"] for s in page["items"]] == ["p1", "p10", "p11", "p12", "p13"] and page["total"] == 11
    assert client.get("/api/v1/subscribers?after_id=-1", headers=h).status_code == 422
