"""The gateway's HTTP service: the admin API (``api/admin.py``), the
subscriber portal (``api/portal.py``), health, Prometheus metrics and the
block page.

The daemon serves this app on the portal port. A blocked subscriber's plain
HTTP is redirected here by the kernel (``policy``), with its source address
intact, so the page knows who is asking without a login: it shows why access
is paused, the balance, the usage and how to top up, and leads into the
portal. ``LedgerView`` serves the same app from a ledger alone, without the
gateway (``tollgate api``).
"""

from __future__ import annotations

import html
import ipaddress
import json
import math
import re
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from accounting.ledger import Ledger
from accounting.thread_ledgers import ThreadLedgers
from accounting.money import format_volume
from accounting.operations import ImportRefused, OperationError

MAX_BODY = 1 << 20  # bytes; a larger request body is refused before it is read
# the bulk import (POST /api/v1/subscribers:import) takes files of subscribers: ~100 B a line, so 64 MiB is
# some 600k subscribers a request; its route reads the body as a stream and counts it (api/admin.py)
BULK_MAX_BODY = 64 << 20
BULK_PATHS = ("/api/v1/subscribers:import",)


class _NotJSON(Exception):
    """A body Python's json module reads but JSON does not allow."""


def _constant(name: str):
    # Python's json takes NaN, Infinity and -Infinity; JSON (RFC 8259, section 6) has no such numbers
    raise _NotJSON(f"{name} is not a JSON number (RFC 8259 section 6)")


def _real(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf: a number no route can take
        raise _NotJSON(f"the number {text[:40]} is out of range")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # Python's limit on the digits of an int (4300): nothing here is that long
        raise _NotJSON(f"an integer of {len(text)} digits is out of range") from None


def non_json_number(body: bytes) -> str | None:
    """Why a JSON body is refused before any route sees it (NaN, Infinity, a number out of range), or None.
    Malformed JSON is None too: FastAPI's own 422 says where it breaks."""
    try:
        json.loads(body, parse_constant=_constant, parse_float=_real, parse_int=_integer)
    except _NotJSON as exc:
        return str(exc)
    except (ValueError, RecursionError):
        return None
    return None


def _is_json(content_type: str | None) -> bool:
    """A body FastAPI would parse as JSON (application/json, application/*+json, or no type at all)."""
    if not content_type:
        return True
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _renderable(value):
    """``value`` with non-finite floats replaced by their text, so that a response quoting them back can be
    rendered (the JSON encoder refuses NaN and the infinities)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _renderable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_renderable(v) for v in value]
    return value


class GatewayView(Protocol):
    """What the app needs from the running gateway (or from a ledger alone)."""

    registry: CollectorRegistry
    config: object  # gateway.config.Config

    def health(self) -> dict: ...

    def thread_ledger(self) -> Ledger:
        """This thread's own connection to the ledger."""

    def refresh_subscriber(self, sid: int) -> None:
        """The ledger changed this subscriber: bring the engine and the kernel in line."""

    def subscriber_page(self, address: str) -> dict | None:
        """For the subscriber owning ``address``: id, name, blocked (bool), reasons,
        balance, credit (formatted), usage rows (zone, direction, bytes), or None."""


class LedgerView:
    """The app's view of a ledger with no gateway running: changes land in
    the ledger, where a gateway started later (or running elsewhere on the
    same file) picks them up."""

    def __init__(self, config, db_path) -> None:
        self.config = config
        self.db_path = db_path
        self.registry = CollectorRegistry()
        self.ledgers = ThreadLedgers(db_path)  # on PostgreSQL: one pool for every request thread

    def thread_ledger(self) -> Ledger:
        return self.ledgers.get()

    def health(self) -> dict:
        return {"status": "ok", "mode": "ledger only (no gateway in this process)"}

    def refresh_subscriber(self, sid: int) -> None:
        pass  # a gateway on the same ledger sees the change in its next flush round

    def subscriber_page(self, address: str) -> dict | None:
        ledger = self.thread_ledger()
        sid = owner_of(ledger, address)
        if sid is None:
            return None
        return subscriber_summary(ledger, self.config, ledger.get_subscriber(sid), blocked_reasons(ledger, sid))


def owner_of(ledger: Ledger, address: str) -> int | None:
    """The active subscriber whose longest prefix holds ``address``, as the engine decides
    (``ext.engine_py.EnginePy.lookup_subscriber``: longest match over the active subscribers, the only
    ones it loads); None for nobody's. The ledger's prefixes are canonical text, so the candidates are
    exactly the address's own supernets, one per prefix length: 33 (IPv4) or 129 (IPv6) index lookups,
    whatever the number of subscribers."""
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return None
    mapped = getattr(addr, "ipv4_mapped", None)  # a dual-stack socket's view of an IPv4 client
    addr = mapped or addr
    nets = [str(ipaddress.ip_network(addr).supernet(new_prefix=p)) for p in range(addr.max_prefixlen + 1)]
    rows = ledger.db.execute(
        f"SELECT a.network, a.subscriber_id FROM addresses a JOIN subscribers s ON s.id = a.subscriber_id"
        f" WHERE s.active = 1 AND a.network IN ({', '.join('?' * len(nets))})", nets).fetchall()
    if not rows:
        return None
    return max(rows, key=lambda r: ipaddress.ip_network(r[0]).prefixlen)[1]


def blocked_reasons(ledger: Ledger, sid: int) -> list[str]:
    """Why the ledger says the subscriber is blocked now (its last block record), as page reason keys."""
    reason = ledger.block_reason(sid)
    if reason is None:
        return []
    return ["manual" if reason.startswith("manual") else reason]


def subscriber_summary(ledger: Ledger, config, row: dict, reasons: list[str], balance: int | None = None) -> dict:
    """What the block page and the portal show of a subscriber."""
    from accounting.money import format_amount

    names = config.zones.names
    usage = [{"zone": names[u["zone"]] if u["zone"] < len(names) else str(u["zone"]),
              "direction": ("upload", "download")[u["direction"]], "bytes": u["bytes"]}
             for u in ledger.usage_by_zone(row["id"])]
    return {"id": row["id"], "name": row["name"], "blocked": bool(reasons), "reasons": reasons,
            "balance": format_amount(row["balance"] if balance is None else balance, row["currency"]),
            "credit": format_amount(row["credit_limit"], row["currency"]) if row["credit_limit"] else "",
            "tariff": row["tariff"], "usage": usage}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; padding: 0 1rem; color: #222; }}
h1 {{ font-size: 1.6rem; }} .reason {{ background: #fff3cd; border: 1px solid #e0c36a; padding: .8rem 1rem; border-radius: 6px; }}
table {{ border-collapse: collapse; width: 100%; margin: 1rem 0; }} td, th {{ text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #ddd; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }} .balance {{ font-size: 1.3rem; }}
a.button {{ display: inline-block; background: #1a5fb4; color: #fff; padding: .6rem 1rem; border-radius: 4px;
  text-decoration: none; font-size: 1.1rem; }}
</style></head><body>
<h1>{title}</h1>
{body}
</body></html>"""

REASONS = {
    "limit": "Your balance has run out, so Internet access is paused.",
    "manual": "Your access was paused by the operator.",
}


def portal_login_url(request: Request) -> str:
    """The portal's login page at the gateway address the request reached. The browser's Host names
    the upstream it asked for (the kernel redirected the connection), so only the socket's own
    address leads back to the gateway; with its port, which is open to subscribers blocked or not."""
    server = request.scope.get("server")
    if not server or not server[0]:
        return "/portal/login"
    host, port = server[0], server[1]
    try:
        addr = ipaddress.ip_address(host)
        mapped = getattr(addr, "ipv4_mapped", None)  # a dual-stack socket's view of an IPv4 client
        host = str(mapped) if mapped else (f"[{addr}]" if addr.version == 6 else str(addr))
    except ValueError:
        pass  # a name (tests, a unix socket's path): used as it is
    return f"http://{host}{'' if port in (80, None) else f':{port}'}/portal/login"


def render_block_page(info: dict | None, address: str, login_url: str = "/portal/login", guests: bool = False) -> str:
    esc = html.escape
    if info is None and guests:  # [sessions] portal_login (issue 15): a guest's device logs in or redeems a voucher
        return PAGE.format(title="Log in to use the Internet", body=(
            f"<p>This device ({esc(address)}) is not logged in.</p><p>Redeem a voucher or log in to your "
            f'account:</p><p><a class=button id=portal-login href="{esc(login_url)}">Log in or redeem a voucher'
            "</a></p>"))
    if info is None:
        return PAGE.format(title="Not a subscriber", body=f"<p>The address {esc(address)} belongs to no subscriber "
                                                         "of this network. Ask the operator to register it.</p>")
    reasons = [REASONS.get(r, f"Access is paused ({esc(r)}).") for r in info.get("reasons", [])]
    title = "Internet access paused" if info["blocked"] else "Your account"
    rows = "".join(f"<tr><td>{esc(u['zone'])}</td><td>{esc(u['direction'])}</td><td class=n>{format_volume(u['bytes'])}</td></tr>"
                   for u in info.get("usage", []))
    body = []
    if reasons:
        body.append("<div class=reason>" + "<br>".join(esc(r) for r in reasons) + "</div>")
    body.append(f"<p>Subscriber <b>{esc(info['name'])}</b> ({esc(address)})</p>")
    body.append(f"<p class=balance>Balance: <b id=balance>{esc(info['balance'])}</b>"
                + (f" (credit limit {esc(info['credit'])})" if info.get("credit") else "") + "</p>")
    if rows:
        body.append("<h2>Usage</h2><table><tr><th>zone</th><th>direction</th><th>volume</th></tr>" + rows + "</table>")
    if info["blocked"]:
        body.append("<h2>How to top up</h2><p>Pay at the office or activate a prepaid card in your personal page. "
                    "Access resumes within a second of the payment; this page and DNS keep working meanwhile.</p>")
    label = "Log in to your account to top up" if info["blocked"] else "Log in to your account"
    body.append(f'<p><a class=button id=portal-login href="{esc(login_url)}">{label}</a></p>')
    return PAGE.format(title=title, body="\n".join(body))


def create_app(view: GatewayView) -> FastAPI:
    from .admin import admin_address, admin_router

    app = FastAPI(title="Tollgate", version="1", docs_url="/api/docs", openapi_url="/api/openapi.json",
                  description="Admin API of a Tollgate gateway: subscribers, payments, blocks, usage, tokens "
                              "and the audit log. Authenticate with `Authorization: Bearer <token>` "
                              "(`tollgate token create NAME --role admin|operator|cashier`).")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        # refuse an oversized body by its declared length before reading it; a body sent without
        # a length (chunked) is counted as it arrives and refused once past the limit
        declared = request.headers.get("content-length")
        if request.url.path in BULK_PATHS:  # its own, larger limit, counted by the route as the body streams
            if declared is not None and (not declared.isdigit() or int(declared) > BULK_MAX_BODY):
                return JSONResponse({"detail": f"the body is larger than {BULK_MAX_BODY} bytes"}, status_code=413)
            return await call_next(request)
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            return JSONResponse({"detail": f"the body is larger than {MAX_BODY} bytes"}, status_code=413)
        if declared is None and request.method in ("POST", "PUT", "PATCH"):
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY:
                    return JSONResponse({"detail": f"the body is larger than {MAX_BODY} bytes"}, status_code=413)
            request._body = body  # read once here; the route gets it from the cache
        if request.method in ("POST", "PUT", "PATCH") and _is_json(request.headers.get("content-type")):
            reason = non_json_number(await request.body())  # at most MAX_BODY bytes, checked above
            if reason is not None:
                return JSONResponse({"detail": [{"loc": ["body"], "msg": reason, "type": "json_invalid"}]}, 422)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler, but one that can render what it quotes back: a value the body parser let
        # through that JSON cannot hold must still give this 422, not a 500 from the encoder
        return JSONResponse({"detail": _renderable(jsonable_encoder(exc.errors()))}, 422)

    @app.exception_handler(OperationError)
    def operation_error(request: Request, exc: OperationError) -> JSONResponse:
        if isinstance(exc, ImportRefused):  # every bad line (up to accounting.bulk.MAX_ERRORS) with its number
            lines = [{"loc": ["body", "line", line], "msg": reason, "type": "value_error"} for line, reason in exc.errors]
            if exc.status == 422:
                return JSONResponse({"detail": lines, "bad_lines": exc.bad}, 422)
            return JSONResponse({"detail": str(exc), "lines": lines, "bad_lines": exc.bad}, exc.status)
        if exc.status == 422:  # the shape FastAPI documents for 422: a list of what is wrong
            return JSONResponse({"detail": [{"loc": ["body"], "msg": str(exc), "type": "value_error"}]}, 422)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    def allowed_methods(path: str) -> list[str]:
        """The methods the OpenAPI document lists for ``path`` (empty: no such path)."""
        for template, operations in app.openapi()["paths"].items():
            if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)), path):
                return sorted(m.upper() for m in operations)
        return []

    @app.exception_handler(405)
    def method_not_allowed(request: Request, exc) -> JSONResponse:
        methods = allowed_methods(request.url.path)
        return JSONResponse({"detail": "method not allowed"}, 405, headers={"Allow": ", ".join(methods)})

    app.include_router(admin_router(view))
    from .portal import portal_router

    app.include_router(portal_router(view))

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        health = view.health()  # 503 unless ok: a monitor that reads only the status code sees a dead thread
        return JSONResponse(health, status_code=200 if health.get("status") == "ok" else 503)

    @app.get("/metrics", responses={403: {"description": "not served to this address (gateway.admin_networks)"}})
    def metrics(request: Request) -> PlainTextResponse:
        # every subscriber's balance and bytes are in here, and subscribers reach this port (block page,
        # portal): only the admin networks may scrape it, as only they reach /api/v1
        client = request.client.host if request.client else "?"
        if not admin_address(client, view.config.admin_networks):
            return JSONResponse({"detail": "/metrics is not served to this address (gateway.admin_networks)"}, 403)
        return PlainTextResponse(generate_latest(view.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/{path:path}", response_class=HTMLResponse, include_in_schema=False)
    def block_page(request: Request, path: str) -> HTMLResponse:
        # Whatever URL the browser asked for (the kernel redirected it here):
        # answer with the page, never a redirect loop. 511 tells clients and
        # captive-portal detectors that the network wants attention (RFC 6585).
        if path.startswith("api/"):  # an API path asked with a method it does not have
            methods = allowed_methods("/" + path)
            if methods:
                return JSONResponse({"detail": "method not allowed"}, 405, headers={"Allow": ", ".join(methods)})
            return JSONResponse({"detail": "no such API path"}, 404)
        address = request.client.host if request.client else ""
        info = view.subscriber_page(address)
        guests = bool(getattr(getattr(view.config, "sessions", None), "portal_login", False))
        status = 511 if info is not None and info["blocked"] or info is None and guests else 200
        # Connection: close, because a connection the kernel redirected here stays redirected: a browser
        # keeping it alive would go on getting this page from the "upstream" after a top-up
        return HTMLResponse(render_block_page(info, address, portal_login_url(request), guests), status_code=status,
                            headers={"Cache-Control": "no-store", "Connection": "close"})

    return app
