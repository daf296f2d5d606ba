"""The admin REST API under ``/api/v1`` (OpenAPI at ``/api/openapi.json``).

Callers present ``Authorization: Bearer tg_...`` (``tollgate token create``);
the token's role decides what it may do (``api.auth``: operator reads,
cashier reads and takes payments, admin does everything). Every route says
which permission it needs; a portal session is never accepted here.

The routes are thin: the work, its checks and its audit row are
``accounting.operations.Operations``, the same code the command line runs.
After a change to a subscriber the running gateway is asked to refresh it at
once; payments reach its live balance within 0.2 s.
"""

import ipaddress
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from starlette.concurrency import run_in_threadpool

from accounting.audit import AuditLog
from accounting.bulk import MAX_ERRORS
from accounting.money import get_currency
from accounting.operations import NAME, TEXT, Operations

from .app import BULK_MAX_BODY
from .auth import AuthError, Principal, TokenStore

# amounts are decimal strings of at most 9 integer digits and 9 decimals (a nano-unit: 64-bit internal
# units hold them with room for sums); the positive
# ones are spelled out so that the schema itself says "more than zero"
_FRACTION = "|".join(f"{'0' * k}[1-9][0-9]{{0,{8 - k}}}" for k in range(9))
POSITIVE = rf"(?:[1-9][0-9]{{0,8}}(?:\.[0-9]{{1,9}})?|0\.(?:{_FRACTION}))"
POSITIVE_MONEY = rf"^{POSITIVE}$"
NONZERO_MONEY = rf"^-?{POSITIVE}$"
MONEY = r"^-?[0-9]{1,9}(\.[0-9]{1,9})?$"
NOT_NEGATIVE_MONEY = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"


def money_patterns(digits: int) -> dict[str, str]:
    """The amount patterns above for a currency that shows ``digits`` decimals (EUR 2, JPY 0): an amount
    finer than that is refused by the schema as Operations refuses it ("0.001" EUR would be shown as 0.00
    EUR and the listings would no longer add up). Trailing zeros are fine: "1.000" EUR is one euro."""
    fraction = rf"(?:\.[0-9]{{1,{digits}}}0{{0,{9 - digits}}})?" if digits else r"(?:\.0{1,9})?"
    small = "|".join(f"{'0' * k}[1-9][0-9]{{0,{digits - 1 - k}}}" for k in range(digits))
    positive = rf"(?:[1-9][0-9]{{0,8}}{fraction}" + (rf"|0\.(?:{small})0{{0,{9 - digits}}})" if digits else ")")
    return {"money": rf"^-?[0-9]{{1,9}}{fraction}$", "not_negative": rf"^[0-9]{{1,9}}{fraction}$",
            "positive": rf"^{positive}$", "nonzero": rf"^-?{positive}$"}

REFRESH_AT_ONCE = 100  # an import of up to this many asks the running gateway to load each at once
NETWORK = r"^[0-9A-Fa-f:.]{2,45}(/[0-9]{1,3})?$"
MAX_TS = 2**62
SubscriberId = Annotated[int, Path(ge=1, le=2**31, description="the subscriber's id")]
Since = Annotated[int | None, Query(ge=0, le=2**40, description="from this epoch second on")]
Until = Annotated[int | None, Query(ge=0, le=2**40, description="before this epoch second")]

ERRORS = {400: {"description": "the body cannot be read"}, 401: {"description": "no valid admin token"}, 403: {"description": "the token's role may not do this"},
          413: {"description": "the body is larger than 1 MiB"}}
NOT_FOUND = {404: {"description": "no such subscriber (or card)"}}
CONFLICT = {409: {"description": "conflicts with the ledger's state (a name or address taken, a key reused)"}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubscriberIn(Strict):
    name: str = Field(pattern=NAME, description="unique; letters, digits, . _ @ -")
    tariff: str = Field(min_length=1, max_length=64)
    addresses: list[Annotated[str, Field(pattern=NETWORK)]] = Field(default=[], max_length=64,
                                                                   description="IPv4/IPv6 addresses or prefixes")
    balance: str = Field(default="0", pattern=MONEY, description="opening balance, e.g. 10.00")
    credit_limit: str = Field(default="0", pattern=NOT_NEGATIVE_MONEY)
    contract: str | None = Field(default=None, min_length=1, max_length=64, pattern=TEXT)


class SubscriberPatch(Strict):
    tariff: str | None = Field(default=None, min_length=1, max_length=64)
    effective_ns: StrictInt | None = Field(default=None, ge=0, le=MAX_TS,
                                     description="when a tariff change applies (default now)")
    credit_limit: str | None = Field(default=None, pattern=NOT_NEGATIVE_MONEY)
    addresses: list[Annotated[str, Field(pattern=NETWORK)]] | None = Field(default=None, max_length=64)
    active: StrictBool | None = None  # true or false, not 0 or "yes"


class PaymentIn(Strict):
    amount: str = Field(pattern=POSITIVE_MONEY, description="more than zero, e.g. 10.00")
    method: str = Field(default="api", pattern=NAME)
    comment: str | None = Field(default=None, max_length=500, pattern=TEXT)


class AdjustmentIn(Strict):
    amount: str = Field(pattern=NONZERO_MONEY, description="positive or negative, not zero")
    reason: str = Field(min_length=1, max_length=500, pattern=TEXT)


class ReasonIn(Strict):
    reason: str = Field(min_length=1, max_length=500, pattern=TEXT)


class CardsIn(Strict):
    count: int = Field(ge=1, le=1000)
    value: str = Field(pattern=POSITIVE_MONEY)
    days: int = Field(default=365, ge=1, le=3650, description="valid for this many days")


class CardIn(Strict):
    code: str = Field(min_length=1, max_length=64, pattern=TEXT)


class TokenIn(Strict):
    name: str = Field(pattern=NAME)
    role: Literal["admin", "operator", "cashier"]


class Subscriber(BaseModel):
    id: int
    name: str
    contract: str | None
    tariff: str
    currency: str
    balance: str
    credit_limit: str
    active: bool
    addresses: list[str]
    blocked: bool
    block_reason: str | None
    manually_blocked: bool


class SubscriberPage(BaseModel):
    total: int = Field(description="how many subscribers match the filters (all of them, not after the cursor)")
    limit: int
    offset: int
    after_id: int = Field(0, description="the cursor this page starts after")
    next_after_id: int | None = Field(None, description="the cursor of the next page; null on the last")
    items: list[Subscriber]


class ImportLineError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ImportResult(BaseModel):
    source: str
    file_sha256: str
    lines: int = Field(description="subscribers in the file")
    added: int
    unchanged: int = Field(description="lines whose subscriber was in the ledger with the same values already")
    first_id: int | None
    last_id: int | None
    addresses: int = 0
    imported_before: int | None = Field(None, description="the audit row of the import of this same body before, "
                                                          "if there was one (then nothing was read or written)")


def admin_address(client: str, networks) -> bool:
    """True if ``client`` is inside one of ``networks`` (gateway.admin_networks): the callers that may reach
    /api/v1 and /metrics."""
    try:
        addr = ipaddress.ip_address(client)
    except ValueError:
        return False
    addr = getattr(addr, "ipv4_mapped", None) or addr  # a dual-stack socket's view of an IPv4 client
    return any(addr in ipaddress.ip_network(n) for n in networks)


def admin_router(view) -> APIRouter:
    """``view``: ``thread_ledger()``, ``config``, ``refresh_subscriber(sid)`` (``api.app.GatewayView``)."""
    router = APIRouter(prefix="/api/v1", responses=ERRORS)
    # the configured tariffs and zones, as enums in the OpenAPI document
    tariff_name = Literal[tuple(sorted(view.config.tariffs))]
    zone_name = Literal[tuple(view.config.zones.names)]

    # amounts in the currency's minor unit (money_patterns): the schema says what Operations checks
    digits = get_currency(view.config.currency).minor_digits
    money = money_patterns(digits)
    step = f"at most {digits} decimals" if digits else "no decimals"

    class NewSubscriber(SubscriberIn):
        tariff: tariff_name
        balance: str = Field(default="0", pattern=money["money"], description=f"opening balance, e.g. 10.00 ({step})")
        credit_limit: str = Field(default="0", pattern=money["not_negative"], description=step)

    class SubscriberChange(SubscriberPatch):
        tariff: tariff_name | None = None
        credit_limit: str | None = Field(default=None, pattern=money["not_negative"], description=step)

    class Payment(PaymentIn):
        amount: str = Field(pattern=money["positive"], description=f"more than zero, e.g. 10.00 ({step})")

    class Adjustment(AdjustmentIn):
        amount: str = Field(pattern=money["nonzero"], description=f"positive or negative, not zero ({step})")

    class Cards(CardsIn):
        value: str = Field(pattern=money["positive"], description=step)

    bearer = HTTPBearer(auto_error=False, description="a token from `tollgate token create`")

    def caller(permission: str):
        def check(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
            client = request.client.host if request.client else "?"
            if not admin_address(client, view.config.admin_networks):
                raise HTTPException(403, "the admin API is not served to this address (gateway.admin_networks)")
            # no rate limit on tokens: they are 256 random bits (not guessed), and checking one is a
            # hash and an index lookup; password logins (the portal) are the ones limited
            who = TokenStore(view.thread_ledger()).verify(creds.credentials) if creds else None
            if who is None:
                raise HTTPException(401, "a valid admin token is required: Authorization: Bearer tg_...",
                                    headers={"WWW-Authenticate": "Bearer"})
            if not who.can(permission):
                raise HTTPException(403, f"role {who.role} may not {permission}")
            return who

        return Depends(check)

    def ops(who: Principal) -> Operations:
        return Operations(view.thread_ledger(), view.config, who.actor)

    def changed(sid: int) -> None:
        view.refresh_subscriber(sid)

    # ---- subscribers ----------------------------------------------------------------

    @router.get("/subscribers", response_model=SubscriberPage, summary="List subscribers, a page at a time")
    def list_subscribers(who: Principal = caller("read"), limit: int = Query(100, ge=1, le=1000),
                         offset: int = Query(0, ge=0, le=2**31), tariff: str | None = Query(None, max_length=64),
                         active: bool | None = None, name: str | None = Query(None, max_length=64),
                         after_id: int = Query(0, ge=0, le=2**62, description="a cursor: the page after this id "
                                               "(next_after_id of the page before); as fast deep down as at the "
                                               "start, unlike offset")):
        return ops(who).list(limit, offset, tariff, active, name, after_id)

    @router.post("/subscribers:import", response_model=ImportResult, responses={
        **CONFLICT, 413: {"description": f"the body is larger than {BULK_MAX_BODY} bytes"},
        415: {"description": "not JSON lines or CSV"},
        422: {"description": "bad lines, each with its number (nothing was written)"}},
        summary="Add many subscribers at once, all or nothing (JSON lines or CSV, as `tollgate subscriber import`)",
        description="One subscriber a line, as `tollgate subscriber export` writes them: JSON lines "
                    "(`application/x-ndjson`) or CSV with a header (`text/csv`). Every line is checked as "
                    "`POST /subscribers` checks one, and no address may overlap another of the body or the ledger; "
                    "any bad line refuses the whole body (422, or 409 for conflicts, with every bad line's number, "
                    f"the first {MAX_ERRORS}) and nothing is written. Lines whose subscriber exists with the same "
                    f"values are left alone, so sending the same body again changes nothing. Bodies up to "
                    f"{BULK_MAX_BODY >> 20} MiB.",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/x-ndjson": {"schema": {"type": "string"}}, "text/csv": {"schema": {"type": "string"}}}}})
    async def import_subscribers(request: Request, who: Principal = caller("write")):
        kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        fmt = {"application/x-ndjson": "jsonl", "application/jsonl": "jsonl", "application/json": "jsonl",
               "text/csv": "csv"}.get(kind)
        if fmt is None:
            raise HTTPException(415, "send JSON lines (Content-Type: application/x-ndjson) or CSV (text/csv)")
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a body without a length is bounded too
            size += len(chunk)
            if size > BULK_MAX_BODY:
                raise HTTPException(413, f"the body is larger than {BULK_MAX_BODY} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        del chunks
        # the checks and the transaction are blocking work: in the thread pool, on that thread's ledger
        done = await run_in_threadpool(lambda: ops(who).import_subscribers(body, fmt, f"api:{who.actor}"))
        if done["added"] and done["added"] <= REFRESH_AT_ONCE:
            for sid in range(done["first_id"], done["last_id"] + 1):
                changed(sid)  # a large import reaches the running gateway through the ledger's change feed
        return done

    @router.post("/subscribers", status_code=201, response_model=Subscriber, responses=CONFLICT,
                 summary="Create a subscriber")
    def add_subscriber(body: NewSubscriber, who: Principal = caller("write")):
        sub = ops(who).add(body.name, body.tariff, body.addresses, body.balance, body.credit_limit, body.contract)
        changed(sub["id"])
        return sub

    @router.get("/subscribers/{sid}", response_model=Subscriber, responses=NOT_FOUND)
    def get_subscriber(sid: SubscriberId, who: Principal = caller("read")):
        return ops(who).get(sid)

    @router.patch("/subscribers/{sid}", response_model=Subscriber, responses={**NOT_FOUND, **CONFLICT},
                  summary="Change tariff (at effective_ns), credit limit, addresses or active")
    def update_subscriber(sid: SubscriberId, body: SubscriberChange, who: Principal = caller("write")):
        sub = ops(who).update(sid, body.tariff, body.effective_ns, body.credit_limit, body.addresses, body.active)
        changed(sid)
        return sub

    @router.delete("/subscribers/{sid}", response_model=Subscriber, responses=NOT_FOUND,
                   summary="Deactivate a subscriber (its history stays)")
    def deactivate_subscriber(sid: SubscriberId, who: Principal = caller("write")):
        sub = ops(who).deactivate(sid)
        changed(sid)
        return sub

    @router.post("/subscribers/{sid}/block", response_model=Subscriber, responses={**NOT_FOUND, **CONFLICT},
                 summary="Block by hand, with a reason (until unblocked; survives restarts)")
    def block(sid: SubscriberId, body: ReasonIn, who: Principal = caller("write")):
        sub = ops(who).block(sid, body.reason)
        changed(sid)
        return sub

    @router.post("/subscribers/{sid}/unblock", response_model=Subscriber, responses={**NOT_FOUND, **CONFLICT})
    def unblock(sid: SubscriberId, body: ReasonIn, who: Principal = caller("write")):
        sub = ops(who).unblock(sid, body.reason)
        changed(sid)
        return sub

    # ---- money ----------------------------------------------------------------------

    @router.post("/subscribers/{sid}/payments", status_code=201, responses={**NOT_FOUND, **CONFLICT},
                 summary="Top up; the same Idempotency-Key again returns the first payment")
    def topup(sid: SubscriberId, body: Payment, who: Principal = caller("payments"),
              idempotency_key: str = Header(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")):
        return ops(who).topup(sid, body.amount, idempotency_key, body.method, body.comment)

    @router.get("/subscribers/{sid}/payments", responses=NOT_FOUND)
    def payments(sid: SubscriberId, who: Principal = caller("read")):
        return ops(who).payments(sid)

    @router.post("/subscribers/{sid}/adjustments", status_code=201, responses=NOT_FOUND,
                 summary="Correct a balance by an amount, with a reason")
    def adjust(sid: SubscriberId, body: Adjustment, who: Principal = caller("payments")):
        return ops(who).adjust(sid, body.amount, body.reason)

    @router.post("/subscribers/{sid}/cards", responses={**NOT_FOUND, **CONFLICT,
                                                         429: {"description": "too many wrong codes lately"}},
                 summary="Activate a prepaid card for the subscriber")
    def activate_card(sid: SubscriberId, body: CardIn, who: Principal = caller("payments")):
        return ops(who).activate_card(sid, body.code)

    @router.post("/cards", status_code=201, summary="Generate prepaid cards (the codes are shown this once)")
    def generate_cards(body: Cards, who: Principal = caller("payments")):
        return ops(who).generate_cards(body.count, body.value, body.days)

    @router.get("/subscribers/{sid}/invoice", responses={**NOT_FOUND, 200: {
        "description": "the invoice", "content": {"text/html": {}, "application/pdf": {}}}},
                summary="The invoice of the billing period holding `at` (default: the last one ended)")
    def invoice(sid: SubscriberId, who: Principal = caller("read"),
                at: int | None = Query(None, ge=0, le=2**33, description="an epoch second in the period"),
                format: Literal["html", "pdf"] = "html"):
        from accounting.invoice import render_html, render_pdf

        inv = ops(who).invoice(sid, None if at is None else at * 10**9)
        if format == "pdf":
            return Response(render_pdf(inv), media_type="application/pdf",
                            headers={"Content-Disposition": f'inline; filename="{inv.number}.pdf"'})
        return HTMLResponse(render_html(inv))

    # ---- usage ----------------------------------------------------------------------

    @router.get("/usage", responses=NOT_FOUND, summary="Usage totals by subscriber, zone, direction and day over a time range")
    def usage(who: Principal = caller("read"), subscriber: int | None = Query(None, ge=1, le=2**31),
              since: Since = None, until: Until = None, zone: zone_name | None = None,
              direction: Literal["upload", "download"] | None = None,
              by: list[Literal["subscriber", "zone", "direction", "day"]] = Query(["zone", "direction"])):
        return ops(who).usage(subscriber, since, until, tuple(dict.fromkeys(by)), zone, direction)

    @router.get("/usage/top", summary="The subscribers with the most bytes over a time range")
    def top(who: Principal = caller("read"), n: int = Query(10, ge=1, le=1000), since: Since = None,
            until: Until = None):
        return ops(who).top(n, since, until)

    @router.get("/tariffs", summary="Tariffs of the configuration")
    def tariffs(who: Principal = caller("read")):
        return [{"name": name, "spec": getattr(t, "spec", None)} for name, t in sorted(view.config.tariffs.items())]

    @router.get("/zones", summary="Zones, in the order the engine numbers them")
    def zones(who: Principal = caller("read")):
        return [{"id": i, "name": name} for i, name in enumerate(view.config.zones.names)]

    # ---- tokens and the audit log (admin) ---------------------------------------------

    @router.get("/tokens", summary="API tokens (never their secrets)")
    def tokens(who: Principal = caller("tokens")):
        return TokenStore(view.thread_ledger()).list()

    @router.post("/tokens", status_code=201, responses=CONFLICT, summary="A new token; its secret is shown once")
    def create_token(body: TokenIn, who: Principal = caller("tokens")):
        ledger = view.thread_ledger()
        with ledger.transaction():
            try:
                token = TokenStore(ledger).create(body.name, body.role)
            except AuthError as exc:
                raise HTTPException(409 if "exists" in str(exc) else 422, str(exc)) from None
            AuditLog(ledger).append(who.actor, "token.create", f"token:{body.name}", None,
                                    {"name": body.name, "role": body.role})
        return {"name": body.name, "role": body.role, "token": token}

    @router.delete("/tokens/{name}", responses={404: {"description": "no such token"}})
    def revoke_token(name: Annotated[str, Path(pattern=NAME)], who: Principal = caller("tokens")):
        ledger = view.thread_ledger()
        with ledger.transaction():
            if TokenStore(ledger).get(name) is None:
                raise HTTPException(404, f"no token {name!r}")
            revoked = TokenStore(ledger).revoke(name)
            AuditLog(ledger).append(who.actor, "token.revoke", f"token:{name}", None, {"revoked": revoked})
        return {"name": name, "revoked": True}

    @router.get("/audit", summary="The audit log (hash-chained), oldest first after an id")
    def audit(who: Principal = caller("tokens"), after_id: int = Query(0, ge=0, le=2**62),
              limit: int = Query(100, ge=1, le=1000)):
        log = AuditLog(view.thread_ledger())
        ok, bad = log.verify()
        return {"intact": ok, "first_bad_id": bad, "rows": log.rows(limit=limit, after_id=after_id)}

    return router
