"""The gateway's HTTP service: health, Prometheus metrics and the block page.

The daemon serves this app on the portal port. A blocked subscriber's plain
HTTP is redirected here by the kernel (``policy``), with its source address
intact, so the page knows who is asking without a login: it shows why access
is paused, the balance, the usage and how to top up. The full admin API and
the subscriber portal build on this app.
"""

from __future__ import annotations

import html
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class GatewayView(Protocol):
    """What the app needs from the running gateway."""

    registry: CollectorRegistry

    def health(self) -> dict: ...

    def subscriber_page(self, address: str) -> dict | None:
        """For the subscriber owning ``address``: name, blocked (bool), reason,
        balance, credit (formatted), usage rows (zone, direction, bytes), or None."""


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; padding: 0 1rem; color: #222; }}
h1 {{ font-size: 1.6rem; }} .reason {{ background: #fff3cd; border: 1px solid #e0c36a; padding: .8rem 1rem; border-radius: 6px; }}
table {{ border-collapse: collapse; width: 100%; margin: 1rem 0; }} td, th {{ text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #ddd; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }} .balance {{ font-size: 1.3rem; }}
</style></head><body>
<h1>{title}</h1>
{body}
</body></html>"""

REASONS = {
    "limit": "Your balance has run out, so Internet access is paused.",
    "manual": "Your access was paused by the operator.",
}


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    return str(n)


def render_block_page(info: dict | None, address: str) -> str:
    esc = html.escape
    if info is None:
        return PAGE.format(title="Not a subscriber", body=f"<p>The address {esc(address)} belongs to no subscriber "
                                                         "of this network. Ask the operator to register it.</p>")
    reasons = [REASONS.get(r, f"Access is paused ({esc(r)}).") for r in info.get("reasons", [])]
    title = "Internet access paused" if info["blocked"] else "Your account"
    rows = "".join(f"<tr><td>{esc(u['zone'])}</td><td>{esc(u['direction'])}</td><td class=n>{_bytes(u['bytes'])}</td></tr>"
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
    return PAGE.format(title=title, body="\n".join(body))


def create_app(view: GatewayView) -> FastAPI:
    app = FastAPI(title="Tollgate", docs_url="/api/docs", openapi_url="/api/openapi.json")

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
        address = request.client.host if request.client else ""
        info = view.subscriber_page(address)
        status = 511 if info is not None and info["blocked"] else 200
        return HTMLResponse(render_block_page(info, address), status_code=status,
                            headers={"Cache-Control": "no-store"})

    return app
