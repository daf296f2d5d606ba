"""Notifications through a real HTTP server on the loopback and a real command."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from accounting.ledger import Ledger
from accounting.notify import Notifier, NotifySettings, enqueue, pending

NS = 10 ** 9
T0 = 1_800_000_000 * NS


@pytest.fixture
def ledger(tmp_path):
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        ledger.add_subscriber("alice", "basic", "EUR")
        yield ledger


@pytest.fixture
def webhook():
    """A webhook that answers 500 to the first ``fail`` requests, then 204."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.headers["Idempotency-Key"], json.loads(body)))
            self.send_response(500 if len(seen) <= server.fail else 204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.fail = 0
    server.seen = seen
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_same_event_queued_twice_is_one_notification(ledger):
    assert enqueue(ledger, "block:1:5", "block", 1, {"reason": "limit"}, now=T0)
    assert not enqueue(ledger, "block:1:5", "block", 1, {"reason": "limit"}, now=T0 + NS)
    assert len(pending(ledger)) == 1


def test_webhook_retried_with_backoff_until_it_answers(ledger, webhook):
    webhook.fail = 2
    enqueue(ledger, "warn:1:7", "warn", 1, {"level": 1, "balance": "4.99 EUR"}, now=T0)
    url = f"http://127.0.0.1:{webhook.server_port}/hook"
    notifier = Notifier(ledger, NotifySettings(webhook=url, backoff=2.0))
    assert notifier.deliver_due(T0) == 0  # 500
    assert notifier.deliver_due(T0 + 1 * NS) == 0  # not due before 2 s: no request
    assert len(webhook.seen) == 1
    assert notifier.deliver_due(T0 + 2 * NS) == 0  # 500 again; next try 4 s later
    assert notifier.deliver_due(T0 + 6 * NS) == 1
    assert notifier.deliver_due(T0 + 100 * NS) == 0  # delivered: never again
    assert [key for key, _ in webhook.seen] == ["warn:1:7"] * 3
    assert webhook.seen[-1][1] == {"event": "warn", "key": "warn:1:7", "level": 1, "balance": "4.99 EUR"}
    (row,) = pending(ledger)
    assert row["attempts"] == 3 and row["delivered_ns"] and row["last_error"] is None


def test_attempts_run_out_and_the_error_is_kept(ledger, webhook):
    webhook.fail = 100
    enqueue(ledger, "block:1:9", "block", 1, {}, now=T0)
    notifier = Notifier(ledger, NotifySettings(webhook=f"http://127.0.0.1:{webhook.server_port}/", max_attempts=2,
                                               backoff=1.0))
    notifier.deliver_due(T0)
    notifier.deliver_due(T0 + 10 * NS)
    notifier.deliver_due(T0 + 100 * NS)
    assert len(webhook.seen) == 2
    (row,) = pending(ledger)
    assert row["failed_ns"] and row["delivered_ns"] is None and row["last_error"] == "webhook answered 500"


def test_unreachable_webhook_is_an_error_not_a_crash(ledger):
    enqueue(ledger, "block:1:10", "block", 1, {}, now=T0)
    Notifier(ledger, NotifySettings(webhook="http://127.0.0.1:9/", timeout=1.0)).deliver_due(T0)
    (row,) = pending(ledger)
    assert row["attempts"] == 1 and row["last_error"].startswith("webhook unreachable")


def test_command_gets_the_event_on_stdin(ledger, tmp_path):
    out = tmp_path / "events.jsonl"
    enqueue(ledger, "quota:1:0:80", "quota", 1, {"percent": 80}, now=T0)
    command = f'cat >> {out}; echo >> {out}; echo "$TOLLGATE_EVENT $TOLLGATE_KEY" >> {out}'
    assert Notifier(ledger, NotifySettings(command=command)).deliver_due(T0) == 1
    body, env = out.read_text().splitlines()
    assert json.loads(body) == {"event": "quota", "key": "quota:1:0:80", "percent": 80}
    assert env.split() == ["quota", "quota:1:0:80"]
    failing = Notifier(ledger, NotifySettings(command="echo nope >&2; exit 3"))
    enqueue(ledger, "quota:1:0:100", "quota", 1, {"percent": 100}, now=T0)
    failing.deliver_due(T0)
    assert pending(ledger)[-1]["last_error"] == "command exited 3: nope"


def test_gateways_sharing_a_ledger_send_each_notification_once(ledger_target, tmp_path):
    """Three gateways' notifiers deliver from one ledger at once (a command that appends the key to a
    file): every notification is sent exactly once, because each round claims its rows before sending
    (PostgreSQL: FOR UPDATE SKIP LOCKED)."""
    target = ledger_target()
    with Ledger.open(target) as led:
        led.add_subscriber("alice", "basic", "EUR")
        for i in range(60):
            enqueue(led, f"k{i}", "warning", 1, {"n": i}, now=T0)
    sent = tmp_path / "sent"
    settings = NotifySettings(command=f"cat >/dev/null; echo $TOLLGATE_KEY >> {sent}", timeout=5)
    start = threading.Barrier(3)
    errors = []

    def gateway():
        try:
            with Ledger.open(target) as own:
                notifier = Notifier(own, settings)
                start.wait(timeout=30)
                for _ in range(5):
                    notifier.deliver_due(now=T0 + NS)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=gateway) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    keys = sent.read_text().split()
    assert sorted(keys) == sorted(f"k{i}" for i in range(60))  # each once: none twice, none missing
    with Ledger.open(target) as led:
        assert all(n["delivered_ns"] and n["attempts"] == 1 for n in pending(led))
