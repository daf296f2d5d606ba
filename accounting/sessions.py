"""Sessions: who is behind an address, from DHCP leases, RADIUS accounting and portal logins (schema 17).

The storage half: SQL over the ledger's connection, always inside a transaction the caller holds
(``ledger.transaction()``); the checks, the rules and the audit rows are :mod:`accounting.operations`'
(``session_start`` ...), which every front end (the RADIUS server, the DHCP hooks, the CLI) calls.

A session row is one network of one source's session (``source``, ``client``, ``session_key``): a
RADIUS session with a Framed-IP-Address and a Delegated-IPv6-Prefix is two rows with one key. While a
row is live (``ended_ns`` NULL) its network is also a row of ``addresses`` marked with the session's
id, so a running gateway sees it as one of the subscriber's addresses through the change feed
(schema 14) with no change of its own; closing the session deletes that row. Closed rows stay:
"who had this address at T" is the live-or-closed row whose ``[started_ns, ended_ns)`` holds T, and
there is at most one, because

- the database allows one live row per network (a partial unique index), and
- a new row on a network starts no earlier than the last one on it ended (:func:`open_row`).

When the network equals a static address of the same subscriber, the session is recorded but the
static row stays as it is (the address was that subscriber's anyway): nothing is taken over.
"""

from __future__ import annotations

import ipaddress

__all__ = ["COLUMNS", "SOURCES", "BINDING_KINDS", "live_rows_of_key", "live_row_on", "open_row", "close_rows",
           "touch_rows", "due_rows", "live_rows_of_client", "who", "rows", "check"]

SOURCES = ("radius", "dnsmasq", "kea", "portal")
BINDING_KINDS = ("mac", "client_id", "circuit_id")
COLUMNS = ("id", "network", "subscriber_id", "source", "session_key", "client", "mac", "started_ns", "last_seen_ns",
           "expires_ns", "ended_ns", "end_reason", "up_bytes", "down_bytes")
_SELECT = f"SELECT {', '.join('s.' + c for c in COLUMNS)}, u.name FROM sessions s JOIN subscribers u " \
          "ON u.id = s.subscriber_id"


def _dicts(cursor) -> list[dict]:
    return [{**dict(zip(COLUMNS, r)), "subscriber": r[-1]} for r in cursor]


def live_rows_of_key(db, source: str, client: str, key: str) -> list[dict]:
    return _dicts(db.execute(f"{_SELECT} WHERE s.source = ? AND s.client = ? AND s.session_key = ? "
                             "AND s.ended_ns IS NULL ORDER BY s.network", (source, client, key)))


def live_rows_of_client(db, source: str, client: str) -> list[dict]:
    return _dicts(db.execute(f"{_SELECT} WHERE s.source = ? AND s.client = ? AND s.ended_ns IS NULL "
                             "ORDER BY s.id", (source, client)))


def rows_by_ids(db, ids) -> list[dict]:
    ids = list(ids)
    return _dicts(db.execute(f"{_SELECT} WHERE s.id IN ({', '.join('?' * len(ids))}) ORDER BY s.id", ids))


def live_row_on(db, network: str) -> dict | None:
    found = _dicts(db.execute(f"{_SELECT} WHERE s.network = ? AND s.ended_ns IS NULL", (network,)))
    return found[0] if found else None


def static_owner(db, network: str) -> int | None:
    row = db.execute("SELECT subscriber_id FROM addresses WHERE network = ? AND session_id IS NULL",
                     (network,)).fetchone()
    return row[0] if row else None


def open_row(db, network: str, sid: int, source: str, client: str, key: str, mac: str | None, now: int,
             expires: int | None) -> int:
    """A live row for ``network``, and its address row unless a static address of ``sid`` covers it
    exactly. The caller has closed whatever held the network and checked overlaps. Starts no earlier
    than the network's last row ended, so that closed rows never overlap in time."""
    last = db.execute("SELECT max(ended_ns) FROM sessions WHERE network = ?", (network,)).fetchone()[0]
    started = max(now, last or 0)
    session_id = db.scalar("INSERT INTO sessions (network, subscriber_id, source, session_key, client, mac,"
                           " started_ns, last_seen_ns, expires_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                           (network, sid, source, key, client, mac, started, started, expires))
    if static_owner(db, network) != sid:
        db.execute("INSERT INTO addresses (network, subscriber_id, session_id) VALUES (?, ?, ?)",
                   (network, sid, session_id))
    return session_id


def close_rows(db, ids, now: int, reason: str) -> list[int]:
    """End the live rows ``ids`` at ``now`` (never before they started); their address rows go. Returns
    the ids this call ended: a row that another writer ended meanwhile (two gateways expiring the same
    sessions, a Stop sent twice; PostgreSQL runs them side by side) is not one, so it is audited once."""
    closed: list[int] = []
    ids = list(ids)
    for i in range(0, len(ids), 500):
        part = ids[i:i + 500]
        marks = ", ".join("?" * len(part))
        ended = [r for (r,) in db.execute(
            f"UPDATE sessions SET ended_ns = {db.GREATEST}(?, started_ns, last_seen_ns), end_reason = ? "
            f"WHERE id IN ({marks}) AND ended_ns IS NULL RETURNING id", (now, reason, *part))]
        if ended:
            db.execute(f"DELETE FROM addresses WHERE session_id IN ({', '.join('?' * len(ended))})", ended)
        closed += ended
    return sorted(closed)


def touch_rows(db, ids, now: int, expires: int | None, up_bytes: int | None, down_bytes: int | None) -> None:
    """Seen again (an Interim-Update, a lease renewed): last seen, expiry and the source's byte counts
    (which only grow: a late duplicate with smaller counts changes none). A row ended meanwhile stays
    as it ended."""
    for session_id in ids:
        db.execute(f"UPDATE sessions SET last_seen_ns = {db.GREATEST}(last_seen_ns, ?), expires_ns = ?,"
                   f" up_bytes = {db.GREATEST}(up_bytes, coalesce(?, 0)),"
                   f" down_bytes = {db.GREATEST}(down_bytes, coalesce(?, 0)) WHERE id = ? AND ended_ns IS NULL",
                   (now, expires, up_bytes, down_bytes, session_id))


def due_rows(db, now: int) -> list[dict]:
    """Live rows whose expiry has passed."""
    return _dicts(db.execute(f"{_SELECT} WHERE s.ended_ns IS NULL AND s.expires_ns IS NOT NULL AND "
                             "s.expires_ns < ? ORDER BY s.id", (now,)))


def _containing(address) -> list[str]:
    """The canonical texts of every prefix that contains ``address`` (an address or a prefix)."""
    net = ipaddress.ip_network(address, strict=False) if "/" in str(address) else \
        ipaddress.ip_network(ipaddress.ip_address(str(address)))
    return [str(net.supernet(new_prefix=p)) for p in range(net.prefixlen + 1)]


def who(db, address: str, at: int | None) -> list[dict]:
    """Who held ``address`` at ``at`` (None: now): the session rows whose network contains it and whose
    ``[started_ns, ended_ns)`` holds ``at``, and, for ``at`` None, a static owner (``source`` "static").
    The ledger keeps no history of static addresses; their current owner is listed with ``static``."""
    nets = _containing(address)
    marks = ", ".join("?" * len(nets))
    if at is None:
        found = _dicts(db.execute(f"{_SELECT} WHERE s.network IN ({marks}) AND s.ended_ns IS NULL", nets))
    else:
        found = _dicts(db.execute(f"{_SELECT} WHERE s.network IN ({marks}) AND s.started_ns <= ? AND "
                                  "(s.ended_ns IS NULL OR s.ended_ns > ?)", (*nets, at, at)))
    for network, sid, name in db.execute(
            f"SELECT a.network, a.subscriber_id, u.name FROM addresses a JOIN subscribers u ON u.id = "
            f"a.subscriber_id WHERE a.network IN ({marks}) AND a.session_id IS NULL", nets):
        found.append({"network": network, "subscriber_id": sid, "subscriber": name, "source": "static",
                      "static": True})
    # the longest prefix first: the engine's answer
    found.sort(key=lambda r: -ipaddress.ip_network(r["network"]).prefixlen)
    return found


def rows(db, live: bool | None = None, subscriber_id: int | None = None, network: str | None = None,
         limit: int = 100, after_id: int = 0) -> list[dict]:
    clauses, args = ["s.id > ?"], [after_id]
    if live is True:
        clauses.append("s.ended_ns IS NULL")
    elif live is False:
        clauses.append("s.ended_ns IS NOT NULL")
    if subscriber_id is not None:
        clauses.append("s.subscriber_id = ?")
        args.append(subscriber_id)
    if network is not None:
        nets = _containing(network)
        clauses.append(f"s.network IN ({', '.join('?' * len(nets))})")
        args += nets
    return _dicts(db.execute(f"{_SELECT} WHERE {' AND '.join(clauses)} ORDER BY s.id LIMIT ?", (*args, limit)))


def session_networks_of(db, sids) -> set[tuple[int, str]]:
    """``(subscriber, network)`` of the address rows that are sessions', for the given subscribers."""
    sids = list(sids)
    out = set()
    for i in range(0, len(sids), 500):
        part = sids[i:i + 500]
        out.update(db.execute(f"SELECT subscriber_id, network FROM addresses WHERE session_id IS NOT NULL AND "
                              f"subscriber_id IN ({', '.join('?' * len(part))})", part))
    return out


# ---- bindings (what names a lease's subscriber) -------------------------------------------------------------

def binding_owner(db, kind: str, value: str) -> int | None:
    row = db.execute("SELECT subscriber_id FROM bindings WHERE kind = ? AND value = ?", (kind, value)).fetchone()
    return row[0] if row else None


def bindings_of(db, sid: int | None = None) -> list[dict]:
    sql = "SELECT b.kind, b.value, b.subscriber_id, u.name FROM bindings b JOIN subscribers u ON u.id = b.subscriber_id"
    cur = db.execute(sql + (" WHERE b.subscriber_id = ?" if sid is not None else "") + " ORDER BY u.id, b.kind, b.value",
                     (() if sid is None else (sid,)))
    return [{"kind": k, "value": v, "subscriber_id": s, "subscriber": n} for k, v, s, n in cur]


# ---- invariants (tollgate ledger check) ----------------------------------------------------------------------

def check(db) -> list[str]:
    """What disagrees between sessions and addresses: every live row has its address row (or a static
    one of its subscriber), every session-marked address row is a live row of the same network and
    subscriber, and no two rows of one network overlap in time."""
    problems = []
    for sid, network, owner, static in db.execute(
            "SELECT s.id, s.network, a.subscriber_id, a.session_id IS NULL FROM sessions s LEFT JOIN addresses a "
            "ON a.network = s.network WHERE s.ended_ns IS NULL AND (a.network IS NULL OR "
            "a.subscriber_id != s.subscriber_id OR (a.session_id IS NOT NULL AND a.session_id != s.id))"):
        problems.append(f"live session {sid} on {network} has no address row of its own (the gateway would not "
                        f"count it{'' if owner is None else f'; the address is subscriber {owner}s'})")
    for network, sid, session_id in db.execute(
            "SELECT a.network, a.subscriber_id, a.session_id FROM addresses a LEFT JOIN sessions s ON "
            "s.id = a.session_id WHERE a.session_id IS NOT NULL AND (s.id IS NULL OR s.ended_ns IS NOT NULL OR "
            "s.network != a.network OR s.subscriber_id != a.subscriber_id)"):
        problems.append(f"address {network} of subscriber {sid} is marked with session {session_id}, which is not "
                        "a live session of that subscriber on that network")
    for network, a, b in db.execute(
            "SELECT network, prev_id, id FROM (SELECT network, id, started_ns, lag(id) OVER w AS prev_id, "
            "lag(coalesce(ended_ns, 9223372036854775807)) OVER w AS prev_end FROM sessions "
            "WINDOW w AS (PARTITION BY network ORDER BY started_ns, id)) AS ordered WHERE prev_end > started_ns"):
        problems.append(f"sessions {a} and {b} on {network} overlap in time: two owners at once")
    return problems
