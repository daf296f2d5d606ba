"""The subscriber portal under ``/portal``: server-rendered HTML, no JavaScript.

A subscriber logs in with their contract number (or name) and the password
set by ``tollgate subscriber password NAME``, then sees their balance, credit
limit, tariff, whether access is paused and why, the usage of the last 30
days (by day, as an inline SVG chart, and by zone), the payments, and can
activate a prepaid card, switch to a tariff the operator marked
``selectable = true`` and log out. Every change goes through
``accounting.operations.Operations`` with the actor ``portal:<subscriber id>``,
so it has its audit row like a change made by an operator.

Security, in short:

- the session is a cookie ``tg_portal`` signed for the *portal* audience
  (``api.auth.SessionSigner``), HttpOnly, SameSite=Lax, Path=/portal, 8 hours;
  the admin API reads only ``Authorization: Bearer`` and never this cookie;
- each POST form carries a CSRF token, an HMAC of the session cookie under
  the session key, and an ``Origin``/``Referer`` that is present must name the
  host the request was sent to;
- at most 10 failed logins a minute per client address and per account
  (whatever was typed), 10 card activations a minute per subscriber and per
  address; past that 429 with ``Retry-After``, before any password is hashed;
- a wrong login says only that the login failed, never which part was wrong,
  and an unknown account costs the same scrypt as a known one;
- messages shown after a POST travel in the redirect's query string signed
  for this session, so a link made by someone else cannot put words on the page.

Live state: the ledger lags the running gateway by up to a flush (a second),
so the page asks the view first. Whether access is paused, and why, comes
from ``view.subscriber_page(address)`` for one of the subscriber's own
addresses (the engine's state in the gateway, the ledger's block records in
``LedgerView``); the ledger's last block record only if the subscriber has
no address. The balance comes from the optional hook ``live_balance(sid) ->
int | None`` (internal units) if the view has it; otherwise, or when it
answers None, from the ledger.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import html
import ipaddress
import logging
import threading
import time
from collections import OrderedDict, deque
from urllib.parse import parse_qsl, urlencode, urlsplit
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from accounting.money import format_amount, format_volume
from accounting.operations import OperationError, Operations

from .auth import PortalPasswords, RateLimiter, SessionSigner, session_secret

log = logging.getLogger("tollgate.portal")

COOKIE = "tg_portal"
AUDIENCE = "portal"
SESSION_TTL_S = 8 * 3600
WINDOW_S = 60
LOGIN_FAILURES = 10  # failed logins per WINDOW_S, per client address and per account
CARD_ATTEMPTS = 10  # card activations per WINDOW_S, per subscriber and per client address
MAX_FIELD = 1024  # characters: a longer form field is no login, code or tariff name
USAGE_DAYS = 30
PAYMENTS_SHOWN = 50

# what the blocks table's reasons mean to a subscriber (see ext.constants.BLOCK_REASONS)
REASONS = {
    "limit": "your balance has run out",
    "manual": "the operator paused it",
    "volume": "the volume included for this period is used up",
    "schedule": "it is outside your access hours",
}

# Pages are our own markup and inline CSS only: nothing else may load, submit elsewhere or frame them.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
h1 {{ font-size: 1.6rem; }} h2 {{ font-size: 1.2rem; margin-top: 2rem; }}
.reason {{ background: #fff3cd; border: 1px solid #e0c36a; padding: .8rem 1rem; border-radius: 6px; }}
.ok {{ background: #e6f4ea; border: 1px solid #8cc59a; padding: .8rem 1rem; border-radius: 6px; }}
.error {{ background: #fde8e8; border: 1px solid #e09a9a; padding: .8rem 1rem; border-radius: 6px; }}
table {{ border-collapse: collapse; width: 100%; margin: .5rem 0; }}
td, th {{ text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #ddd; }}
td.n, th.n {{ text-align: right; font-variant-numeric: tabular-nums; }} .balance {{ font-size: 1.3rem; }}
form.inline {{ display: flex; gap: .5rem; flex-wrap: wrap; align-items: center; }}
label {{ display: block; margin: .6rem 0 .2rem; }}
input, select, button {{ font: inherit; padding: .4rem .6rem; }}
button {{ background: #1a5fb4; color: #fff; border: 0; border-radius: 4px; cursor: pointer; }}
button.quiet {{ background: #666; }}
header {{ display: flex; justify-content: space-between; align-items: center; }}
svg text {{ font-size: 10px; fill: #555; }}
</style></head><body>
{body}
</body></html>"""


# ---- small helpers --------------------------------------------------------------------

def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _mac(secret: bytes, purpose: bytes, *parts: str) -> str:
    message = b"\0".join((b"tollgate-portal", purpose, *(p.encode("utf-8") for p in parts)))
    return _b64url(hmac.new(secret, message, hashlib.sha256).digest())


def csrf_token(secret: bytes, cookie: str) -> str:
    """The CSRF token of a session: only a page served to the cookie's holder can know it."""
    return _mac(secret, b"csrf", cookie)


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _html(body: str, title: str, status: int = 200, headers: dict | None = None) -> HTMLResponse:
    return HTMLResponse(PAGE.format(title=html.escape(title), body=body), status_code=status,
                        headers={**SECURITY_HEADERS, **(headers or {})})


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)


def same_origin(request: Request) -> bool:
    """False if an ``Origin`` or ``Referer`` header is present and names another host than the request's
    ``Host`` (a form posted from another site); True when neither is sent (older clients, curl)."""
    host = (request.headers.get("host") or "").lower()
    for name in ("origin", "referer"):
        value = request.headers.get(name)
        if value is None:
            continue
        if not host or value == "null":
            return False
        try:
            netloc = urlsplit(value).netloc.lower()
        except ValueError:
            return False
        if netloc != host:
            return False
    return True


async def form_fields(request: Request) -> dict[str, str]:
    """The fields of an ``application/x-www-form-urlencoded`` body (the first of each name).

    Read here rather than with FastAPI's ``Form``, which needs python-multipart for forms we never take."""
    body = await request.body()
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if body and kind != "application/x-www-form-urlencoded":
        raise HTTPException(415, "a portal form is application/x-www-form-urlencoded")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=16)
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "the form could not be read") from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        fields.setdefault(name, value[:MAX_FIELD + 1])  # one past the limit: long enough to be refused
    return fields


class FailureLimit:
    """At most ``limit`` failures per key in any ``window_s`` seconds (a sliding window).

    An attempt still being checked counts as a failure until its outcome is
    known (``begin`` .. ``end``), so a burst of concurrent guesses cannot slip
    past the limit while the password hashes run; a success does not count.
    ``api.auth.RateLimiter`` counts every hit, which is right for attempts
    but would lock out a subscriber for logging in successfully. At most
    ``max_keys`` keys are remembered (the least recently failed forgotten
    first), so many addresses cannot exhaust memory. Thread-safe.
    """

    def __init__(self, limit: int, window_s: float, max_keys: int = 100_000) -> None:
        self.limit, self.window_s, self.max_keys = limit, float(window_s), max_keys
        self._failures: OrderedDict[object, deque[float]] = OrderedDict()
        self._pending: dict[object, int] = {}
        self._lock = threading.Lock()

    def _recent(self, key, now: float) -> deque[float]:
        hits = self._failures.get(key)
        if hits is None:
            return deque()
        while hits and hits[0] <= now - self.window_s:
            hits.popleft()
        if not hits:
            del self._failures[key]
        return hits

    def begin(self, keys, now: float | None = None) -> float:
        """0.0 if an attempt may go ahead on every key (it is then pending on each); else the seconds
        to wait, and nothing is recorded."""
        now = time.monotonic() if now is None else now
        with self._lock:
            wait = 0.0
            for key in keys:
                hits = self._recent(key, now)
                pending = self._pending.get(key, 0)
                over = len(hits) + pending - self.limit  # how many must leave the window first
                if over >= 0:
                    # the (over+1)th oldest failure leaving the window frees a place; if only attempts
                    # in flight fill the budget, they end within a second or so
                    wait = max(wait, hits[over] + self.window_s - now if over < len(hits) else 1.0)
            if wait > 0:
                return wait
            for key in keys:
                self._pending[key] = self._pending.get(key, 0) + 1
            return 0.0

    def end(self, keys, failed: bool, now: float | None = None) -> None:
        """The attempt begun on ``keys`` is over: a failure if ``failed``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for key in keys:
                left = self._pending.get(key, 0) - 1
                if left > 0:
                    self._pending[key] = left
                else:
                    self._pending.pop(key, None)
                if failed:
                    self._failures.setdefault(key, deque()).append(now)
                    self._failures.move_to_end(key)
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)


def selectable_tariffs(config) -> list[str]:
    """The tariffs a subscriber may switch to (``selectable = true`` in the config), in the file's order."""
    return [name for name, t in config.tariffs.items() if getattr(t, "selectable", False)]


def find_subscriber(ledger, login: str) -> int | None:
    """The active subscriber a login names: by contract number first, then by name; None if nobody
    (or a contract number that several subscribers share)."""
    if not login:
        return None
    rows = ledger.db.execute("SELECT id FROM subscribers WHERE contract = ? AND active = 1 LIMIT 2",
                             (login,)).fetchall()
    if len(rows) == 1:
        return rows[0][0]
    if rows:
        return None  # ambiguous: a wrong guess must not log into one of them
    row = ledger.db.execute("SELECT id FROM subscribers WHERE name = ? AND active = 1", (login,)).fetchone()
    return row[0] if row else None


# ---- pages ----------------------------------------------------------------------------------

def login_page(message: str = "", login: str = "", status: int = 200, kind: str = "error",
               headers: dict | None = None, vouchers: bool = False) -> HTMLResponse:
    esc = html.escape
    note = f"<p class={kind} role=alert>{esc(message)}</p>" if message else ""
    if vouchers:  # [sessions] portal_login: a guest's device is bound by a voucher (or a login) here
        note += ("<h2>Have a voucher?</h2><form class=inline method=post action=\"/portal/voucher\">"
                 "<input id=voucher name=code required maxlength=64 placeholder=XXXX-XXXX-XXXX-XXXX autocomplete=off "
                 "aria-label='voucher code'><button type=submit id=redeem>Go online</button></form>"
                 "<h2>Or log in to your account</h2>")
    body = f"""<h1>Log in to your account</h1>
{note}
<form method=post action="/portal/login">
<label for=login>Contract number or subscriber name</label>
<input id=login name=login autocomplete=username required maxlength=200 value="{esc(login)}">
<label for=password>Password</label>
<input id=password name=password type=password autocomplete=current-password required maxlength=1024>
<p><button type=submit id=submit>Log in</button></p>
</form>
<p>No password yet, or forgot it? Ask the operator to set one for you.</p>"""
    return _html(body, "Log in", status, headers)


def _day_chart(days: list[tuple[dt.date, int]]) -> str:
    """An inline SVG bar chart of bytes per day (a <title> per bar for the exact figure)."""
    width, height, top, bottom = 600, 170, 14, 22
    most = max((b for _, b in days), default=0)
    step = width / max(len(days), 1)
    bars, labels = [], []
    for k, (day, n) in enumerate(days):
        h = 0 if most == 0 else max(1 if n else 0, round((height - top - bottom) * n / most))
        x = k * step
        bars.append(f'<rect x="{x + 1:.1f}" y="{height - bottom - h}" width="{step - 2:.1f}" height="{h}" '
                    f'fill="#1a5fb4"><title>{day.isoformat()}: {format_volume(n)}</title></rect>')
        if k % 5 == 0 and k < len(days) - 3 or k == len(days) - 1:  # no two labels on top of each other
            # the first and last labels lean inwards so that the chart's edges do not cut them
            anchor, at = (("start", x) if k == 0 else ("end", x + step) if k == len(days) - 1
                          else ("middle", x + step / 2))
            labels.append(f'<text x="{at:.1f}" y="{height - 6}" text-anchor="{anchor}">{day.strftime("%d %b")}</text>')
    axis = f'<line x1="0" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" stroke="#999"/>'
    peak = f'<text x="2" y="10">max {format_volume(most)} a day</text>' if most else '<text x="2" y="10">no traffic</text>'
    return (f'<svg id=usage-chart viewBox="0 0 {width} {height}" width="100%" role="img" '
            f'aria-label="traffic per day, last {len(days)} days" xmlns="http://www.w3.org/2000/svg">'
            + peak + "".join(bars) + axis + "".join(labels) + "</svg>")


def live_block_reasons(view, row: dict) -> list[str] | None:
    """Why the gateway blocks the subscriber now (empty: it does not), asked by one of the subscriber's own
    addresses; None if the view cannot tell (no address, or it names someone else)."""
    for network in row["addresses"]:
        info = view.subscriber_page(str(ipaddress.ip_network(network).network_address))
        if info is not None and info.get("id") == row["id"]:
            return list(info.get("reasons", []))
    return None


def account_page(view, ledger, sid: int, token: str, flash: tuple[str, str] | None) -> HTMLResponse:
    """The portal page of subscriber ``sid`` (its data only)."""
    esc = html.escape
    config = view.config
    ops = Operations(ledger, config, f"portal:{sid}")
    sub = ops.get(sid)
    row = ledger.get_subscriber(sid)
    currency = row["currency"]
    live = getattr(view, "live_balance", None)  # the optional hook, see the module docstring
    balance = live(sid) if callable(live) else None
    if balance is None:
        balance = row["balance"]
    tz = ZoneInfo(getattr(config, "timezone", "UTC") or "UTC")

    def when(ts_ns: int) -> str:
        return dt.datetime.fromtimestamp(ts_ns / 1e9, tz).strftime("%Y-%m-%d %H:%M")

    parts = [f"<header><h1>Your account</h1><form method=post action=/portal/logout>"
             f"<input type=hidden name=csrf value='{esc(token)}'>"
             f"<button class=quiet type=submit id=logout>Log out</button></form></header>"]
    if flash:
        parts.append(f"<p class={'ok' if flash[0] == 'ok' else 'error'} id=flash role=status>{esc(flash[1])}</p>")
    reasons = live_block_reasons(view, row)
    if reasons is None:  # the ledger's last block record (a manual block counts whatever came after)
        reasons = ["manual"] if sub["manually_blocked"] else [sub["block_reason"] or ""] if sub["blocked"] else []
    if reasons:
        why = "; ".join(REASONS.get("manual" if r.startswith("manual") else r, r or "ask the operator")
                        for r in dict.fromkeys(reasons))
        parts.append(f"<div class=reason id=status>Internet access is paused: {esc(why)}.</div>")
    else:
        parts.append("<div class=ok id=status>Internet access is on.</div>")
    credit = format_amount(row["credit_limit"], currency) if row["credit_limit"] else "none"
    pending = ledger.db.execute("SELECT tariff, effective_ns FROM tariff_changes WHERE subscriber_id = ?"
                                " AND applied_ns IS NULL ORDER BY effective_ns LIMIT 1", (sid,)).fetchone()
    change = f" (changing to {esc(pending[0])} from {when(pending[1])})" if pending else ""
    parts.append(
        "<table>"
        f"<tr><th>Subscriber</th><td id=name>{esc(row['name'])}"
        + (f" (contract {esc(row['contract'])})" if row["contract"] else "") + "</td></tr>"
        f"<tr><th>Balance</th><td class=balance><b id=balance>{esc(format_amount(balance, currency))}</b></td></tr>"
        f"<tr><th>Credit limit</th><td id=credit>{esc(credit)}</td></tr>"
        f"<tr><th>Tariff</th><td id=tariff>{esc(row['tariff'])}{change}</td></tr>"
        "</table>")

    voucher = ops.voucher_of(sid)
    if voucher is not None:  # a guest account (issue 15): what its voucher holds, and until when
        held = [format_amount(voucher["value"], currency)] if voucher["value"] else []
        if voucher["volume"] is not None:
            held.append(f"{format_volume(voucher['volume'])} of traffic")
        devices = ops.portal_devices(sid)
        parts.append(f"<p id=voucher>Voucher {esc(voucher['serial'])}: {esc(' and '.join(held))}, valid until "
                     f"{when(voucher['ends_ns'])}; online devices: {len(devices)}"
                     + (f" of {voucher['devices']}" if voucher["devices"] else "") + ".</p>")
    parts.append("<h2>Top up with a prepaid card</h2>"
                 "<form class=inline method=post action=/portal/card>"
                 f"<input type=hidden name=csrf value='{esc(token)}'>"
                 "<input id=code name=code required maxlength=64 placeholder=XXXX-XXXX-XXXX-XXXX "
                 "autocomplete=off aria-label='card code'>"
                 "<button type=submit id=activate>Activate</button></form>"
                 "<p>Or pay at the office. Access resumes within a second of the payment.</p>")

    # usage: days in the gateway's time zone, the subscriber's idea of a day
    today = dt.datetime.now(tz).date()
    days = [today - dt.timedelta(days=k) for k in range(USAGE_DAYS - 1, -1, -1)]
    since = int(dt.datetime.combine(days[0], dt.time(0), tz).timestamp()) // 60 * 60
    # rolled-up days are those of the rollup's time zone: start at the bucket holding this midnight, if any
    since = ledger.exact_range(since, None)[0]
    per_day = dict.fromkeys(days, 0)
    # summed by SQLite in quarter hours (every time zone's offset is whole quarter hours), then into the
    # zone's days here: 96 rows a day at most, whatever the traffic
    for r in ledger.usage_range(sid, since=since, group_by=("minute",), bucket=900):
        day = dt.datetime.fromtimestamp(r["minute"], tz).date()
        if day in per_day:
            per_day[day] += r["bytes"]
    parts.append(f"<h2>Usage, last {USAGE_DAYS} days</h2>" + _day_chart(list(per_day.items())))
    names = config.zones.names
    by_zone: dict[str, list[int]] = {}
    for r in ledger.usage_range(sid, since=since, group_by=("zone", "direction")):
        zone = names[r["zone"]] if r["zone"] < len(names) else str(r["zone"])
        by_zone.setdefault(zone, [0, 0, 0])
        by_zone[zone][r["direction"]] += r["bytes"]
        by_zone[zone][2] += r["amount"]
    if by_zone:
        parts.append("<table id=zones><tr><th>zone</th><th class=n>upload</th><th class=n>download</th>"
                     "<th class=n>charged</th></tr>"
                     + "".join(f"<tr><td>{esc(z)}</td><td class=n>{format_volume(up)}</td><td class=n>{format_volume(down)}</td>"
                               f"<td class=n>{esc(format_amount(amount, currency))}</td></tr>"
                               for z, (up, down, amount) in by_zone.items())
                     + "</table>")
    else:
        parts.append("<p>No traffic in this time.</p>")

    payments = ledger.last_payments(sid, PAYMENTS_SHOWN)
    parts.append("<h2>Payments</h2>")
    if payments:
        parts.append("<table id=payments><tr><th>date</th><th class=n>amount</th><th>how</th><th>note</th></tr>"
                     + "".join(f"<tr><td>{when(p['ts_ns'])}</td><td class=n>{esc(format_amount(p['amount'], currency))}"
                               f"</td><td>{esc(p['method'] or '')}</td><td>{esc(p['comment'] or '')}</td></tr>"
                               for p in payments)
                     + "</table>")
    else:
        parts.append("<p>No payments yet.</p>")

    choices = [t for t in selectable_tariffs(config) if t != row["tariff"]]
    if choices:
        options = "".join(f"<option>{esc(t)}</option>" for t in choices)
        parts.append("<h2>Change tariff</h2><form class=inline method=post action=/portal/tariff>"
                     f"<input type=hidden name=csrf value='{esc(token)}'>"
                     f"<select name=tariff id=tariff-choice aria-label=tariff>{options}</select>"
                     "<button type=submit id=change-tariff>Switch now</button></form>"
                     "<p>The new tariff applies from now on; traffic until now stays charged at the old one.</p>")
    return _html("\n".join(parts), "Your account")


def _blocked_page(title: str, text: str, status: int, retry_after: float | None = None,
                  back: str = "/portal") -> HTMLResponse:
    headers = {"Retry-After": str(int(retry_after) + 1)} if retry_after is not None else None
    return _html(f"<h1>{html.escape(title)}</h1><p class=error role=alert>{html.escape(text)}</p>"
                 f"<p><a href='{back}'>Back</a></p>", title, status, headers)


# ---- devices (portal logins, issue 15 phase 2) ---------------------------------------------------------------

def bindable(ledger, address: str) -> bool:
    """Whether a portal login may bind ``address``: it belongs to no one, or only to a portal session (a device
    logging in again, or another account from the same device: the newer login replaces it)."""
    from accounting import sessions

    from .app import owner_of

    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    ip = getattr(ip, "ipv4_mapped", None) or ip
    if owner_of(ledger, str(ip)) is None:
        return not sessions.who(ledger.db, str(ip), None)  # nor an inactive subscriber's static address
    live = sessions.live_row_on(ledger.db, str(ipaddress.ip_network(ip)))
    return live is not None and live["source"] == "portal" and not any(
        r.get("static") or r["network"] != live["network"] for r in sessions.who(ledger.db, str(ip), None))


def device_neighbours(address: str) -> tuple[str | None, list[str]]:
    """(MAC, the other global addresses with that MAC) of the device at ``address``, from the kernel's
    neighbour table of the namespace the portal runs in (the gateway's): a dual-stack device that logs in over
    IPv4 gets its IPv6 addresses bound too, as far as the gateway has seen them. (None, []) if unknown."""
    import json
    import subprocess

    try:
        got = subprocess.run(["ip", "-j", "neigh", "show"], capture_output=True, text=True, timeout=2, check=False)
        table = json.loads(got.stdout or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None, []
    mac = next((n.get("lladdr") for n in table if n.get("dst") == address and n.get("lladdr")), None)
    if mac is None:
        return None, []
    others = []
    for n in table:
        if n.get("lladdr") != mac or n.get("dst") == address or "FAILED" in n.get("state", []):
            continue
        try:
            ip = ipaddress.ip_address(n["dst"])
        except (KeyError, ValueError):
            continue
        if ip.is_global or ip in ipaddress.ip_network("100.64.0.0/10") or (ip.version == 6 and not ip.is_link_local
                                                                           and not ip.is_multicast):
            others.append(str(ip))
    return mac.lower(), sorted(set(others))


# ---- the router ------------------------------------------------------------------------------

def portal_router(view) -> APIRouter:
    """``view``: ``thread_ledger()``, ``config``, ``refresh_subscriber(sid)``, optionally
    ``live_balance(sid)`` (``api.app.GatewayView``)."""
    router = APIRouter(include_in_schema=False)
    logins = FailureLimit(LOGIN_FAILURES, WINDOW_S)
    cards_by_subscriber = RateLimiter(CARD_ATTEMPTS, WINDOW_S)
    cards_by_address = RateLimiter(CARD_ATTEMPTS, WINDOW_S)

    def secret() -> bytes:
        return session_secret(view.thread_ledger())

    def session(request: Request) -> tuple[int, str] | None:
        """(subscriber id, cookie) of a valid portal session of an active subscriber, else None."""
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            return None
        subject = SessionSigner(secret()).verify(cookie, AUDIENCE)
        if subject is None or not subject.isdigit():
            return None
        row = view.thread_ledger().get_subscriber(int(subject))
        if row is None or not row["active"]:
            return None  # deactivated since: the session ends with the account
        return row["id"], cookie

    def checked_post(request: Request, fields: dict) -> tuple[int, str] | Response:
        """The session of a POST whose origin and CSRF token are right, or the answer to give instead."""
        current = session(request)
        if current is None:
            return _redirect("/portal/login")
        if not same_origin(request):
            return _blocked_page("Refused", "This form was sent from another site.", 403)
        if not hmac.compare_digest(fields.get("csrf", ""), csrf_token(secret(), current[1])):
            return _blocked_page("Refused", "The form has expired: open the page again and retry.", 403)
        return current

    def back_with(cookie: str, kind: str, text: str) -> RedirectResponse:
        # the message goes in the URL, signed for this session: nobody else can make the page say things
        query = urlencode({"kind": kind, "msg": text, "sig": _mac(secret(), b"flash", cookie, kind, text)})
        return _redirect(f"/portal?{query}")

    # ---- portal logins bind devices ([sessions] portal_login; issue 15, phase 2) ----------------------------

    def guests() -> bool:
        return bool(getattr(getattr(view.config, "sessions", None), "portal_login", False))

    def device(request: Request) -> tuple[str, list[str], str | None]:
        """(the client's address, the device's other addresses the portal may bind, its MAC or None)."""
        client = _client(request)
        finder = getattr(view, "device_neighbours", None) or device_neighbours
        mac, others = finder(client)
        ledger = view.thread_ledger()
        local = [ipaddress.ip_network(n) for n in view.config.zones.local_networks]
        others = [a for a in others if a != client and any(ipaddress.ip_address(a) in n for n in local)
                  and bindable(ledger, a)]
        return client, others, mac

    def local_address(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        ip = getattr(ip, "ipv4_mapped", None) or ip
        return any(ip in ipaddress.ip_network(n) for n in view.config.zones.local_networks)

    def bind_device(request: Request, sid: int) -> tuple[str, str] | None:
        """After a password login: the device is bound unless its address is someone's already (a static
        address, another source's session); a flash message (kind, text) when something is worth saying."""
        client, others, mac = device(request)
        ledger = view.thread_ledger()
        if not local_address(client) or not bindable(ledger, client):
            return None  # the subscriber's own address, or another's: logged in, nothing bound
        try:
            Operations(ledger, view.config, f"portal:{sid}").portal_login(sid, client, others, mac)
        except OperationError as exc:
            return "error", f"Logged in, but this device was not connected: {exc}."
        view.refresh_subscriber(sid)
        return "ok", "Logged in: this device is online."

    @router.post("/portal/voucher", response_class=HTMLResponse)
    def voucher(request: Request, fields: dict = Depends(form_fields)):
        if not guests():
            raise HTTPException(404, "vouchers are not redeemed here ([sessions] portal_login)")
        if not same_origin(request):
            return _blocked_page("Refused", "This form was sent from another site.", 403, back="/portal/login")
        client, others, mac = device(request)
        if not local_address(client) or not bindable(view.thread_ledger(), client):
            return login_page("This device's address belongs to a subscriber already: a voucher cannot take it.",
                              status=409, vouchers=True)
        code = fields.get("code", "").strip()
        if not code or len(code) > 64:
            return login_page("Type the code printed on the voucher.", status=422, vouchers=True)
        keys = (("voucher-address", client),)
        wait = logins.begin(keys)
        if wait > 0:
            return login_page("Too many wrong codes. Wait a minute and try again.", status=429, vouchers=True,
                              headers={"Retry-After": str(int(wait) + 1)})
        failed = True
        try:
            done = Operations(view.thread_ledger(), view.config, f"portal:{client}").redeem_voucher(
                code, client, others, mac)
            failed = False
        except OperationError as exc:
            log.info("portal: voucher refused for %s: %s", client, exc)
            return login_page(f"The voucher was not accepted: {exc}.", status=exc.status, vouchers=True)
        finally:
            logins.end(keys, failed=failed)
        sid = done["subscriber_id"]
        view.refresh_subscriber(sid)
        cookie = SessionSigner(secret()).issue(str(sid), AUDIENCE, SESSION_TTL_S)
        until = dt.datetime.fromtimestamp(done["ends_ns"] / 1e9, ZoneInfo(getattr(view.config, "timezone", "UTC")
                                                                           or "UTC")).strftime("%Y-%m-%d %H:%M")
        answer = back_with(cookie, "ok", f"Voucher {done['serial']} accepted: this device is online until {until}.")
        answer.set_cookie(COOKIE, cookie, max_age=SESSION_TTL_S, path="/portal", httponly=True, samesite="lax")
        return answer

    @router.get("/portal/login", response_class=HTMLResponse)
    def login_form(request: Request, out: str | None = None):
        if session(request) is not None:
            return _redirect("/portal")
        return login_page("You are logged out." if out else "", kind="ok", vouchers=guests())

    @router.post("/portal/login", response_class=HTMLResponse)
    def login(request: Request, fields: dict = Depends(form_fields)):
        if not same_origin(request):
            return _blocked_page("Refused", "This form was sent from another site.", 403, back="/portal/login")
        typed = fields.get("login", "").strip()
        password = fields.get("password", "")
        if len(typed) > 200 or len(password) > MAX_FIELD:
            typed, password = typed[:200], ""  # fails below like any wrong password, counted alike
        ledger = view.thread_ledger()
        sid = find_subscriber(ledger, typed)
        # the account is the subscriber when the login names one, else what was typed: guesses at
        # unknown accounts are limited too, and cannot tell known from unknown by when 429 comes
        keys = (("address", _client(request)), ("account", f"subscriber:{sid}" if sid else typed.casefold()))
        wait = logins.begin(keys)
        if wait > 0:
            return login_page("Too many failed logins. Wait a minute and try again.", typed, 429,
                              headers={"Retry-After": str(int(wait) + 1)}, vouchers=guests())
        ok = False
        try:
            ok = PortalPasswords(ledger).verify(sid, password)  # sid None: the same scrypt work, then False
        finally:
            logins.end(keys, failed=not ok)
        if not ok:
            log.info("portal: failed login from %s", _client(request))
            return login_page("Login failed: check what you typed and try again.", typed, 401, vouchers=guests())
        cookie = SessionSigner(secret()).issue(str(sid), AUDIENCE, SESSION_TTL_S)
        answer = _redirect("/portal")
        if guests():  # [sessions] portal_login: a device that belongs to no one is the account's from now
            note = bind_device(request, sid)
            if note is not None:
                answer = back_with(cookie, *note)
        # not Secure: the portal is served over plain HTTP on the subscribers' own network
        answer.set_cookie(COOKIE, cookie, max_age=SESSION_TTL_S, path="/portal", httponly=True, samesite="lax")
        return answer

    @router.get("/portal", response_class=HTMLResponse)
    def portal(request: Request, kind: str | None = None, msg: str | None = None, sig: str | None = None):
        current = session(request)
        if current is None:
            return _redirect("/portal/login")
        sid, cookie = current
        flash = None
        if kind in ("ok", "error") and msg and sig and len(msg) <= MAX_FIELD \
                and hmac.compare_digest(sig, _mac(secret(), b"flash", cookie, kind, msg)):
            flash = (kind, msg)
        return account_page(view, view.thread_ledger(), sid, csrf_token(secret(), cookie), flash)

    @router.post("/portal/card", response_class=HTMLResponse)
    def card(request: Request, fields: dict = Depends(form_fields)):
        current = checked_post(request, fields)
        if isinstance(current, Response):
            return current
        sid, cookie = current
        client = _client(request)
        if not cards_by_subscriber.hit(sid) or not cards_by_address.hit(client):
            wait = max(cards_by_subscriber.retry_after(sid), cards_by_address.retry_after(client))
            return _blocked_page("Too many attempts", "Too many card activations. Wait a minute and try again.",
                                 429, wait)
        code = fields.get("code", "").strip()
        if not code or len(code) > 64:
            return back_with(cookie, "error", "Type the code printed on the card.")
        try:
            done = Operations(view.thread_ledger(), view.config, f"portal:{sid}").activate_card(sid, code)
        except OperationError as exc:
            log.info("portal: subscriber %s: card refused: %s", sid, exc)
            return back_with(cookie, "error", f"The card was not accepted: {exc}.")
        view.refresh_subscriber(sid)
        return back_with(cookie, "ok", f"Card {done['serial']} activated: {done['value']} added, balance "
                                       f"{done['balance']}. Access resumes within a second.")

    @router.post("/portal/tariff", response_class=HTMLResponse)
    def tariff(request: Request, fields: dict = Depends(form_fields)):
        current = checked_post(request, fields)
        if isinstance(current, Response):
            return current
        sid, cookie = current
        name = fields.get("tariff", "")
        if name not in selectable_tariffs(view.config):
            return _blocked_page("Refused", "This tariff cannot be chosen here; ask the operator.", 403)
        ops = Operations(view.thread_ledger(), view.config, f"portal:{sid}")
        if ops.get(sid)["tariff"] == name:
            return back_with(cookie, "ok", f"Your tariff is {name} already.")
        try:
            ops.update(sid, tariff=name)  # scheduled for now: the gateway applies it within a second
        except OperationError as exc:
            return back_with(cookie, "error", f"The tariff was not changed: {exc}.")
        view.refresh_subscriber(sid)
        return back_with(cookie, "ok", f"Tariff changed to {name}; it applies within a second.")

    @router.post("/portal/logout", response_class=HTMLResponse)
    def logout(request: Request, fields: dict = Depends(form_fields)):
        current = checked_post(request, fields)
        if isinstance(current, Response) and current.status_code != 303:
            return current
        if not isinstance(current, Response) and guests():  # the device's portal session ends with it
            sid = current[0]
            gone = Operations(view.thread_ledger(), view.config, f"portal:{sid}").portal_logout(_client(request), sid)
            if gone["status"] == "stopped":
                view.refresh_subscriber(sid)
        answer = _redirect("/portal/login?out=1")
        answer.delete_cookie(COOKIE, path="/portal", httponly=True, samesite="lax")
        return answer

    return router
