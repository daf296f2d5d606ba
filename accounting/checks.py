"""The ledger's invariants, checked from its rows (``tollgate ledger check``).

The ledger keeps a balance per subscriber as a cache next to the history it
sums (opening balance, payments, adjustments, charges, postings), so a bug, a
hand edit or a damaged file shows up as a cache that disagrees with its
history. :func:`check_ledger` recomputes everything that can be recomputed and
says, one line per problem, what disagrees:

- the database's own checks (:meth:`accounting.store.backend.Backend.integrity_problems`:
  SQLite's pages, indexes, NOT NULL and foreign keys);
- per subscriber: balance = opening + payments + adjustments - charges - postings,
  and the usage amounts add up to the charges (both are written by one flush);
- flushes: ids unique, at most one charge per subscriber per flush, charges
  and payments positive, adjustments not zero;
- rollups (``accounting.rollup``): every hourly or daily row of usage and
  charges is one whole local hour or day of the ledger's time zone, lies
  before the cutoff that allows it, and a rolled charge counts its flushes;
- addresses: canonical prefixes, and no prefix of one subscriber overlapping a
  prefix of another (``accounting.operations`` refuses them; a ledger written
  before that, or by hand, may hold some: the engine then takes the longest
  match, and who pays for an address depends on what else is registered);
- sessions (``accounting.sessions``): each live one holds its address row, each session-marked address
  row is a live session's, and no two sessions of one network overlap in time;
- the audit log's hash chain (``accounting.audit``).

Read only: nothing is repaired, because which side of a disagreement is right
is for a person to decide.
"""

from __future__ import annotations

import ipaddress

from ext.errors import LedgerError

__all__ = ["check_ledger", "summary"]

MAX_LISTED = 50  # lines per kind of problem: a badly damaged file should not print a million


def check_ledger(ledger) -> list[str]:
    """Every problem found in ``ledger`` (an open :class:`accounting.ledger.Ledger`), one line each; empty
    when it is sound."""
    problems: list[str] = []
    db = ledger.db
    for name, check in (("database integrity", _integrity),
                        ("balances", _balances), ("flushes", _flushes), ("amounts", _amounts),
                        ("rollups", _rollups), ("addresses", _addresses), ("sessions", _sessions),
                        ("audit log", _audit)):
        try:
            found = check(ledger, db)
        except (*db.errors, LedgerError) as exc:  # a damaged file can fail any query: that is a finding too
            found = [f"{name}: cannot be read ({exc})"]  # (LedgerError: a sum SQLite cannot make, Backend.sums)
        if len(found) > MAX_LISTED:
            found = found[:MAX_LISTED] + [f"{name}: {len(found) - MAX_LISTED} more problems like these"]
        problems += found
    return problems


def summary(ledger) -> str:
    """What a sound ledger holds, in a few words, for ``ledger ok (...)``."""
    count = {t: ledger.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
             for t in ("subscribers", "addresses", "payments", "flushes", "audit_log")}
    return (f"{count['subscribers']} subscribers, {count['addresses']} addresses, {count['payments']} payments, "
            f"{count['flushes']} flushes, {count['audit_log']} audit rows")


def _integrity(ledger, db) -> list[str]:
    return db.integrity_problems()


def _balances(ledger, db) -> list[str]:
    problems = []
    rows = db.sums("""
        SELECT s.id, s.name, s.balance, s.opening_balance,
               (SELECT coalesce(sum(amount), 0) FROM payments p WHERE p.subscriber_id = s.id),
               (SELECT coalesce(sum(amount), 0) FROM adjustments a WHERE a.subscriber_id = s.id),
               (SELECT coalesce(sum(amount), 0) FROM charges c WHERE c.subscriber_id = s.id),
               (SELECT coalesce(sum(amount), 0) FROM usage u WHERE u.subscriber_id = s.id),
               (SELECT coalesce(sum(amount), 0) FROM postings b WHERE b.subscriber_id = s.id)
        FROM subscribers s ORDER BY s.id""", (), "a subscriber's history")
    for sid, name, balance, opening, paid, adjusted, charged, used, posted in rows:
        expected = opening + paid + adjusted - charged - posted
        if balance != expected:
            problems.append(f"subscriber {sid} ({name}): balance {balance} != opening {opening} + payments "
                            f"{paid} + adjustments {adjusted} - charges {charged} - fees and settlements "
                            f"{posted} = {expected}")
        if used != charged:
            problems.append(f"subscriber {sid} ({name}): usage amounts {used} != charges {charged}")
    return problems


def _flushes(ledger, db) -> list[str]:
    problems = [f"flush id {fid!r} is recorded {n} times (a replayed flush would be charged again)"
                for fid, n in db.execute("SELECT id, count(*) FROM flushes GROUP BY id HAVING count(*) > 1")]
    problems += [f"flush {fid!r} charged subscriber {sid} {n} times"
                 for fid, sid, n in db.execute("SELECT flush_id, subscriber_id, count(*) FROM charges"
                                               " WHERE flush_id IS NOT NULL"  # a rolled charge has none
                                               " GROUP BY flush_id, subscriber_id HAVING count(*) > 1")]
    return problems


def _amounts(ledger, db) -> list[str]:
    # what the ledger's writers refuse, found anyway: a hand edit or a bug elsewhere
    problems = [f"charge {cid} (subscriber {sid}) has amount {amount}, not more than zero"
                for cid, sid, amount in db.execute("SELECT id, subscriber_id, amount FROM charges WHERE amount <= 0")]
    problems += [f"payment {pid} (subscriber {sid}) has amount {amount}, not more than zero"
                 for pid, sid, amount in db.execute("SELECT id, subscriber_id, amount FROM payments WHERE amount <= 0")]
    problems += [f"adjustment {aid} (subscriber {sid}) has amount 0"
                 for aid, sid in db.execute("SELECT id, subscriber_id FROM adjustments WHERE amount = 0")]
    return problems


def _rollups(ledger, db) -> list[str]:
    from .rollup import HOUR_MAX, NS, bucket

    problems = []
    if "rollup_state" not in db.table_names():  # `ledger check` opens an older schema as it is: no rollups there
        return problems
    state = db.execute("SELECT timezone, hour_cutoff, day_cutoff FROM rollup_state").fetchone()
    # distinct buckets, not rows: a few per hour of the windows and per day of history
    spans = db.execute("SELECT DISTINCT minute, span FROM usage WHERE span > 60").fetchall()
    spans += [(ts // NS, span // NS) for ts, span in db.execute(
        "SELECT DISTINCT ts_ns, span_ns FROM charges WHERE span_ns > 0 AND ts_ns % ? = 0 AND span_ns % ? = 0",
        (NS, NS))]
    problems += [f"rolled charge {cid} (subscriber {sid}) starts or lasts a fraction of a second"
                 for cid, sid in db.execute("SELECT id, subscriber_id FROM charges WHERE span_ns > 0"
                                            " AND (ts_ns % ? != 0 OR span_ns % ? != 0)", (NS, NS))]
    problems += [f"rolled charge {cid} (subscriber {sid}) has a flush id {fid!r}" for cid, sid, fid in
                 db.execute("SELECT id, subscriber_id, flush_id FROM charges"
                            " WHERE span_ns > 0 AND flush_id IS NOT NULL")]
    if spans and state is None:
        return problems + [f"{len(spans)} hourly or daily buckets of usage or charges, but no rollup recorded"]
    for start, span in sorted(set(spans)):
        level = "day" if span > HOUR_MAX else "hour"
        cutoff = state[2] if level == "day" else state[1]
        try:
            want = bucket(start, state[0], level)
        except LedgerError as exc:
            problems.append(f"rolled bucket at {start}: {exc}")
            continue
        if want != (start, start + span):
            problems.append(f"a rolled bucket {start}..{start + span} is not a local {level} of {state[0]} "
                            f"({want[0]}..{want[1]}): ranges across it would be answered wrong")
        elif start + span > cutoff:
            problems.append(f"a rolled {level} {start}..{start + span} lies past the {level} cutoff {cutoff}: "
                            f"readers would not refuse ranges cutting it")
    return problems


def _addresses(ledger, db) -> list[str]:
    problems = []
    nets = []
    for text, sid in db.execute("SELECT network, subscriber_id FROM addresses"):
        try:
            net = ipaddress.ip_network(text, strict=True)
        except (TypeError, ValueError):
            problems.append(f"address {text!r} of subscriber {sid} is not a prefix with its host bits zero")
            continue
        if str(net) != text:  # lookups compare canonical text: another spelling is found by nobody
            problems.append(f"address {text!r} of subscriber {sid} is not written canonically ({net})")
        nets.append((net.version, int(net.network_address), net.prefixlen, net, sid))
    # Prefixes are nested or disjoint. In address order (shorter first at the same start), the prefixes that
    # contain the current one are exactly the stack left after popping those that end before it.
    nets.sort(key=lambda n: n[:3])
    stack: list[tuple] = []
    for entry in nets:
        _v, _start, _len, net, sid = entry
        while stack and not (stack[-1][0] == net.version and net.subnet_of(stack[-1][3])):
            stack.pop()
        for _ov, _os, _ol, outer, owner in stack:
            if owner != sid:
                problems.append(f"{net} of subscriber {sid} overlaps {outer} of subscriber {owner}: an address "
                                "should have one owner (the engine takes the longest match)")
        stack.append(entry)
    return problems


def _sessions(ledger, db) -> list[str]:
    from .sessions import check

    return check(db)


def _audit(ledger, db) -> list[str]:
    from .audit import AuditLog

    ok, bad = AuditLog(ledger).verify()
    return [] if ok else [f"audit log: the hash chain breaks at row {bad} (it, or the row before it, was changed "
                          "or deleted after it was written)"]
