"""Notifications: events for the operator's webhook and/or command.

Events (a balance fell below a warning level, a subscriber was blocked or
unblocked, N% of a period's free volume is used) are queued in the ledger's
``notifications`` table under a key that names the occurrence, so the same
event queued twice (a restart, a retried flush) is one notification. A
:class:`Notifier` delivers what is due:

* a **webhook**: ``POST`` of the JSON payload with an ``Idempotency-Key``
  header carrying the key; any 2xx is success;
* a **command**: run with the JSON on standard input and ``TOLLGATE_EVENT``,
  ``TOLLGATE_KEY`` in its environment; exit status 0 is success.

A failure (refused connection, timeout, other status, non-zero exit) is
retried after 2, 4, 8... seconds up to ``max_attempts``, then marked failed.
Delivery is at least once: if the process dies between a successful delivery
and recording it, the next run delivers again with the same key, which the
receiver uses to drop the repeat.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

from .ledger import Ledger

log = logging.getLogger("tollgate.notify")
NS = 1_000_000_000
CLAIM_SLACK = 30  # seconds a claim outlives the send's own timeout before another gateway may retry it


@dataclass(frozen=True)
class NotifySettings:
    webhook: str | None = None
    command: str | None = None
    max_attempts: int = 6
    backoff: float = 2.0  # seconds before the first retry, doubling
    timeout: float = 5.0  # per attempt
    quota_levels: tuple = (80, 100)  # percent of a period's free volume used


def enqueue(ledger: Ledger, key: str, event: str, subscriber: int | None, payload: dict,
            now: int | None = None) -> bool:
    """Queue a notification; False when ``key`` was queued before."""
    now = time.time_ns() if now is None else now
    body = json.dumps({"event": event, "key": key, **payload}, sort_keys=True)
    with ledger.transaction():  # once per key: the unique key holds it, on every backend
        return ledger.db.scalar(
            "INSERT INTO notifications (key, subscriber_id, event, payload, created_ns, next_try_ns)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING 1",
            (key, subscriber, event, body, now, now)) is not None


def pending(ledger: Ledger) -> list[dict]:
    cols = ("id", "key", "event", "payload", "attempts", "next_try_ns", "delivered_ns", "failed_ns", "last_error")
    rows = ledger.db.execute(f"SELECT {', '.join(cols)} FROM notifications ORDER BY id")
    return [dict(zip(cols, r)) for r in rows]


class Notifier:
    """Delivers due notifications; :meth:`deliver_due` is one round (the daemon calls it each second)."""

    def __init__(self, ledger: Ledger, settings: NotifySettings) -> None:
        self.ledger = ledger
        self.settings = settings

    def deliver_due(self, now: int | None = None) -> int:
        """Try every due notification once; returns how many were delivered."""
        if not (self.settings.webhook or self.settings.command):
            return 0
        now = time.time_ns() if now is None else now
        db = self.ledger.db
        # Claimed before they are sent, so that gateways sharing the ledger send each one once: the rows
        # are locked as they are read (PostgreSQL's SKIP LOCKED: rows another gateway is claiming are
        # passed over, not waited for; SQLite's one writer does the same) and pushed past the send's
        # timeout; a gateway that dies while sending leaves them to be retried when the claim runs out.
        claim = now + int((self.settings.timeout + CLAIM_SLACK) * NS)
        with self.ledger.transaction():
            due = db.execute(
                "SELECT id, key, event, payload, attempts FROM notifications WHERE delivered_ns IS NULL"
                f" AND failed_ns IS NULL AND next_try_ns <= ? ORDER BY id LIMIT 100{db.SKIP_LOCKED}", (now,)).fetchall()
            db.executemany("UPDATE notifications SET next_try_ns = ? WHERE id = ?", [(claim, d[0]) for d in due])
        delivered = 0
        for nid, key, event, payload, attempts in due:
            error = self._send(key, event, payload)
            attempts += 1
            with self.ledger.transaction():
                if error is None:
                    self.ledger.db.execute("UPDATE notifications SET attempts = ?, delivered_ns = ?, last_error = NULL"
                                           " WHERE id = ?", (attempts, time.time_ns(), nid))
                    delivered += 1
                elif attempts >= self.settings.max_attempts:
                    self.ledger.db.execute("UPDATE notifications SET attempts = ?, failed_ns = ?, last_error = ?"
                                           " WHERE id = ?", (attempts, time.time_ns(), error, nid))
                    log.error("notification %s failed for good after %d attempts: %s", key, attempts, error)
                else:
                    retry = now + int(self.settings.backoff * 2 ** (attempts - 1) * NS)
                    self.ledger.db.execute("UPDATE notifications SET attempts = ?, next_try_ns = ?, last_error = ?"
                                           " WHERE id = ?", (attempts, retry, error, nid))
                    log.warning("notification %s: attempt %d failed (%s); retrying", key, attempts, error)
        return delivered

    def _send(self, key: str, event: str, payload: str) -> str | None:
        """None on success, else what went wrong (no secrets: the URL's query is left out)."""
        # imported here, by the one caller that sends: urllib.request pulls in http.client, ssl and email
        # (20 ms), and everything that reads the config (every CLI command) imports this module for
        # NotifySettings
        import subprocess
        import urllib.error
        import urllib.request

        s = self.settings
        if s.webhook:
            request = urllib.request.Request(s.webhook, data=payload.encode(), method="POST", headers={
                "Content-Type": "application/json", "Idempotency-Key": key, "User-Agent": "tollgate"})
            try:
                with urllib.request.urlopen(request, timeout=s.timeout) as response:
                    if not 200 <= response.status < 300:
                        return f"webhook answered {response.status}"
            except urllib.error.HTTPError as exc:
                return f"webhook answered {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                return f"webhook unreachable: {getattr(exc, 'reason', exc)}"
        if s.command:
            try:
                proc = subprocess.run(s.command, shell=True, input=payload, text=True, capture_output=True,
                                      timeout=s.timeout, env={**os.environ, "TOLLGATE_EVENT": event,
                                                              "TOLLGATE_KEY": key})
            except subprocess.TimeoutExpired:
                return f"command timed out after {s.timeout} s"
            if proc.returncode != 0:
                return f"command exited {proc.returncode}: {proc.stderr.strip()[:200]}"
        return None
