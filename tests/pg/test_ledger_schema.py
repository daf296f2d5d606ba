"""The ledger's PostgreSQL schema against its SQLite schema, on a real server.

accounting/store/migrations/postgres/NNNN_*.sql translates
accounting/store/migrations/sqlite/NNNN_*.sql file by file. Here both are
applied, one file at a time (PostgreSQL: one transaction per file, with
psycopg; SQLite: sqlite3, split into statements as the ledger does), and after
every version the two catalogues must say the same: the same tables, the same
columns in the same order (integers as bigint, text as text, blobs as bytea,
the same NOT NULLs), the same primary keys and unique constraints, the same
named indexes (uniqueness, columns or expressions, partial predicates compared
loosely) and the same triggers, apart from the few PostgreSQL-only objects
listed below. Then what the schema must do that a catalogue does not show:
the change feed (and the payment and adjustment ids the gateway follows) in
commit order with concurrent writers, every integer column holding 2^63 - 1,
and the triggers and checks behaving the same on both backends.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest

psycopg = pytest.importorskip("psycopg")

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "accounting" / "store" / "migrations"
PG_DIR = STORE / "postgres"
# the SQLite migrations moved from accounting/migrations to accounting/store/migrations/sqlite
SQLITE_DIR = STORE / "sqlite" if (STORE / "sqlite").is_dir() else ROOT / "accounting" / "migrations"

MAX = (1 << 63) - 1

# PostgreSQL-only objects: the commit-ordered ids (0001's feed_head and its BEFORE INSERT triggers, 0014's
# on the change feed), the identity that follows explicit subscriber ids (0001) and the feed's NOTIFY (0023)
PG_ONLY_TABLES = {"feed_head"}
PG_ONLY_TRIGGERS = {("subscribers_follow_ids", "subscribers"), ("payments_commit_order", "payments"),
                    ("adjustments_commit_order", "adjustments"), ("changes_commit_order", "changes")}
PG_ONLY_TRIGGERS_FROM = {23: {("payments_notify", "payments"), ("adjustments_notify", "adjustments"),
                              ("changes_notify", "changes")}}  # by the version that makes them

# SQLite-only: its integer + integer past 2^63-1 turns into a float, which these refuse (0025); PostgreSQL's
# bigint refuses it itself (tests/unit/test_ledger_edges.py shows both)
SQLITE_ONLY_TRIGGERS_FROM = {25: {(f"{t}_sums_stay_integers", t) for t in ("subscribers", "usage", "charges", "grants",
                                                                          "kernel_marks", "bpf_marks")}}

SQLITE_TYPES = {"INTEGER": "bigint", "TEXT": "text", "BLOB": "bytea", "REAL": "double precision"}

_names = itertools.count(1)


def migrations(folder: Path) -> list[tuple[int, Path]]:
    found = sorted((int(p.name[:4]), p) for p in folder.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    assert [v for v, _ in found] == list(range(1, len(found) + 1)), f"{folder}: not numbered 1, 2, 3..."
    return found


def sqlite_statements(script: str):
    """Split a migration into statements, as the ledger does (sqlite3 runs one per execute)."""
    buf = ""
    for line in script.splitlines(keepends=True):
        if not buf and line.strip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf.strip()
            buf = ""
    if buf.strip():
        yield buf.strip()


def test_the_same_files_on_both_backends():
    pg, lite = migrations(PG_DIR), migrations(SQLITE_DIR)
    assert [p.name for _, p in pg] == [p.name for _, p in lite]
    assert len(lite) >= 20


# ---- databases ---------------------------------------------------------------------------------------------

@pytest.fixture
def new_pg(pg_cluster):
    """A function making an empty database (dropped at the end of the test); returns its conninfo."""
    made = []

    def make() -> str:
        name = f"ledger{os.getpid()}_{next(_names)}"
        made.append(name)
        return pg_cluster.create_database(name)

    yield make
    if pg_cluster.running:
        with psycopg.connect(pg_cluster.conninfo, autocommit=True) as conn:
            for name in made:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def apply_pg(conn, script: Path) -> None:
    with conn.transaction():
        conn.execute(script.read_text())


def apply_sqlite(conn, script: Path) -> None:
    conn.execute("BEGIN")
    for statement in sqlite_statements(script.read_text()):
        conn.execute(statement)
    conn.execute("COMMIT")


@pytest.fixture
def ledgers(new_pg, tmp_path):
    """(psycopg connection, sqlite3 connection), both migrated to the newest version."""
    pg = psycopg.connect(new_pg(), autocommit=True)
    lite = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    lite.execute("PRAGMA foreign_keys = ON")
    for (_, p), (_, s) in zip(migrations(PG_DIR), migrations(SQLITE_DIR)):
        apply_pg(pg, p)
        apply_sqlite(lite, s)
    yield pg, lite
    pg.close()
    lite.close()


# ---- the catalogues ----------------------------------------------------------------------------------------

def loose(sql: str | None) -> str | None:
    """An expression or predicate, for comparing SQLite's text with PostgreSQL's deparsed one: no casts,
    quotes around numbers, parentheses, blanks or case."""
    if sql is None:
        return None
    sql = re.sub(r"::[a-z]+( precision| varying)?(\[\])?", "", sql.lower())
    sql = re.sub(r"'(-?\d+)'", r"\1", sql)
    return re.sub(r"[\s()]", "", sql)


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _sqlite_index_sql(sql: str) -> tuple[list[str], str | None]:
    """The key list and the WHERE of ``CREATE [UNIQUE] INDEX name ON table (keys) [WHERE ...]``."""
    start = sql.index("(")
    depth = 0
    for end, ch in enumerate(sql[start:], start):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            break
    keys = [loose(k) for k in _split_top(sql[start + 1:end])]
    rest = sql[end + 1:].strip()
    where = re.match(r"(?is)where\s+(.*)", rest)
    return keys, loose(where.group(1)) if where else None


def _sqlite_foreign_keys(conn, table: str) -> list[tuple]:
    """``(columns, referenced table, referenced columns)`` of each foreign key."""
    keys: dict[int, list] = {}
    for fk_id, _seq, ref, col, ref_col, *_ in conn.execute(f"PRAGMA foreign_key_list({table})"):
        keys.setdefault(fk_id, []).append((ref, col, ref_col))
    return [(tuple(c for _, c, _ in rows), rows[0][0], tuple(r for _, _, r in rows)) for rows in keys.values()]


def _sqlite_checks(conn, table: str) -> int:
    """How many CHECK constraints the table has (SQLite keeps them only in its CREATE TABLE text, which its
    ALTER TABLE ADD COLUMN extends)."""
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    return len(re.findall(r"(?i)\bcheck\s*\(", re.sub(r"--[^\n]*", "", sql)))


def sqlite_catalogue(conn) -> dict:
    tables = {}
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"):
        cols = conn.execute(f"PRAGMA table_info({name})").fetchall()
        pk = [c[1] for c in sorted((c for c in cols if c[5]), key=lambda c: c[5])]
        tables[name] = {
            # (name, type, not null, default): a primary key column is NOT NULL on both (SQLite's rowid alias is)
            "columns": [(c[1], SQLITE_TYPES[c[2].upper()], bool(c[3]) or c[1] in pk, loose(c[4])) for c in cols],
            "checks": _sqlite_checks(conn, name),
            "primary_key": pk,
            "unique": sorted(tuple(r[2] for r in conn.execute(f"PRAGMA index_info({i[1]})"))
                             for i in conn.execute(f"PRAGMA index_list({name})") if i[3] == "u"),
            "foreign_keys": sorted(_sqlite_foreign_keys(conn, name)),
        }
    indexes = {}
    for name, table, sql in conn.execute("SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index'"
                                         " AND sql IS NOT NULL"):
        keys, where = _sqlite_index_sql(sql)
        unique = bool(re.match(r"(?i)\s*create\s+unique", sql))
        indexes[name] = (table, unique, keys, where)
    triggers = set(conn.execute("SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger'").fetchall())
    return {"tables": tables, "indexes": indexes, "triggers": triggers}


def pg_catalogue(conn) -> dict:
    tables = {}
    for (name,) in conn.execute("SELECT relname FROM pg_class WHERE relkind = 'r'"
                                " AND relnamespace = 'public'::regnamespace"):
        cols = conn.execute("SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,"
                            " pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a LEFT JOIN pg_attrdef d"
                            " ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
                            " WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped"
                            " ORDER BY a.attnum", (name,)).fetchall()
        checks = conn.execute("SELECT count(*) FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'c'",
                              (name,)).fetchone()[0]
        keys = {}
        for contype, columns in conn.execute(
                "SELECT c.contype, array_agg(a.attname ORDER BY k.ord) FROM pg_constraint c"
                " CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)"
                " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum"
                " WHERE c.conrelid = %s::regclass AND c.contype IN ('p', 'u') GROUP BY c.oid, c.contype",
                (name,)):
            keys.setdefault(contype, []).append(tuple(columns))
        foreign = conn.execute(
            "SELECT array(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(n, o) JOIN pg_attribute a"
            "             ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o),"
            " c.confrelid::regclass::text,"
            " array(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY k(n, o) JOIN pg_attribute a"
            "       ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o)"
            " FROM pg_constraint c WHERE c.conrelid = %s::regclass AND c.contype = 'f'", (name,)).fetchall()
        tables[name] = {"columns": [(n, t, nn, loose(d)) for n, t, nn, d in cols], "checks": checks,
                        "primary_key": list(keys.get("p", [()])[0]),
                        "unique": sorted(keys.get("u", [])),
                        "foreign_keys": sorted((tuple(c), ref, tuple(r)) for c, ref, r in foreign)}
    indexes = {}
    for name, table, unique, nkeys, pred, oid in conn.execute(
            "SELECT i.relname, t.relname, x.indisunique, x.indnkeyatts, pg_get_expr(x.indpred, x.indrelid),"
            " x.indexrelid FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
            " JOIN pg_class t ON t.oid = x.indrelid WHERE t.relnamespace = 'public'::regnamespace"
            " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)").fetchall():
        keys = [loose(conn.execute("SELECT pg_get_indexdef(%s, %s, true)", (oid, k)).fetchone()[0])
                for k in range(1, nkeys + 1)]
        indexes[name] = (table, unique, keys, loose(pred))
    triggers = set(conn.execute("SELECT g.tgname, c.relname FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid"
                                " WHERE NOT g.tgisinternal AND c.relnamespace = 'public'::regnamespace").fetchall())
    return {"tables": tables, "indexes": indexes, "triggers": triggers}


def test_every_version_has_the_same_catalogue_on_both(new_pg, tmp_path):
    pg = psycopg.connect(new_pg(), autocommit=True)
    lite = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    try:
        for (version, p), (_, s) in zip(migrations(PG_DIR), migrations(SQLITE_DIR)):
            apply_pg(pg, p)
            apply_sqlite(lite, s)
            want, got = sqlite_catalogue(lite), pg_catalogue(pg)
            at = f"after {p.name}"
            assert set(got["tables"]) - PG_ONLY_TABLES == set(want["tables"]), at
            for table, expected in want["tables"].items():
                assert got["tables"][table] == expected, f"{at}: table {table}"
            assert got["indexes"] == want["indexes"], at
            extra = {t for t in PG_ONLY_TRIGGERS if t[1] in got["tables"]}
            extra |= {t for v, made in PG_ONLY_TRIGGERS_FROM.items() if version >= v for t in made}
            lite_only = {t for v, made in SQLITE_ONLY_TRIGGERS_FROM.items() if version >= v for t in made}
            assert lite_only <= want["triggers"], at
            assert got["triggers"] == (want["triggers"] - lite_only) | extra, at
    finally:
        pg.close()
        lite.close()


def test_partial_and_expression_indexes_are_there(ledgers):
    """The loose comparison above compares something: the predicates and the expression as PostgreSQL has them."""
    pg, _ = ledgers
    cat = pg_catalogue(pg)["indexes"]
    assert cat["sessions_live_network"] == ("sessions", True, ["network"], "ended_nsisnull")
    assert cat["charges_hourly"][3] == "span_ns>0andspan_ns<=7200000000000"
    assert cat["audit_log_imports"][2] == ["json_extractafter,'$.file_sha256'"]
    assert cat["audit_log_imports"][3] == "action='subscriber.import'"


# ---- the change feed in commit order ------------------------------------------------------------------------

def _new_subscriber(cur, name: str) -> None:
    cur.execute("INSERT INTO subscribers (name, tariff, currency, created_ns) VALUES (%s, 'flat', 'EUR', 1)", (name,))


# what each writer does in its transaction, and the table whose ids a reader follows ("id > last seen")
WRITES = {
    "changes": (lambda cur, sid, n: _new_subscriber(cur, f"w{n}"), "changes"),
    "payments": (lambda cur, sid, n: cur.execute(
        "INSERT INTO payments (subscriber_id, amount, ts_ns, method) VALUES (%s, 5, 1, 'test')", (sid,)), "payments"),
    "adjustments": (lambda cur, sid, n: cur.execute(
        "INSERT INTO adjustments (subscriber_id, amount, ts_ns, reason, author) VALUES (%s, 5, 1, 'r', 'a')",
        (sid,)), "adjustments"),
}


def _waiting_on_a_lock(conn, pid: int) -> bool:
    return conn.execute("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted)", (pid,)).fetchone()[0]


@pytest.mark.parametrize("kind", sorted(WRITES))
def test_the_first_to_take_an_id_commits_first(new_pg, kind):
    """Writer A takes its id and stays open; writer B then writes too. With an identity B would take a higher
    id and commit first, and a reader that moved past B's id would never see A's. Here B waits for A's commit
    (the feed_head row lock) before it gets an id: ids come out in commit order and the reader misses nothing."""
    write, table = WRITES[kind]
    conninfo = new_pg()
    for _, p in migrations(PG_DIR):
        with psycopg.connect(conninfo) as conn:
            apply_pg(conn, p)
    with psycopg.connect(conninfo, autocommit=True) as setup:
        _new_subscriber(setup.cursor(), "payer")
        sid = setup.execute("SELECT id FROM subscribers WHERE name = 'payer'").fetchone()[0]
    a = psycopg.connect(conninfo)
    b = psycopg.connect(conninfo)
    reader = psycopg.connect(conninfo, autocommit=True)
    seen, last = [], reader.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0]

    def read():
        nonlocal last
        rows = [r[0] for r in reader.execute(f"SELECT id FROM {table} WHERE id > %s ORDER BY id", (last,))]
        seen.extend(rows)
        last = rows[-1] if rows else last

    try:
        write(a.cursor(), sid, 1)  # A takes its id (and the head lock) ...
        a_ids = [r[0] for r in a.execute(f"SELECT id FROM {table} WHERE id > %s", (last,))]
        assert a_ids
        b_pid = b.info.backend_pid
        commits = []

        def writer_b():
            write(b.cursor(), sid, 2)
            b.commit()
            commits.append("b")

        thread = threading.Thread(target=writer_b)
        thread.start()
        deadline = time.monotonic() + 10
        while not _waiting_on_a_lock(reader, b_pid) and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        b_waited = thread.is_alive() and _waiting_on_a_lock(reader, b_pid)
        read()  # B committed here if it did not wait: the reader moves past B's id
        # noted before A's commit returns: a B that waited for it may finish before this thread runs again
        commits.append("a")
        a.commit()  # ... and A commits last, unless B waited for it
        thread.join(10)
        assert not thread.is_alive()
        read()
        everything = [r[0] for r in reader.execute(f"SELECT id FROM {table} WHERE id >= %s ORDER BY id",
                                                   (min(a_ids),))]
        assert seen == everything, f"the reader missed {sorted(set(everything) - set(seen))}"
        assert commits == ["a", "b"]
        assert max(a_ids) < min(set(everything) - set(a_ids))  # A's ids below B's: commit order
        assert b_waited, "B took its id while A was open"
    finally:
        for conn in (a, b, reader):
            conn.close()


def _migrated(new_pg) -> str:
    conninfo = new_pg()
    with psycopg.connect(conninfo) as conn:
        for _, p in migrations(PG_DIR):
            apply_pg(conn, p)
    return conninfo


@pytest.mark.parametrize("kind", ["payments", "adjustments"])
def test_a_payment_and_a_change_of_the_same_subscriber_do_not_deadlock(new_pg, kind):
    """A payment is inserted (commit-ordered id: the feed_head lock), then its UPDATE of the balance; a change
    of the subscriber's terms at the same time holds the row, then writes the feed. Both take the row first,
    then the head: the second waits for the first instead of a deadlock (PostgreSQL would abort one)."""
    conninfo = _migrated(new_pg)
    with psycopg.connect(conninfo, autocommit=True) as setup:
        _new_subscriber(setup.cursor(), "payer")
        sid = setup.execute("SELECT id FROM subscribers WHERE name = 'payer'").fetchone()[0]
    pay, terms = psycopg.connect(conninfo), psycopg.connect(conninfo)
    watcher = psycopg.connect(conninfo, autocommit=True)
    errors = []
    try:
        WRITES[kind][0](pay.cursor(), sid, 1)

        def change_terms():
            try:
                terms.execute("UPDATE subscribers SET group_name = 'g' WHERE id = %s", (sid,))
                terms.commit()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=change_terms)
        thread.start()
        deadline = time.monotonic() + 10
        while not _waiting_on_a_lock(watcher, terms.info.backend_pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        pay.execute("UPDATE subscribers SET balance = balance + 5 WHERE id = %s", (sid,))
        pay.commit()
        thread.join(10)
        assert not errors, errors
        row = watcher.execute("SELECT balance, group_name FROM subscribers WHERE id = %s", (sid,)).fetchone()
        assert row == (5, "g")
    finally:
        for conn in (pay, terms, watcher):
            conn.close()


def test_a_reader_following_the_feeds_misses_nothing_under_concurrent_writers(new_pg):
    """Four writers, each transaction writing a subscriber, its address, a payment or an adjustment and then
    dawdling before its commit (so that with ids taken at insert they would commit out of order), while a
    reader follows each table by "id > last seen": in the end it has read every row."""
    conninfo = new_pg()
    for _, p in migrations(PG_DIR):
        with psycopg.connect(conninfo) as conn:
            apply_pg(conn, p)
    with psycopg.connect(conninfo, autocommit=True) as setup:
        _new_subscriber(setup.cursor(), "payer")
        sid = setup.execute("SELECT id FROM subscribers WHERE name = 'payer'").fetchone()[0]
    tables = ("changes", "payments", "adjustments")
    stop = threading.Event()
    errors = []
    counter = itertools.count(1)

    def writer(seed):
        rng = random.Random(seed)
        try:
            with psycopg.connect(conninfo) as conn:
                for _ in range(15):
                    with conn.transaction(), conn.cursor() as cur:
                        n = next(counter)
                        kind = rng.choice(("subscriber", "payment", "adjustment"))
                        if kind == "subscriber":
                            _new_subscriber(cur, f"c{n}")
                            cur.execute("INSERT INTO addresses (network, subscriber_id) SELECT %s, id FROM"
                                        " subscribers WHERE name = %s", (f"10.{n // 250}.{n % 250}.0/24", f"c{n}"))
                        else:
                            WRITES[kind + "s"][0](cur, sid, n)
                        time.sleep(rng.uniform(0, 0.02))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    seen = {t: [] for t in tables}
    with psycopg.connect(conninfo, autocommit=True) as reader:
        last = {t: reader.execute(f"SELECT coalesce(max(id), 0) FROM {t}").fetchone()[0] for t in tables}
        start = dict(last)

        def read():
            for t in tables:
                rows = [r[0] for r in reader.execute(f"SELECT id FROM {t} WHERE id > %s ORDER BY id", (last[t],))]
                seen[t].extend(rows)
                last[t] = rows[-1] if rows else last[t]

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        while any(th.is_alive() for th in threads):
            read()
            time.sleep(0.001)
        stop.set()
        read()
        assert not errors, errors
        for t in tables:
            everything = [r[0] for r in reader.execute(f"SELECT id FROM {t} WHERE id > %s ORDER BY id", (start[t],))]
            assert everything, t
            assert seen[t] == everything, f"{t}: the reader missed {sorted(set(everything) - set(seen[t]))}"


# ---- 2^63 - 1 -----------------------------------------------------------------------------------------------

def test_every_integer_column_is_a_bigint_and_holds_2_63_minus_1(ledgers):
    """Amounts are nano-units and times nanoseconds: every integer column is a bigint, and each holds 2^63 - 1
    (a row per table with every integer at the maximum, the table's CHECKs, exclusion constraints and
    triggers out of the way inside a transaction that is rolled back: what is tested is the storage)."""
    pg, lite = ledgers
    cat = pg_catalogue(pg)["tables"]
    for table, info in sqlite_catalogue(lite)["tables"].items():
        for (name, want, *_), (pg_name, got, *_) in zip(info["columns"], cat[table]["columns"]):
            assert (pg_name, got) == (name, want), f"{table}.{name}"
    for table in sorted(set(cat) - PG_ONLY_TABLES):
        columns = cat[table]["columns"]
        assert not [c for c in columns if c[1] in ("integer", "smallint", "numeric")], table
        values = {name: MAX if kind == "bigint" else b"\xff" if kind == "bytea" else "x" for name, kind, *_ in columns}
        with pg.transaction(force_rollback=True):
            pg.execute("SET LOCAL session_replication_role = replica")  # no triggers, no foreign keys
            for (check,) in pg.execute("SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass"
                                       " AND contype IN ('c', 'x')", (table,)).fetchall():
                pg.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{check}"')
            names = ", ".join(values)
            pg.execute(f"DELETE FROM {table}")  # the rows a migration seeds (feed_head, audit_head)
            pg.execute(f"INSERT INTO {table} ({names}) OVERRIDING SYSTEM VALUE VALUES"
                       f" ({', '.join(['%s'] * len(values))})", list(values.values()))
            back = pg.execute(f"SELECT {names} FROM {table}").fetchall()
            assert back == [tuple(values.values())], table


def test_commit_ordered_and_identity_ids_reach_2_63_minus_1(ledgers):
    """The sequences too: the ids the triggers take and the identities are bigint to the end."""
    pg, _ = ledgers
    for seq in ("payments_id_seq", "adjustments_id_seq", "changes_id_seq"):
        # to 2^63 - 1, and one id at a time (a session caching a block of ids would hand them out of order)
        assert pg.execute("SELECT max_value, cache_size FROM pg_sequences WHERE sequencename = %s",
                          (seq,)).fetchone() == (MAX, 1)
    for table, in pg.execute("SELECT table_name FROM information_schema.columns WHERE is_identity = 'YES'"
                             " AND table_schema = 'public'").fetchall():
        seq = pg.execute("SELECT pg_get_serial_sequence(%s, 'id')", (table,)).fetchone()[0]
        assert pg.execute(f"SELECT seqmax, seqtypid::regtype::text FROM pg_sequence WHERE seqrelid = '{seq}'::regclass"
                          ).fetchone() == (MAX, "bigint"), table
    with pg.transaction(force_rollback=True):
        pg.execute("SELECT setval('payments_id_seq', %s)", (MAX - 1,))
        _new_subscriber(pg.cursor(), "big")
        sid = pg.execute("SELECT id FROM subscribers WHERE name = 'big'").fetchone()[0]
        pg.execute("INSERT INTO payments (subscriber_id, amount, ts_ns, method) VALUES (%s, %s, %s, 'x')",
                   (sid, MAX, MAX))
        assert pg.execute("SELECT id, amount, ts_ns FROM payments").fetchone() == (MAX, MAX, MAX)


# ---- the same behaviour -------------------------------------------------------------------------------------

def _both(pg, lite, sql: str, args=()):
    """Run one statement on both backends (the code's ``?`` is psycopg's ``%s``)."""
    pg.execute(sql.replace("?", "%s"), args)
    lite.execute(sql, args)


FEED_SCRIPT = [
    ("INSERT INTO subscribers (name, tariff, currency, created_ns) VALUES (?, 'flat', 'EUR', 1)", ("a",)),
    ("INSERT INTO subscribers (name, tariff, currency, created_ns) VALUES (?, 'flat', 'EUR', 1)", ("b",)),
    ("UPDATE subscribers SET balance = balance - 7 WHERE id = 1", ()),             # a flush: no change
    ("UPDATE subscribers SET balance = balance - 7, name = 'a2' WHERE id = 1", ()),  # and a rename: a change
    ("UPDATE subscribers SET group_name = 'g' WHERE id = 2", ()),                   # the balance unchanged: a change
    ("UPDATE subscribers SET balance = balance + 1, group_name = NULL WHERE id = 2", ()),  # balance and terms: none
    ("UPDATE subscribers SET contract = NULL WHERE id = 1", ()),                    # NULL to NULL: a change
    ("UPDATE subscribers SET balance = 3, active = 0 WHERE id = 2", ()),
    ("INSERT INTO addresses (network, subscriber_id) VALUES ('10.0.0.0/24', 1)", ()),
    ("INSERT INTO addresses (network, subscriber_id) VALUES ('10.0.1.0/24', 1)", ()),
    ("UPDATE addresses SET subscriber_id = 2 WHERE network = '10.0.1.0/24'", ()),
    ("DELETE FROM addresses WHERE network = '10.0.0.0/24'", ()),
    ("INSERT INTO blocks (subscriber_id, kind, reason, ts_ns) VALUES (1, 'block', 'limit', 1)", ()),
    ("INSERT INTO blocks (subscriber_id, kind, reason, ts_ns) VALUES (1, 'block', 'manual: unpaid', 2)", ()),
    ("INSERT INTO blocks (subscriber_id, kind, reason, ts_ns) VALUES (2, 'unblock', 'manual', 3)", ()),
    ("INSERT INTO payments (subscriber_id, amount, ts_ns, method) VALUES (1, 5, 1, 'cash')", ()),  # not the feed
]


def test_the_change_feed_triggers_write_the_same_rows(ledgers):
    pg, lite = ledgers
    for sql, args in FEED_SCRIPT:
        _both(pg, lite, sql, args)
    query = "SELECT subscriber_id, what FROM changes ORDER BY id"
    want = lite.execute(query).fetchall()
    assert pg.execute(query).fetchall() == want
    assert want == [(1, "subscriber"), (2, "subscriber"), (1, "subscriber"), (2, "subscriber"), (1, "subscriber"),
                    (2, "subscriber"), (1, "addresses"), (1, "addresses"), (1, "addresses"), (2, "addresses"),
                    (1, "addresses"), (1, "manual"), (2, "manual")]
    ids = [r[0] for r in pg.execute("SELECT id FROM changes ORDER BY id")]
    assert ids == list(range(1, len(want) + 1))  # an INSERT's id comes from the feed, one each


def test_explicit_ids_then_default_ones(ledgers):
    """The bulk import gives subscribers ids from max + 1; the next one added without an id follows them on
    both backends (SQLite takes max(rowid) + 1, PostgreSQL's identity is moved past an explicit id)."""
    pg, lite = ledgers
    for sql, args in [
            ("INSERT INTO subscribers (name, tariff, currency, created_ns) VALUES ('first', 't', 'EUR', 1)", ()),
            ("INSERT INTO subscribers (id, name, tariff, currency, created_ns) VALUES (?, ?, 't', 'EUR', 1)", (10, "x")),
            ("INSERT INTO subscribers (id, name, tariff, currency, created_ns) VALUES (?, ?, 't', 'EUR', 1)", (11, "y")),
            ("INSERT INTO subscribers (name, tariff, currency, created_ns) VALUES ('next', 't', 'EUR', 1)", ()),
            ("INSERT INTO subscribers (id, name, tariff, currency, created_ns) VALUES (5, 'low', 't', 'EUR', 1)", ()),
            ("INSERT INTO subscribers (name, tariff, currency, created_ns) VALUES ('last', 't', 'EUR', 1)", ())]:
        _both(pg, lite, sql, args)
    query = "SELECT id, name FROM subscribers ORDER BY id"
    assert pg.execute(query).fetchall() == lite.execute(query).fetchall() == [
        (1, "first"), (5, "low"), (10, "x"), (11, "y"), (12, "next"), (13, "last")]


BAD_ROWS = [  # refused by a CHECK on both backends
    "INSERT INTO tariffs (name, version, spec, created_ns) VALUES ('t', 1, 'not json', 1)",
    "INSERT INTO tariffs (name, version, spec, created_ns) VALUES ('t', 0, '{}', 1)",
    "INSERT INTO audit_log (id, ts_ns, actor, action, target, before, after, prev_hash, hash)"
    " VALUES (1, 1, 'a', 'b', 'c', NULL, '{\"x\": ', 'p', 'h')",
    "INSERT INTO notifications (key, event, payload, created_ns, next_try_ns) VALUES ('k', 'warn', '[1,', 1, 1)",
    "UPDATE subscribers SET discount_bp = 10001",
    "UPDATE subscribers SET credit_limit = -1",
    "INSERT INTO usage (subscriber_id, zone, direction, minute, bytes, packets, amount, span)"
    " VALUES (1, 0, 0, 60, 1, 1, 1, 90)",
    "INSERT INTO charges (subscriber_id, flush_id, amount, ts_ns, span_ns) VALUES (1, NULL, 1, 1, 0)",
    "INSERT INTO charges (subscriber_id, flush_id, amount, ts_ns, span_ns) VALUES (1, 'g', 1, 1, 60)",
    "INSERT INTO rollup_state (id, timezone, hour_cutoff, day_cutoff) VALUES (2, 'UTC', 1, 1)",
    "INSERT INTO rollup_state (id, timezone, hour_cutoff, day_cutoff) VALUES (1, 'UTC', 1, 2)",
    "INSERT INTO sessions (network, subscriber_id, source, session_key, client, started_ns, last_seen_ns, ended_ns)"
    " VALUES ('10.0.0.1/32', 1, 'radius', 'k', 'c', 1, 1, 2)",
    "INSERT INTO vouchers (batch, serial, code_sha256, currency, valid_ns, tariff, created_ns, expires_ns)"
    " VALUES ('b', 's', 'c', 'EUR', 1, 't', 1, 1)",
    "INSERT INTO vouchers (batch, serial, code_sha256, value, currency, valid_ns, tariff, created_ns, expires_ns,"
    " first_used_ns) VALUES ('b', 's', 'c', 1, 'EUR', 1, 't', 1, 1, 5)",
    "INSERT INTO bpf_marks (subscriber_id, zone, direction, bytes, packets) VALUES (1, 0, 2, 1, 1)",
    "INSERT INTO api_tokens (name, role, digest, created_ns) VALUES ('n', 'root', 'd', 1)",
]

GOOD_ROWS = [  # accepted by both
    "INSERT INTO tariffs (name, version, spec, created_ns) VALUES ('t', 1, ' {\"a\": [1, 2.5, null, \"\\u00e9\"]}', 1)",
    "INSERT INTO audit_log (id, ts_ns, actor, action, target, before, after, prev_hash, hash)"
    " VALUES (1, 1, 'a', 'subscriber.import', 'c', NULL, '{\"file_sha256\": \"ab\"}', 'p', 'h')",
    "INSERT INTO flushes (id, ts_ns, rows, source) VALUES ('f', 1, 1, 's')",
    "INSERT INTO charges (subscriber_id, flush_id, amount, ts_ns) VALUES (1, 'f', 1, 1)",
    "INSERT INTO charges (subscriber_id, flush_id, amount, ts_ns, span_ns, flush_count) VALUES (1, NULL, 1, 1, 60, 2)",
    "INSERT INTO usage (subscriber_id, zone, direction, minute, bytes, packets, amount) VALUES (1, 0, 0, 60, 1, 1, 1)",
    "INSERT INTO vouchers (batch, serial, code_sha256, currency, volume, valid_ns, tariff, created_ns, expires_ns)"
    " VALUES ('b', 's', 'c', 'EUR', 5, 1, 't', 1, 1)",
]


def test_checks_refuse_and_accept_the_same_rows(ledgers):
    pg, lite = ledgers
    _both(pg, lite, "INSERT INTO subscribers (name, tariff, currency, created_ns) VALUES ('s', 't', 'EUR', 1)")
    _both(pg, lite, "INSERT INTO flushes (id, ts_ns, rows, source) VALUES ('g', 1, 1, 's')")
    for sql in BAD_ROWS:
        with pytest.raises(sqlite3.IntegrityError):
            lite.execute(sql)
        with pytest.raises(psycopg.errors.CheckViolation):
            with pg.transaction():
                pg.execute(sql)
    for sql in GOOD_ROWS:
        _both(pg, lite, sql)
    # a second live owner of a network, a second account from one voucher: refused by unique keys on both
    _both(pg, lite, "INSERT INTO sessions (network, subscriber_id, source, session_key, client, started_ns,"
                    " last_seen_ns) VALUES ('10.0.0.1/32', 1, 'radius', 'k', 'c', 1, 1)")
    twice = "INSERT INTO sessions (network, subscriber_id, source, session_key, client, started_ns, last_seen_ns)" \
            " VALUES ('10.0.0.1/32', 1, 'kea', 'k2', 'c', 2, 2)"
    with pytest.raises(sqlite3.IntegrityError):
        lite.execute(twice)
    with pytest.raises(psycopg.errors.UniqueViolation):
        with pg.transaction():
            pg.execute(twice)


def test_the_audit_import_lookup_is_the_same_sql_and_uses_its_index(ledgers):
    """Ledger.import_of's query, unchanged, on PostgreSQL (json_extract of schema 15) and through the index."""
    pg, lite = ledgers
    for i, digest in enumerate(["aa", "bb", "cc"], 1):
        _both(pg, lite, "INSERT INTO audit_log (id, ts_ns, actor, action, target, before, after, prev_hash, hash)"
                        " VALUES (?, 1, 'op', 'subscriber.import', 'x', NULL, ?, 'p', 'h')",
              (i, '{"file_sha256": "%s", "n": %d}' % (digest, i)))
    query = ("SELECT id FROM audit_log WHERE action = 'subscriber.import'"
             " AND json_extract(after, '$.file_sha256') = ? ORDER BY id LIMIT 1")
    assert pg.execute(query.replace("?", "%s"), ("bb",)).fetchall() == lite.execute(query, ("bb",)).fetchall() == [(2,)]
    with pg.transaction(force_rollback=True):
        pg.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in pg.execute("EXPLAIN " + query.replace("?", "%s"), ("bb",)))
    assert "audit_log_imports" in plan, plan
    assert re.search(r"Index Cond: \(json_extract\(after, '\$\.file_sha256'::text\) = ", plan), plan
    assert pg.execute("SELECT json_extract(%s, '$')", ('{"a": 1}',)).fetchone() == ('{"a": 1}',)
    assert pg.execute("SELECT json_extract(%s, '$.a.b')", ('{"a": {"b": "x"}}',)).fetchone() == ("x",)
    assert pg.execute("SELECT json_extract(%s, '$.missing')", ('{"a": 1}',)).fetchone() == (None,)
