"""Prepaid cards against a real SQLite ledger, two connections racing included."""

from __future__ import annotations

import re
import threading
import time

import pytest

from accounting import prepaid
from accounting.ledger import Ledger

EUR = 10 ** 9
LATER = time.time_ns() + 86400 * 10 ** 9


@pytest.fixture
def ledger(ledger_target):
    with Ledger.open(ledger_target()) as ledger:
        ledger.add_subscriber("alice", "basic", "EUR")
        ledger.add_subscriber("bob", "basic", "EUR")
        yield ledger


def test_codes_are_unguessable_and_kept_only_hashed(ledger, tmp_path):
    cards = prepaid.generate(ledger, 200, 10 * EUR, "EUR", LATER, batch="b1")
    codes = [code for _serial, code in cards]
    assert len(set(codes)) == 200
    assert all(re.fullmatch(r"([0-9A-HJKMNP-TV-Z]{4}-){3}[0-9A-HJKMNP-TV-Z]{4}", c) for c in codes)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*"))
    assert not any(c.replace("-", "").encode() in raw or c.encode() in raw for c in codes)


def test_a_card_pays_once(ledger):
    (serial, code), = prepaid.generate(ledger, 1, 10 * EUR, "EUR", LATER)
    done = prepaid.activate(ledger, "alice", code.lower().replace("-", " "))  # as a person might type it
    assert done["serial"] == serial and ledger.balance("alice") == 10 * EUR
    for who in ("alice", "bob"):
        with pytest.raises(prepaid.CardError, match="has been used"):
            prepaid.activate(ledger, who, code)
    assert ledger.balance("bob") == 0
    assert [p["method"] for p in ledger.payments("alice")] == ["card"]


def test_expired_and_foreign_cards(ledger):
    (_s, code), = prepaid.generate(ledger, 1, EUR, "EUR", LATER)
    with pytest.raises(prepaid.CardError, match="expired"):
        prepaid.activate(ledger, "alice", code, now=LATER)
    (_s, usd), = prepaid.generate(ledger, 1, EUR, "USD", LATER)
    with pytest.raises(prepaid.CardError, match="in USD"):
        prepaid.activate(ledger, "alice", usd)
    with pytest.raises(prepaid.CardError):
        prepaid.generate(ledger, 1, EUR, "EUR", time.time_ns() - 1)


def test_guessing_is_limited_per_subscriber(ledger):
    (_s, code), = prepaid.generate(ledger, 1, EUR, "EUR", LATER)
    t = time.time_ns()
    for k in range(prepaid.MAX_FAILURES):
        with pytest.raises(prepaid.CardError, match="no card"):
            prepaid.activate(ledger, "alice", "0000-0000-0000-000" + str(k), now=t + k)
    with pytest.raises(prepaid.CardError, match="too many"):
        prepaid.activate(ledger, "alice", code, now=t + 10)  # even the right code, for now
    prepaid.activate(ledger, "bob", code, now=t + 10)  # bob is not held back by alice's guesses
    assert ledger.balance("bob") == EUR


def test_two_activations_racing_pay_once(ledger, tmp_path):
    (_s, code), = prepaid.generate(ledger, 1, 5 * EUR, "EUR", LATER)
    results = []

    def activate(who):
        with Ledger.open(ledger.path) as own:
            try:
                results.append(prepaid.activate(own, who, code))
            except prepaid.CardError as exc:
                results.append(str(exc))

    threads = [threading.Thread(target=activate, args=(w,)) for w in ("alice", "bob")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sum(isinstance(r, dict) for r in results) == 1
    assert ledger.balance("alice") + ledger.balance("bob") == 5 * EUR
    assert ledger.check_invariants() == []
