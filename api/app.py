"""The gateway's HTTP service: the admin API (``api/admin.py``), the
subscriber portal (``api/portal.py``), health, Prometheus metrics and the
block page.

The daemon serves this app on the portal port. A blocked subscriber's plain
HTTP is redirected here by the kernel (``policy``), with its source address
intact, so the page knows who is asking without a login: it shows why access
is paused, the balance, the usage and how to top up, and leads into the
portal. ``LedgerView`` serves the same app from a ledger alone, without the
gateway (``python -m api``).
"""

from __future__ import annotations

import html
import ipaddress
import re
import threading
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from accounting.ledger import Ledger
from accounting.money import format_volume
from accounting.operations import OperationError

MAX_BODY = 1 << 20  # bytes; a larger request body is refused before it is read


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
        self.local = threading.local()

    def thread_ledger(self) -> Ledger:
        led = getattr(self.local, "ledger", None)
        if led is None:
            led = self.local.ledger = Ledger.open(self.db_path)
        return led

    def health(self) -> dict:
        return {"status": "ok", "mode": "ledger only (no gateway in this process)"}

    def refresh_subscriber(self, sid: int) -> None:
        pass  # a gateway on the same ledger sees the change in its next flush round

    def subscriber_page(self, address: str) -> dict | None:
        try:
            addr = ipaddress.ip_address(address)
        except ValueError:
            return None
        ledger = self.thread_ledger()
        for row in ledger.subscribers():
            if row["active"] and any(addr in ipaddress.ip_network(n) for n in row["addresses"]):
                return subscriber_summary(ledger, self.config, row, blocked_reasons(ledger, row["id"]))
        return None


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


def render_block_page(info: dict | None, address: str, login_url: str = "/portal/login") -> str:
    esc = html.escape
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
    from .admin import admin_router

    app = FastAPI(title="Tollgate", version="1", docs_url="/api/docs", openapi_url="/api/openapi.json",
                  description="Admin API of a Tollgate gateway: subscribers, payments, blocks, usage, tokens "
                              "and the audit log. Authenticate with `Authorization: Bearer <token>` "
                              "(`tollgate token create NAME --role admin|operator|cashier`).")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        # refuse an oversized body by its declared length before reading it; a body sent without
        # a length (chunked) is counted as it arrives and refused once past the limit
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            return JSONResponse({"detail": f"the body is larger than {MAX_BODY} bytes"}, status_code=413)
        if declared is None and request.method in ("POST", "PUT", "PATCH"):
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY:
                    return JSONResponse({"detail": f"the body is larger than {MAX_BODY} bytes"}, status_code=413)
            request._body = body  # read once here; the route gets it from the cache
        return await call_next(request)

    @app.exception_handler(OperationError)
    def operation_error(request: Request, exc: OperationError) -> JSONResponse:
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
        return JSONResponse(view.health())

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
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
        status = 511 if info is not None and info["blocked"] else 200
        # Connection: close, because a connection the kernel redirected here stays redirected: a browser
        # keeping it alive would go on getting this page from the "upstream" after a top-up
        return HTMLResponse(render_block_page(info, address, portal_login_url(request)), status_code=status,
                            headers={"Cache-Control": "no-store", "Connection": "close"})

    return app
