"""Who may use the admin API and the subscriber portal, and what they may do.

Two kinds of callers, kept apart by *audience*:

- the admin API takes bearer tokens (``Authorization: Bearer tg_...``), each
  with a name and a role, made with ``tollgate token create``;
- the portal takes a subscriber's password once, then a signed session
  cookie. A portal session never passes as an admin one, nor the reverse:
  the audience is part of what is signed.

Roles and permissions (``allowed(role, permission)``):

=========  ======  =======  ==========  =========
role       read    write    payments    tokens
=========  ======  =======  ==========  =========
admin      yes     yes      yes         yes
operator   yes     no       no          no
cashier    yes     no       yes         no
=========  ======  =======  ==========  =========

- ``read``: look at subscribers, usage, balances, tariffs, blocks, the audit log;
- ``write``: change subscribers, tariffs and blocks;
- ``payments``: top-ups, adjustments, prepaid cards (money);
- ``tokens``: create, list and revoke API tokens.

An operator watches the network and may change nothing; a cashier takes
payments and needs to read subscribers to find whom to credit. Anything not
in the table is refused.

Secrets at rest. Tokens are 256 random bits and kept only as their SHA-256
(a fast hash cannot be searched backwards over that space). Portal
passwords are people's choices, so they get scrypt. The session-signing key
sits in the ledger's ``secrets`` table: whoever can read the ledger file can
forge sessions, as they can read every balance; keep it readable by the
gateway only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import threading
import time
import unicodedata
from collections import OrderedDict, deque
from dataclasses import dataclass

from accounting.ledger import Ledger
from ext.errors import TollgateError

__all__ = ["AUDIENCES", "PERMISSIONS", "ROLES", "AuthError", "PortalPasswords", "Principal", "RateLimiter",
           "SessionSigner", "TokenStore", "allowed", "session_secret"]

ROLES = ("admin", "operator", "cashier")
PERMISSIONS = ("read", "write", "payments", "tokens")
AUDIENCES = ("admin", "portal")

_GRANTS = {
    "admin": frozenset(PERMISSIONS),
    "operator": frozenset({"read"}),
    "cashier": frozenset({"read", "payments"}),
}

TOKEN_PREFIX = "tg_"
MAX_TOKEN_LENGTH = 200
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]+")  # what token_urlsafe produces
_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

PASSWORD_MIN, PASSWORD_MAX = 8, 256
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_SALT, SCRYPT_KEY = 2 ** 14, 8, 1, 16, 32

SESSION_SECRET_NAME = "session-signing-key"
MAX_SESSION_LENGTH = 4096


class AuthError(TollgateError, ValueError):
    """A request to the auth layer was refused (bad name, role or password,
    unknown token or subscriber); the message says why.

    Also a ValueError: it is bad input, whoever catches it by that name."""


def allowed(role: str, permission: str) -> bool:
    """True if ``role`` has ``permission`` (see the table in the module docstring).

    An unknown role has nothing. An unknown permission is a bug in the
    caller (a typo would silently refuse or, worse, be read as another
    permission), so it raises ValueError instead of answering.
    """
    if permission not in PERMISSIONS:
        raise ValueError(f"unknown permission {permission!r} (known: {', '.join(PERMISSIONS)})")
    return permission in _GRANTS.get(role, frozenset())


@dataclass(frozen=True)
class Principal:
    """Who is calling, once authenticated.

    ``kind`` is ``"admin-token"`` (``name`` is the token's name, ``role`` its
    role, ``audience`` ``"admin"``) or ``"portal"`` (``name`` the
    subscriber's, ``subscriber_id`` set, ``audience`` ``"portal"``).
    """

    kind: str
    name: str
    audience: str
    role: str | None = None
    subscriber_id: int | None = None

    def can(self, permission: str) -> bool:
        """True if this caller may do ``permission`` on the admin API (never, for a portal session)."""
        return self.audience == "admin" and self.kind == "admin-token" and allowed(self.role, permission)

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"token:{self.name}" if self.kind == "admin-token" else f"portal:{self.subscriber_id}"


# ---- API tokens ----------------------------------------------------------------

def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def _well_formed(token) -> bool:
    """Cheap checks before any lookup: anything else is simply not a token."""
    return (isinstance(token, str) and len(token) <= MAX_TOKEN_LENGTH and token.isascii()
            and token.startswith(TOKEN_PREFIX) and _TOKEN_CHARS.fullmatch(token, len(TOKEN_PREFIX)) is not None)


class TokenStore:
    """The admin API's bearer tokens in the ledger (``api_tokens``)."""

    _PUBLIC = ("id", "name", "role", "created_ns", "revoked_ns")

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def create(self, name: str, role: str, now_ns: int | None = None) -> str:
        """Make a token called ``name`` with ``role``; returns it in clear,
        the only time it exists so: the ledger keeps its SHA-256.

        Runs in ``ledger.transaction()``, so a caller can record it and its audit row together.
        """
        if not isinstance(name, str) or not _TOKEN_NAME.fullmatch(name):
            raise AuthError(f"bad token name {name!r}: 1-64 characters of letters, digits and . _ @ -, "
                            "starting with a letter or digit")
        if role not in ROLES:
            raise AuthError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.ledger.transaction():
            if self.ledger.db.execute("SELECT 1 FROM api_tokens WHERE name = ?", (name,)).fetchone():
                raise AuthError(f"a token named {name!r} exists (revoked tokens keep their names): choose another")
            self.ledger.db.execute("INSERT INTO api_tokens (name, role, digest, created_ns) VALUES (?, ?, ?, ?)",
                                   (name, role, _token_digest(token), time.time_ns() if now_ns is None else now_ns))
        return token

    def verify(self, token) -> Principal | None:
        """The principal ``token`` stands for; None if it is malformed, unknown or revoked. Never raises on input."""
        if not _well_formed(token):
            return None
        digest = _token_digest(token)
        row = self.ledger.db.execute("SELECT name, role, digest, revoked_ns FROM api_tokens WHERE digest = ?",
                                     (digest,)).fetchone()
        # the lookup found it by this very digest; compare anyway, in constant time, so that
        # correctness never rests on how SQLite compares text, and unknown tokens take the same path
        stored = row[2] if row else "0" * 64
        if not hmac.compare_digest(stored, digest) or row is None or row[3] is not None:
            return None
        return Principal(kind="admin-token", name=row[0], audience="admin", role=row[1])

    def revoke(self, name: str, now_ns: int | None = None) -> bool:
        """Revoke the token called ``name``: True if done now, False if it was
        revoked before; AuthError if there is no such token."""
        with self.ledger.transaction():
            row = self.ledger.db.execute("SELECT revoked_ns FROM api_tokens WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise AuthError(f"no token named {name!r}")
            # conditional, so that of two revocations at once (PostgreSQL runs them side by side) one is "now"
            return row[0] is None and self.ledger.db.execute(
                "UPDATE api_tokens SET revoked_ns = ? WHERE name = ? AND revoked_ns IS NULL",
                (time.time_ns() if now_ns is None else now_ns, name)).rowcount == 1

    def get(self, name: str) -> dict | None:
        """One token's public columns (never the digest), or None."""
        row = self.ledger.db.execute(f"SELECT {', '.join(self._PUBLIC)} FROM api_tokens WHERE name = ?",
                                     (name,)).fetchone()
        return None if row is None else dict(zip(self._PUBLIC, row))

    def list(self) -> list[dict]:
        """All tokens, revoked ones included, oldest first: id, name, role,
        created_ns, revoked_ns (never the digest)."""
        rows = self.ledger.db.execute(f"SELECT {', '.join(self._PUBLIC)} FROM api_tokens ORDER BY id")
        return [dict(zip(self._PUBLIC, r)) for r in rows]


# ---- portal passwords ------------------------------------------------------------

def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # maxmem: scrypt needs 128 * r * n bytes; OpenSSL's default cap (32 MiB) is close to that
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=64 * 2 ** 20)


def _normalise(password: str) -> str:
    # NFKC, as NIST SP 800-63B advises: the same password typed on two keyboards is the same password
    return unicodedata.normalize("NFKC", password)


def hash_password(password: str) -> str:
    """``scrypt$16384$8$1$<salt b64>$<key b64>`` of a password that follows the rules (else AuthError)."""
    if not isinstance(password, str):
        raise AuthError("a password is text")
    password = _normalise(password)
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise AuthError(f"a password has {PASSWORD_MIN} to {PASSWORD_MAX} characters, not {len(password)}")
    salt = secrets.token_bytes(SCRYPT_SALT)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_KEY)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


# verified against when there is no real hash, so that an unknown subscriber costs one scrypt like a known one
_DUMMY_HASH = (f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(secrets.token_bytes(SCRYPT_SALT))}$"
               f"{_b64(secrets.token_bytes(SCRYPT_KEY))}")


def _parse_hash(text) -> tuple[int, int, int, bytes, bytes] | None:
    """(n, r, p, salt, key) of a stored hash with sane parameters, or None."""
    try:
        scheme, n, r, p, salt, key = text.split("$")
        n, r, p = int(n), int(r), int(p)
        salt, key = base64.b64decode(salt, validate=True), base64.b64decode(key, validate=True)
    except (AttributeError, ValueError, binascii.Error):
        return None
    # bounds, so that a damaged row cannot make one login take minutes or gigabytes
    if scheme != "scrypt" or n < 2 or n & (n - 1) or n > 2 ** 20 or not 1 <= r <= 32 or not 1 <= p <= 16 \
            or len(salt) < 8 or not 16 <= len(key) <= 64:
        return None
    return n, r, p, salt, key


class PortalPasswords:
    """Subscribers' portal passwords in the ledger (``portal_passwords``)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def set(self, subscriber_id: int, password: str, now_ns: int | None = None) -> None:
        """Set (or replace) a subscriber's password: 8 to 256 characters, else AuthError (a ValueError).

        Runs in ``ledger.transaction()``, so a caller can record it and its audit row together.
        """
        sub = self.ledger.get_subscriber(subscriber_id) if isinstance(subscriber_id, int) else None
        if sub is None:
            raise AuthError(f"no subscriber with id {subscriber_id!r}")
        hashed = hash_password(password)
        with self.ledger.transaction():
            self.ledger.db.execute(
                "INSERT INTO portal_passwords (subscriber_id, hash, changed_ns) VALUES (?, ?, ?)"
                " ON CONFLICT (subscriber_id) DO UPDATE SET hash = excluded.hash, changed_ns = excluded.changed_ns",
                (sub["id"], hashed, time.time_ns() if now_ns is None else now_ns))

    def has_password(self, subscriber_id: int) -> bool:
        """True if the subscriber has a portal password."""
        return self.ledger.db.execute("SELECT 1 FROM portal_passwords WHERE subscriber_id = ?",
                                      (subscriber_id,)).fetchone() is not None

    def verify(self, subscriber_id: int | None, password) -> bool:
        """True if ``password`` is this subscriber's. ``subscriber_id`` may be
        None (the login named nobody): the answer is then False, after the
        same scrypt work as for a real subscriber, so the time taken does not
        tell which contracts exist. Never raises on input."""
        if not isinstance(password, str) or len(password) > 4 * PASSWORD_MAX:
            # no stored password is this long (the slack: NFKC may shorten what was typed); only the
            # caller's own input decides this, so answering fast tells nothing about the subscriber
            return False
        row = None
        if isinstance(subscriber_id, int) and not isinstance(subscriber_id, bool):
            row = self.ledger.db.execute("SELECT hash FROM portal_passwords WHERE subscriber_id = ?",
                                         (subscriber_id,)).fetchone()
        params = _parse_hash(row[0]) if row else None
        real = params is not None
        n, r, p, salt, key = params if real else _parse_hash(_DUMMY_HASH)
        candidate = _scrypt(_normalise(password), salt, n, r, p, len(key))
        return hmac.compare_digest(candidate, key) and real


# ---- rate limiting -------------------------------------------------------------------

class RateLimiter:
    """At most ``limit`` allowed hits per key in any ``window_s`` seconds (a sliding window).

    For login and token attempts, keyed by address or account. Only allowed
    hits are recorded, so a key holds at most ``limit`` timestamps and a
    refused caller waits for the window to pass its oldest hit, not longer.
    At most ``max_keys`` keys are kept: past that, the keys hit least
    recently are forgotten (their counts start again), which bounds memory
    whatever the number of addresses an attacker uses. Thread-safe.
    """

    def __init__(self, limit: int, window_s: float, max_keys: int = 100_000) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, not {limit!r}")
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, not {window_s!r}")
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys must be a positive integer, not {max_keys!r}")
        self.limit, self.window_s, self.max_keys = limit, float(window_s), max_keys
        self._hits: OrderedDict[object, deque[float]] = OrderedDict()  # least recently hit first
        self._lock = threading.Lock()

    def _recent(self, key, now: float) -> deque[float] | None:
        hits = self._hits.get(key)
        if hits is not None:
            while hits and hits[0] <= now - self.window_s:
                hits.popleft()
        return hits

    def hit(self, key, now: float | None = None) -> bool:
        """Record an attempt for ``key``: True if allowed, False if over the
        limit (a refused attempt is not recorded). ``now``: time.monotonic() seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            hits = self._recent(key, now)
            if hits is None:
                hits = self._hits[key] = deque()
            self._hits.move_to_end(key)
            if len(hits) >= self.limit:
                return False
            hits.append(now)
            while len(self._hits) > self.max_keys:
                self._hits.popitem(last=False)
            return True

    def retry_after(self, key, now: float | None = None) -> float:
        """Seconds until ``key`` may hit again; 0.0 if it may now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            hits = self._recent(key, now)
            if not hits or len(hits) < self.limit:
                return 0.0
            return max(0.0, hits[0] + self.window_s - now)

    def __len__(self) -> int:
        """How many keys are remembered."""
        with self._lock:
            return len(self._hits)


# ---- sessions -------------------------------------------------------------------------

def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    """Signed, expiring session values (cookies): ``<subject b64>.<expiry>.<mac b64>``.

    The MAC is HMAC-SHA256 over the audience, the subject and the expiry
    (epoch seconds). The audience is not in the value, only in the MAC: a
    value made for the portal fails for the admin API and the reverse. The
    subject is base64 so that no subject can contain the separators.
    Nothing is stored server-side; a session ends when it expires or when
    the key changes.
    """

    _CONTEXT = b"tollgate-session-v1"

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ValueError("a session secret is at least 16 random bytes")
        self._secret = secret

    def _mac(self, audience: str, subject_b64: str, expiry: str) -> str:
        # the expiry as written in the value, so that "0123" and "123" are not both valid spellings
        message = b"\0".join((self._CONTEXT, audience.encode(), subject_b64.encode(), expiry.encode()))
        return _b64url(hmac.new(self._secret, message, hashlib.sha256).digest())

    @staticmethod
    def _audience(audience: str) -> str:
        if audience not in AUDIENCES:
            raise ValueError(f"unknown audience {audience!r} (audiences: {', '.join(AUDIENCES)})")
        return audience

    def issue(self, subject: str, audience: str, ttl_s: int, now: float | None = None) -> str:
        """A session for ``subject`` valid for ``ttl_s`` seconds, for ``audience`` only."""
        self._audience(audience)
        if not isinstance(subject, str) or not subject:
            raise ValueError("a session's subject is a non-empty string")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s <= 0:
            raise ValueError(f"ttl_s must be a positive integer, not {ttl_s!r}")
        expiry = int(time.time() if now is None else now) + ttl_s
        subject_b64 = _b64url(subject.encode("utf-8"))
        return f"{subject_b64}.{expiry}.{self._mac(audience, subject_b64, str(expiry))}"

    def verify(self, value, audience: str, now: float | None = None) -> str | None:
        """The subject of a valid, unexpired session for ``audience``; None
        for anything else (never raises on ``value``)."""
        self._audience(audience)
        if not isinstance(value, str) or len(value) > MAX_SESSION_LENGTH or not value.isascii():
            return None
        parts = value.split(".")
        if len(parts) != 3 or not parts[1].isdigit() or len(parts[1]) > 12:
            return None
        subject_b64, expiry, mac = parts
        if not hmac.compare_digest(self._mac(audience, subject_b64, expiry), mac):
            return None
        if (time.time() if now is None else now) >= int(expiry):
            return None
        try:
            return _unb64url(subject_b64).decode("utf-8")
        except (ValueError, binascii.Error):
            return None


def session_secret(ledger: Ledger) -> bytes:
    """The ledger's session-signing key: 32 random bytes made on first use
    and kept in ``secrets``, so sessions survive a restart and every process
    on this ledger signs alike."""
    query = "SELECT value FROM secrets WHERE name = ?"
    row = ledger.db.execute(query, (SESSION_SECRET_NAME,)).fetchone()
    if row is not None:  # the usual case: no write lock
        return row[0]
    # two processes starting at once agree on one key: the second's insert waits on the name's key, then
    # does nothing, and reads the first's
    with ledger.transaction():
        ledger.db.execute("INSERT INTO secrets (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                          (SESSION_SECRET_NAME, secrets.token_bytes(32)))
        return ledger.db.execute(query, (SESSION_SECRET_NAME,)).fetchone()[0]
