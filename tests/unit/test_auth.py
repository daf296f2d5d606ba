"""Admin tokens, portal passwords, rate limiting and sessions against a real SQLite ledger,
and the `tollgate token` and `tollgate subscriber password` commands run as a user would."""

from __future__ import annotations

import hashlib
import hmac
import os
import pwd
import re
import subprocess
import sys
import threading

import pytest

from accounting.audit import AuditLog
from accounting.ledger import Ledger
from api.auth import (PERMISSIONS, ROLES, AuthError, PortalPasswords, Principal, RateLimiter, SessionSigner,
                      TokenStore, allowed, session_secret)

PASSWORD = "correct horse battery"


@pytest.fixture
def ledger(tmp_path):
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        ledger.add_subscriber("alice", "basic", "EUR")
        ledger.add_subscriber("bob", "basic", "EUR")
        yield ledger


@pytest.fixture
def compare_calls(monkeypatch):
    """Records every call of hmac.compare_digest (the standard library's; the real one still answers)."""
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return calls


@pytest.fixture
def scrypt_calls(monkeypatch):
    """Counts hashlib.scrypt computations (the real one still runs)."""
    calls = []
    real = hashlib.scrypt

    def spy(*args, **kwargs):
        calls.append(kwargs.get("n"))
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", spy)
    return calls


# ---- roles ---------------------------------------------------------------------------

def test_the_permission_table():
    table = {role: {p for p in PERMISSIONS if allowed(role, p)} for role in ROLES}
    assert table == {"admin": {"read", "write", "payments", "tokens"},
                     "operator": {"read"},
                     "cashier": {"read", "payments"}}
    assert not any(allowed(role, p) for role in ("root", "", None, "Admin") for p in PERMISSIONS)
    with pytest.raises(ValueError, match="unknown permission"):
        allowed("admin", "delete")


def test_a_portal_principal_can_do_nothing_on_the_admin_api():
    portal = Principal(kind="portal", name="alice", audience="portal", subscriber_id=1)
    assert not any(portal.can(p) for p in PERMISSIONS) and portal.actor == "portal:1"
    cashier = Principal(kind="admin-token", name="desk", audience="admin", role="cashier")
    assert cashier.can("payments") and not cashier.can("write") and cashier.actor == "token:desk"
    with pytest.raises(AttributeError):
        cashier.role = "admin"  # frozen


# ---- tokens -----------------------------------------------------------------------------

def test_a_token_is_shown_once_and_kept_only_as_its_digest(ledger, tmp_path):
    store = TokenStore(ledger)
    token = store.create("desk", "cashier")
    assert re.fullmatch(r"tg_[A-Za-z0-9_-]{43}", token)
    (digest,) = ledger.db.execute("SELECT digest FROM api_tokens WHERE name = 'desk'").fetchone()
    assert digest == hashlib.sha256(token.encode()).hexdigest() and digest != token
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*"))
    assert token.encode() not in raw and token[3:].encode() not in raw
    assert store.verify(token) == Principal(kind="admin-token", name="desk", audience="admin", role="cashier")
    (row,) = store.list()
    assert set(row) == {"id", "name", "role", "created_ns", "revoked_ns"} and row["revoked_ns"] is None
    assert digest not in repr(store.list()) and digest not in repr(store.get("desk"))


def test_tokens_are_distinct_names_unique_roles_known(ledger):
    store = TokenStore(ledger)
    tokens = {store.create(f"t{k}", ROLES[k % 3]) for k in range(20)}
    assert len(tokens) == 20
    with pytest.raises(AuthError, match="exists"):
        store.create("t1", "admin")
    with pytest.raises(AuthError, match="unknown role"):
        store.create("new", "root")
    for bad in ("", " desk", "a b", "x" * 65, "-lead", "é"):
        with pytest.raises(AuthError, match="bad token name"):
            store.create(bad, "admin")
    assert len(store.list()) == 20


def test_a_revoked_token_fails(ledger):
    store = TokenStore(ledger)
    keep, drop = store.create("keep", "admin"), store.create("drop", "operator")
    assert store.revoke("drop") is True
    assert store.revoke("drop") is False  # twice is no error, and changes nothing
    assert store.verify(drop) is None and store.verify(keep).name == "keep"
    assert store.get("drop")["revoked_ns"] is not None
    with pytest.raises(AuthError, match="no token named"):
        store.revoke("nobody")
    with pytest.raises(AuthError, match="exists"):
        store.create("drop", "operator")  # a revoked token's name stays taken


def test_wrong_and_malformed_tokens_are_simply_none(ledger):
    store = TokenStore(ledger)
    token = store.create("desk", "admin")
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    bad = [None, 42, b"tg_abc", token.encode(), "", "tg_", "TG_" + token[3:], "xx_" + token[3:], token[3:],
           flipped, token + "\n", " " + token, token + "=", "tg_" + "é" * 43, "tg_" + "a" * 198, "tg_\x00" + token[4:],
           token + "a" * (201 - len(token)), "tg_" + "a" * 10 ** 6]
    for value in bad:
        assert store.verify(value) is None, repr(value)[:60]
    assert store.verify(token) is not None


def test_verifying_a_token_compares_in_constant_time(ledger, compare_calls):
    store = TokenStore(ledger)
    token = store.create("desk", "admin")
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert store.verify(token) is not None
    assert compare_calls == [(digest, digest)]
    compare_calls.clear()
    unknown = "tg_" + "A" * 43  # well-formed but nobody's: the same comparison runs
    assert store.verify(unknown) is None
    assert len(compare_calls) == 1 and compare_calls[0][1] == hashlib.sha256(unknown.encode()).hexdigest()


# ---- portal passwords --------------------------------------------------------------------------

def test_portal_password_right_and_wrong(ledger):
    passwords = PortalPasswords(ledger)
    alice = ledger.get_subscriber("alice")["id"]
    passwords.set(alice, PASSWORD)
    (stored,) = ledger.db.execute("SELECT hash FROM portal_passwords WHERE subscriber_id = ?", (alice,)).fetchone()
    assert re.fullmatch(r"scrypt\$16384\$8\$1\$[A-Za-z0-9+/]{22}==\$[A-Za-z0-9+/]{43}=", stored)
    assert passwords.verify(alice, PASSWORD)
    for wrong in ("correct horse battery ", "Correct horse battery", "", "x" * 2000, None, b"correct horse battery"):
        assert not passwords.verify(alice, wrong)
    bob = ledger.get_subscriber("bob")["id"]
    assert not passwords.verify(bob, PASSWORD)  # bob has none
    passwords.set(alice, "another one!")
    assert passwords.verify(alice, "another one!") and not passwords.verify(alice, PASSWORD)


def test_the_same_password_twice_is_two_different_hashes(ledger):
    passwords = PortalPasswords(ledger)
    passwords.set(1, PASSWORD)
    passwords.set(2, PASSWORD)
    a, b = (h for (h,) in ledger.db.execute("SELECT hash FROM portal_passwords ORDER BY subscriber_id"))
    assert a != b and a.split("$")[4] != b.split("$")[4]


def test_password_rules(ledger):
    passwords = PortalPasswords(ledger)
    for bad in ("", "short12", "x" * 257):
        with pytest.raises(ValueError, match=f"8 to 256 characters, not {len(bad)}"):
            passwords.set(1, bad)
    with pytest.raises(AuthError, match="text"):
        passwords.set(1, b"bytes password")
    for good in ("exactly8", "y" * 256):
        passwords.set(1, good)
        assert passwords.verify(1, good)
    for who in (999, None, "alice"):
        with pytest.raises(AuthError, match="no subscriber"):
            passwords.set(who, PASSWORD)


def test_a_password_typed_in_another_unicode_form_is_the_same(ledger):
    passwords = PortalPasswords(ledger)
    passwords.set(1, "caf\u00e9 au lait")  # é as one code point
    assert passwords.verify(1, "cafe\u0301 au lait")  # e + combining accent, as some keyboards send it


def test_unknown_subscribers_cost_one_scrypt_like_known_ones(ledger, scrypt_calls, compare_calls):
    passwords = PortalPasswords(ledger)
    passwords.set(1, PASSWORD)
    scrypt_calls.clear()
    for who in (1, 2, 999, None, True, "alice"):  # right, no password, unknown, nobody, nonsense
        compare_calls.clear()
        assert passwords.verify(who, PASSWORD) is (who == 1 and who is not True)
        assert scrypt_calls == [2 ** 14] and len(compare_calls) == 1, who
        scrypt_calls.clear()


def test_a_damaged_stored_hash_refuses_without_raising(ledger, scrypt_calls):
    passwords = PortalPasswords(ledger)
    passwords.set(1, PASSWORD)
    for damaged in ("plain", "scrypt$16384$8$1$!!$!!", "scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA==$"
                    + "A" * 43 + "=", "bcrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 43 + "="):
        ledger.db.execute("UPDATE portal_passwords SET hash = ? WHERE subscriber_id = 1", (damaged,))
        scrypt_calls.clear()
        assert passwords.verify(1, PASSWORD) is False
        assert scrypt_calls == [2 ** 14]  # the dummy's cost, never the damaged row's


# ---- rate limiter -----------------------------------------------------------------------------

def test_the_20th_hit_in_the_window_is_refused_when_the_limit_is_19():
    limiter = RateLimiter(limit=19, window_s=60)
    assert all(limiter.hit("10.0.0.1", now=100.0 + k) for k in range(19))
    assert limiter.retry_after("10.0.0.1", now=118.0) == pytest.approx(42.0)  # the first hit leaves at 160
    assert limiter.hit("10.0.0.1", now=118.5) is False
    assert limiter.hit("10.0.0.2", now=118.5) is True  # keys are counted apart
    assert limiter.retry_after("10.0.0.2", now=118.5) == 0.0


def test_the_window_slides():
    limiter = RateLimiter(limit=3, window_s=10)
    assert [limiter.hit("k", now=t) for t in (0.0, 1.0, 2.0, 5.0)] == [True, True, True, False]
    assert limiter.hit("k", now=9.9) is False
    assert limiter.hit("k", now=10.0) is True  # the hit at 0 has left the window
    assert limiter.hit("k", now=10.5) is False
    assert limiter.retry_after("k", now=10.5) == pytest.approx(0.5)
    assert limiter.hit("k", now=100.0) and limiter.retry_after("k", now=100.0) == 0.0
    assert limiter.retry_after("never seen") == 0.0


def test_refused_hits_do_not_prolong_the_wait():
    limiter = RateLimiter(limit=2, window_s=10)
    limiter.hit("k", now=0.0)
    limiter.hit("k", now=0.0)
    for t in range(1, 10):
        assert limiter.hit("k", now=float(t)) is False
    assert limiter.hit("k", now=10.0) is True


def test_memory_is_bounded_by_max_keys():
    limiter = RateLimiter(limit=1, window_s=3600, max_keys=100)
    for k in range(1000):
        assert limiter.hit(f"addr{k}", now=1.0)
    assert len(limiter) == 100
    assert limiter.hit("addr999", now=2.0) is False  # recent keys are remembered
    assert limiter.hit("addr0", now=2.0) is True  # the oldest were forgotten
    assert len(limiter) == 100


def test_the_limiter_counts_exactly_under_threads():
    limiter = RateLimiter(limit=100, window_s=3600)
    allowed_hits = []
    start = threading.Barrier(8)

    def hammer():
        start.wait()
        allowed_hits.append(sum(limiter.hit("shared") for _ in range(50)))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sum(allowed_hits) == 100


def test_limiter_arguments():
    for bad in ({"limit": 0, "window_s": 1}, {"limit": 1, "window_s": 0}, {"limit": 1, "window_s": 1, "max_keys": 0}):
        with pytest.raises(ValueError):
            RateLimiter(**bad)


# ---- sessions -------------------------------------------------------------------------------------

def test_a_session_verifies_for_its_audience_only():
    signer = SessionSigner(b"k" * 32)
    portal = signer.issue("17", "portal", ttl_s=3600, now=1000)
    admin = signer.issue("desk", "admin", ttl_s=3600, now=1000)
    assert signer.verify(portal, "portal", now=2000) == "17"
    assert signer.verify(admin, "admin", now=2000) == "desk"
    assert signer.verify(portal, "admin", now=2000) is None
    assert signer.verify(admin, "portal", now=2000) is None
    with pytest.raises(ValueError, match="audience"):
        signer.issue("17", "root", ttl_s=60)
    with pytest.raises(ValueError, match="audience"):
        signer.verify(portal, "everyone")


def test_a_session_expires_and_cannot_be_altered():
    signer = SessionSigner(b"k" * 32)
    value = signer.issue("17", "portal", ttl_s=60, now=1000)
    assert signer.verify(value, "portal", now=1059.9) == "17"
    assert signer.verify(value, "portal", now=1060) is None
    subject, expiry, mac = value.split(".")
    other_subject = signer.issue("18", "portal", ttl_s=60, now=1000).split(".")[0]
    for forged in (f"{other_subject}.{expiry}.{mac}", f"{subject}.{int(expiry) + 3600}.{mac}",
                   f"{subject}.0{expiry}.{mac}", f"{subject}.{expiry}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}",
                   f"{subject}.{expiry}.{mac}.x", f"{subject}.{expiry}"):
        assert signer.verify(forged, "portal", now=1001) is None, forged
    assert SessionSigner(b"j" * 32).verify(value, "portal", now=1001) is None  # another key


def test_sessions_carry_any_subject_and_refuse_garbage():
    signer = SessionSigner(b"k" * 32)
    for subject in ("a.b.c", "Zoë 🙂", "x" * 500):
        assert signer.verify(signer.issue(subject, "admin", ttl_s=10, now=0), "admin", now=5) == subject
    for garbage in (None, 7, b"x.1.y", "", "..", "a.b.c", "a.1.c", "a.-1.c", "é.1.c", "a." + "9" * 40 + ".c",
                    "x" * 10 ** 5):
        assert signer.verify(garbage, "admin") is None
    with pytest.raises(ValueError):
        SessionSigner(b"short")
    with pytest.raises(ValueError):
        signer.issue("", "admin", ttl_s=10)
    with pytest.raises(ValueError):
        signer.issue("a", "admin", ttl_s=0)


def test_the_session_secret_is_made_once_and_kept(ledger, tmp_path):
    first = session_secret(ledger)
    assert isinstance(first, bytes) and len(first) == 32
    assert session_secret(ledger) == first
    with Ledger.open(tmp_path / "ledger.db") as again:
        assert session_secret(again) == first
    value = SessionSigner(first).issue("1", "portal", ttl_s=60)
    assert SessionSigner(session_secret(ledger)).verify(value, "portal") == "1"


def test_the_session_secret_is_one_key_when_processes_race(tmp_path):
    path = tmp_path / "fresh.db"
    Ledger.open(path).close()
    keys = []

    def take():
        with Ledger.open(path) as own:
            keys.append(session_secret(own))

    threads = [threading.Thread(target=take) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(keys) == 6 and len(set(keys)) == 1


# ---- the commands ------------------------------------------------------------------------------------

def tollgate(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                          input=stdin if stdin is not None else "")


ME = f"cli:{pwd.getpwuid(os.geteuid()).pw_name}"


def test_token_commands(ledger):
    db = ["--db", ledger.path]
    out = tollgate("token", "create", "desk", "--role", "cashier", *db)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert re.fullmatch(r"tg_[A-Za-z0-9_-]{43}", token) and "shown once" in out.stderr
    assert TokenStore(ledger).verify(token).role == "cashier"
    listing = tollgate("token", "list", *db)
    assert listing.returncode == 0 and re.search(r"desk\s+cashier\s+created .*active", listing.stdout)
    assert token not in listing.stdout
    out = tollgate("token", "revoke", "desk", *db)
    assert out.returncode == 0 and "revoked" in out.stdout
    assert TokenStore(ledger).verify(token) is None
    assert "revoked 20" in tollgate("token", "list", *db).stdout
    rows = AuditLog(ledger).rows()
    assert [(r["actor"], r["action"], r["target"]) for r in rows] == [(ME, "token.create", "token:desk"),
                                                                     (ME, "token.revoke", "token:desk")]
    assert rows[0]["after"] == {"name": "desk", "role": "cashier"}
    assert rows[1]["before"]["revoked_ns"] is None and rows[1]["after"]["revoked_ns"] is not None
    assert token not in repr(rows)


def test_token_commands_refuse_bad_requests_and_write_nothing(ledger):
    db = ["--db", ledger.path]
    tollgate("token", "create", "desk", "--role", "admin", *db)
    for args, message in ((["create", "desk", "--role", "admin"], "exists"), (["create", "x"], "needs --role"),
                          (["create", "bad name", "--role", "admin"], "bad token name"),
                          (["revoke", "nobody"], "no token named"), (["revoke"], "needs NAME")):
        out = tollgate("token", *args, *db)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
    assert tollgate("token", "create", "y", "--role", "root", *db).returncode == 2  # argparse's choices
    assert len(TokenStore(ledger).list()) == 1 and len(AuditLog(ledger).rows()) == 1


def test_the_token_commands_find_the_ledger_through_the_config(ledger, tmp_path):
    (tmp_path / "tollgate.toml").write_text(f"""
[gateway]
currency = "EUR"
timezone = "UTC"
database = "{ledger.path}"

[[tariff]]
name = "basic"
price_unit = "MB"
[tariff.prices]
external = "0.01"
""")
    out = tollgate("token", "create", "ops", "--role", "operator", "-c", str(tmp_path / "tollgate.toml"))
    assert out.returncode == 0, out.stderr
    assert TokenStore(ledger).verify(out.stdout.strip()).name == "ops"


def test_subscriber_password_from_stdin(ledger):
    db = ["--db", ledger.path]
    out = tollgate("subscriber", "password", "alice", *db, stdin=PASSWORD + "\n")
    assert out.returncode == 0 and "password set" in out.stdout, out.stderr
    assert PortalPasswords(ledger).verify(1, PASSWORD)
    out = tollgate("subscriber", "password", "1", *db, stdin="a new password\r\n")
    assert out.returncode == 0 and "password changed" in out.stdout
    assert PortalPasswords(ledger).verify(1, "a new password") and not PortalPasswords(ledger).verify(1, PASSWORD)
    for args, stdin, message in ((["alice"], "short\n", "8 to 256 characters"), (["nobody"], PASSWORD, "no subscriber")):
        out = tollgate("subscriber", "password", *args, *db, stdin=stdin)
        assert out.returncode == 2 and message in out.stderr
    assert PortalPasswords(ledger).verify(1, "a new password")
    rows = AuditLog(ledger).rows()
    assert [(r["actor"], r["action"], r["target"]) for r in rows] == [(ME, "subscriber.password", "subscriber:1")] * 2
    assert rows[0]["before"]["name"] == "alice" and PASSWORD not in repr(rows)
    assert AuditLog(ledger).verify() == (True, None)
