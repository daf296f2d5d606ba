"""The ``tollgate`` command line.

Exit codes: 0 success; 1 the work failed at run time; 2 the request was bad
(a broken config, a missing or unreadable file, wrong arguments).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from accounting.store import ledger_exists
from ext.errors import CaptureError, ConfigError, LedgerError, TollgateError

from .config import parse_instant
from .sources import parse_source_options, source_names

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_CONFIG = "/etc/tollgate/tollgate.toml"

log = logging.getLogger("tollgate.cli")


def _fail(message: str, code: int) -> int:
    print(f"tollgate: error: {message}", file=sys.stderr)
    return code


def _config(args):
    from .config import load_config

    return load_config(args.config)


def cmd_config_check(args) -> int:
    cfg = _config(args)
    print(f"{args.config}: OK")
    print(f"  currency {cfg.currency.code}, time zone {cfg.timezone}")
    print(f"  zones: {', '.join(cfg.zones.names)} ({len(cfg.zones.rules())} rules)")
    print(f"  time slots: {', '.join(cfg.schedule.slots)}")
    print(f"  tariffs: {', '.join(cfg.tariffs)}")
    print(f"  subscribers in the file: {len(cfg.subscribers)}")
    return EXIT_OK


def cmd_replay(args) -> int:
    from .replay import replay, result_json, result_text

    cfg = _config(args)
    db = args.db or cfg.database
    if db is None and not args.dry_run:
        return _fail("no ledger: give --db FILE (or gateway.database in the config), or use --dry-run", EXIT_USAGE)
    if not os.path.exists(args.capture):
        return _fail(f"cannot read {args.capture}: no such file", EXIT_USAGE)
    if not os.access(args.capture, os.R_OK) or os.path.isdir(args.capture):
        return _fail(f"cannot read {args.capture}: not a readable file", EXIT_USAGE)
    bill_until = None
    if args.bill_until:
        bill_until = parse_instant(args.bill_until, "--bill-until", cfg.timezone)
    if args.tariff:
        if not args.dry_run:
            return _fail("--tariff rates with another version: only with --dry-run (nothing charged)", EXIT_USAGE)
        if db is None or not ledger_exists(db):
            return _fail("--tariff NAME@VERSION reads the versions from the ledger: give --db", EXIT_USAGE)
        with _ledger(args, cfg) as ledger:
            for choice in args.tariff:
                _use_tariff_version(cfg, ledger, choice)
    result = replay(cfg, args.capture, db, engine=args.engine, dry_run=args.dry_run,
                    progress=not args.quiet and not args.json, bill_until=bill_until)
    if args.json:
        json.dump(result_json(result, cfg), sys.stdout, indent=2)
        print()
    else:
        print(result_text(result, cfg))
    return EXIT_OK


def _use_tariff_version(cfg, ledger, choice: str) -> None:
    """``NAME@VERSION``: the recorded version of a tariff instead of the config's."""
    from accounting.tariff import parse_tariff

    name, _, version = choice.partition("@")
    if not version.isdigit():
        raise ConfigError("--tariff", f"{choice!r} is not NAME@VERSION (see `tollgate tariff versions`)")
    recorded = ledger.tariff(name, int(version))
    if recorded is None:
        raise ConfigError("--tariff", f"no version {version} of tariff {name!r} in the ledger")
    if name not in cfg.tariffs:
        raise ConfigError("--tariff", f"tariff {name!r} is not in the config: its subscribers are not either")
    cfg.tariffs[name] = parse_tariff(recorded["spec"], f"{name}@{version}", cfg.zones, cfg.schedule.slots, cfg.currency)


def _ledger(args, cfg=None):
    from accounting.ledger import Ledger

    db = args.db or (cfg.database if cfg else None)
    if db is None:
        raise ConfigError("gateway.database", "no ledger: give --db FILE or set gateway.database")
    return Ledger.open(db)


def cmd_invoice(args) -> int:
    from accounting.billing import period_of
    from accounting.invoice import build_invoice, render_html, render_pdf

    cfg = _config(args)
    with _ledger(args, cfg) as ledger:
        sub = ledger.get_subscriber(args.subscriber)
        if sub is None:
            return _fail(f"no subscriber {args.subscriber!r}", EXIT_USAGE)
        tariff = cfg.tariffs.get(sub["tariff"])
        if tariff is None:
            return _fail(f"{sub['name']} has tariff {sub['tariff']!r}, which the config does not define", EXIT_USAGE)
        from zoneinfo import ZoneInfo

        tz = ZoneInfo(cfg.timezone)
        when = parse_instant(args.at, "--at", cfg.timezone) if args.at else None
        if when is None:  # the last period that has ended
            when = period_of(tariff.plan, time.time_ns(), tz)[0] - 1
        start, end = period_of(tariff.plan, when, tz)
        invoice = build_invoice(ledger, sub["id"], start, end, cfg.timezone)
    if args.pdf:
        with open(args.pdf, "wb") as f:
            f.write(render_pdf(invoice))
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(render_html(invoice))
    print(f"invoice {invoice.number}: {invoice.subscriber}, {invoice.period_text}: charges "
          f"{invoice.money(invoice.charges)}, payments and credits {invoice.money(invoice.credits)}, balance "
          f"{invoice.money(invoice.opening)} -> {invoice.money(invoice.closing)}"
          + "".join(f"; wrote {f}" for f in (args.pdf, args.html) if f))
    return EXIT_OK


def cmd_subscribers(args) -> int:
    from accounting.money import format_amount

    cfg = _config(args)
    with _ledger(args, cfg) as ledger:
        rows = ledger.subscribers()
    print(f"{'id':>4}  {'name':<16} {'tariff':<14} {'balance':>16}  addresses")
    for s in rows:
        print(f"{s['id']:>4}  {s['name']:<16} {s['tariff']:<14} {format_amount(s['balance'], cfg.currency):>16}  "
              f"{' '.join(s['addresses'])}")
    return EXIT_OK


def _admin_ledger(args):
    """The ledger for commands that need no config when --db is given (tokens, passwords, the audit log)."""
    return _ledger(args, None if args.db else _config(args))


def _cli_actor() -> str:
    """``cli:<unix user>`` for the audit log: the account this process runs as (not $USER, which anyone can set)."""
    import pwd

    try:
        return f"cli:{pwd.getpwuid(os.geteuid()).pw_name}"
    except KeyError:  # a uid with no passwd entry (containers)
        return f"cli:uid{os.geteuid()}"


def _utc(ns: int | None) -> str:
    return "-" if ns is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns // 10 ** 9)) + " UTC"


def cmd_token(args) -> int:
    """Admin API tokens: create (shown once), list, revoke; each change with its audit row."""
    from accounting.audit import AuditLog
    from api.auth import AuthError, TokenStore

    with _admin_ledger(args) as ledger:
        store = TokenStore(ledger)
        if args.action == "list":
            rows = store.list()
            if not rows:
                print("no API tokens (make one with `tollgate token create NAME --role ROLE`)")
            for t in rows:
                state = "active" if t["revoked_ns"] is None else f"revoked {_utc(t['revoked_ns'])}"
                print(f"{t['name']:<24} {t['role']:<9} created {_utc(t['created_ns'])}  {state}")
            return EXIT_OK
        if not args.name:
            return _fail(f"token {args.action} needs NAME", EXIT_USAGE)
        if args.action == "create" and not args.role:
            return _fail("token create needs --role (admin, operator or cashier)", EXIT_USAGE)
        try:
            with ledger.transaction():  # the change and its audit row: both or neither
                if args.action == "create":
                    token = store.create(args.name, args.role)
                    AuditLog(ledger).append(_cli_actor(), "token.create", f"token:{args.name}",
                                            after={"name": args.name, "role": args.role})
                else:
                    before = store.get(args.name)
                    if not store.revoke(args.name):
                        print(f"token {args.name} was already revoked")
                        return EXIT_OK
                    AuditLog(ledger).append(_cli_actor(), "token.revoke", f"token:{args.name}",
                                            before=before, after=store.get(args.name))
        except AuthError as exc:
            return _fail(str(exc), EXIT_USAGE)
    if args.action == "create":
        print(f"token {args.name} ({args.role}) created; it is shown once, here, and not kept anywhere "
              "(the ledger has only its SHA-256): store it now", file=sys.stderr)
        print(token)
    else:
        print(f"token {args.name} revoked (the API refuses it from now on)")
    return EXIT_OK


def _read_new_password(name: str) -> str | None:
    """From stdin when it is not a terminal (one line, for scripts), else asked twice without echo."""
    import getpass

    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        return line.removesuffix("\n").removesuffix("\r")
    first = getpass.getpass(f"new portal password for {name}: ")
    if getpass.getpass("again: ") != first:
        return None
    return first


def cmd_subscriber(args) -> int:
    """A subscriber's portal password, set from stdin or the terminal, with its audit row."""
    from accounting.audit import AuditLog
    from api.auth import AuthError, PortalPasswords

    with _admin_ledger(args) as ledger:
        sub = ledger.get_subscriber(args.subscriber)
        if sub is None:
            return _fail(f"no subscriber {args.subscriber!r}", EXIT_USAGE)
        password = _read_new_password(sub["name"])
        if password is None:
            return _fail("the two passwords differ; nothing changed", EXIT_USAGE)
        passwords = PortalPasswords(ledger)
        try:
            with ledger.transaction():
                had = passwords.has_password(sub["id"])
                passwords.set(sub["id"], password)
                AuditLog(ledger).append(_cli_actor(), "subscriber.password", f"subscriber:{sub['id']}",
                                        before={"name": sub["name"], "portal_login": had},
                                        after={"name": sub["name"], "portal_login": True})
        except AuthError as exc:
            return _fail(str(exc), EXIT_USAGE)
    print(f"{sub['name']}: portal password {'changed' if had else 'set'}")
    return EXIT_OK


# ---- the daily admin operations: all through accounting.operations, so the command line checks, writes and
# audits exactly what the admin API does ----------------------------------------------------------------------

def _operation(command):
    """``command(args, ops, cfg)`` with the config, the ledger and an Operations acting as ``cli:<user>``.
    An OperationError has written nothing: exit 1 for unknown or conflicting (404, 409), 2 for invalid (422)."""
    import functools

    @functools.wraps(command)
    def run(args) -> int:
        from accounting.operations import OperationError, Operations

        cfg = _config(args)
        with _ledger(args, cfg) as ledger:
            try:
                return command(args, Operations(ledger, cfg, _cli_actor()), cfg)
            except OperationError as exc:
                return _fail(str(exc), EXIT_USAGE if exc.status == 422 else EXIT_FAILED)
    return run


def _instant_ns(value: str | None, flag: str, cfg) -> int | None:
    """``YYYY-MM-DD`` (its midnight) or ``YYYY-MM-DD HH:MM``, in the config's time zone, as epoch ns."""
    from accounting.operations import OperationError

    if value is None:
        return None
    try:
        return parse_instant(value.strip(), flag, cfg.timezone)
    except ConfigError as exc:
        raise OperationError(str(exc)) from None


def _range_seconds(args, cfg) -> tuple[int | None, int | None]:
    """--since and --until as epoch seconds (usage minutes are kept in seconds)."""
    from accounting.operations import OperationError

    since, until = (_instant_ns(getattr(args, flag), f"--{flag}", cfg) for flag in ("since", "until"))
    if since is not None and until is not None and since >= until:
        raise OperationError("--since must be before --until")
    return (None if since is None else since // 10 ** 9), (None if until is None else until // 10 ** 9)


def _local_time(ns: int, cfg) -> str:
    import datetime as dt
    from zoneinfo import ZoneInfo

    return dt.datetime.fromtimestamp(ns / 10 ** 9, ZoneInfo(cfg.timezone)).strftime("%Y-%m-%d %H:%M %Z")


def _print_json(value) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    print()


def _block_state(view: dict) -> str:
    if view["manually_blocked"]:
        return "blocked by hand"
    return "blocked" if view["blocked"] else "-"


def _print_subscriber(view: dict, ops, cfg) -> None:
    pending = ops.ledger.db.execute(
        "SELECT tariff, effective_ns FROM tariff_changes WHERE subscriber_id = ? AND applied_ns IS NULL"
        " ORDER BY effective_ns DESC LIMIT 1", (view["id"],)).fetchone()
    state = "active" if view["active"] else "inactive"
    if view["blocked"]:
        reason = (view["block_reason"] or "").removeprefix("manual: ")
        state += f", {_block_state(view)}" + (f" ({reason})" if reason else "")
    print(f"{view['name']} (id {view['id']})")
    print(f"  tariff        {view['tariff']}"
          + (f" (then {pending[0]} from {_local_time(pending[1], cfg)})" if pending else ""))
    if view["contract"]:
        print(f"  contract      {view['contract']}")
    print(f"  balance       {view['balance']}")
    print(f"  credit limit  {view['credit_limit']}")
    print(f"  state         {state}")
    print(f"  addresses     {' '.join(view['addresses']) or '-'}")


@_operation
def cmd_subscriber_add(args, ops, cfg) -> int:
    view = ops.add(args.name, args.tariff, args.address, args.balance, args.credit_limit, args.contract)
    if args.json:
        _print_json(view)
    else:
        _print_subscriber(view, ops, cfg)
        print("added (a running gateway loads it within a second)")
    return EXIT_OK


@_operation
def cmd_subscriber_show(args, ops, cfg) -> int:
    view = ops.get(args.name)
    if args.json:
        _print_json(view)
    else:
        _print_subscriber(view, ops, cfg)
    return EXIT_OK


@_operation
def cmd_subscriber_list(args, ops, cfg) -> int:
    page = ops.list(args.limit, args.offset, args.tariff, args.active, args.name, after_id=args.after)
    if args.json:
        _print_json(page)
        return EXIT_OK
    if not page["items"]:
        print(f"no subscribers here ({page['total']} match)")
        return EXIT_OK
    print(f"{'id':>5}  {'name':<16} {'tariff':<14} {'balance':>16}  {'state':<8} {'blocked':<15}  addresses")
    for s in page["items"]:
        print(f"{s['id']:>5}  {s['name']:<16} {s['tariff']:<14} {s['balance']:>16}  "
              f"{'active' if s['active'] else 'inactive':<8} {_block_state(s):<15}  {' '.join(s['addresses'])}")
    if args.after:  # a cursor: where the page stands among all that match is not counted
        print(f"{len(page['items'])} after id {args.after} of {page['total']}"
              + (f" (--after {page['next_after_id']} for more)" if page["next_after_id"] else ""))
        return EXIT_OK
    shown_to = page["offset"] + len(page["items"])
    if page["offset"] or shown_to < page["total"]:
        print(f"{page['offset'] + 1}-{shown_to} of {page['total']}"
              + (f" (--offset {shown_to} for more)" if shown_to < page["total"] else ""))
    return EXIT_OK


@_operation
def cmd_subscriber_import(args, ops, cfg) -> int:
    """A file of subscribers, all or nothing (accounting.operations.Operations.import_subscribers)."""
    from accounting.bulk import guess_format
    from accounting.operations import ImportRefused

    fmt = args.format or guess_format(args.file)
    source = "stdin" if args.file == "-" else os.path.basename(args.file)
    try:
        if args.file == "-":
            done = ops.import_subscribers(sys.stdin.buffer, fmt, source)
        else:
            with open(args.file, "rb") as f:
                done = ops.import_subscribers(f, fmt, source)
    except ImportRefused as exc:
        for line, reason in exc.errors:
            print(f"{source}:{line}: {reason}", file=sys.stderr)
        more = exc.bad - len(exc.errors)
        return _fail(f"{source}: {exc.bad} bad line{'s' if exc.bad != 1 else ''}"
                     + (f" ({more} more not listed)" if more > 0 else "") + "; nothing was written", EXIT_USAGE)
    if done.get("imported_before"):
        print(f"{source}: nothing to do, this file was imported before (audit row {done['imported_before']})")
    elif not done["added"]:
        print(f"{source}: nothing to do, all {done['unchanged']} subscribers are in the ledger as the file has them")
    else:
        print(f"{source}: imported {done['added']} subscribers (ids {done['first_id']}-{done['last_id']}, "
              f"{done['addresses']} addresses)" + (f", {done['unchanged']} already there" if done["unchanged"] else "")
              + "; a running gateway loads them within a second")
    return EXIT_OK


@_operation
def cmd_subscriber_export(args, ops, cfg) -> int:
    """Every subscriber in the import format, streamed (a batch of rows in memory at a time)."""
    out = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
    try:
        for line in ops.export_subscribers(args.format):
            out.write(line)
    finally:
        if args.output:
            out.close()
    return EXIT_OK


@_operation
def cmd_subscriber_set(args, ops, cfg) -> int:
    from accounting.operations import OperationError

    if args.effective is not None and args.tariff is None:
        raise OperationError("--effective is when a --tariff change applies: give --tariff too")
    addresses = [] if args.no_address else args.address
    if args.tariff is None and args.credit_limit is None and addresses is None:
        raise OperationError("nothing to change: give --tariff, --credit-limit, --address or --no-address")
    view = ops.update(args.name, tariff=args.tariff, effective_ns=_instant_ns(args.effective, "--effective", cfg),
                      credit_limit=args.credit_limit, addresses=addresses)
    _print_subscriber(view, ops, cfg)
    print("changed (a running gateway follows within a second; a tariff change at its time)")
    return EXIT_OK


@_operation
def cmd_subscriber_deactivate(args, ops, cfg) -> int:
    view = ops.get(args.name)
    if not view["active"]:
        print(f"{view['name']} is inactive already; nothing changed")
        return EXIT_OK
    ops.deactivate(view["id"])
    print(f"{view['name']}: deactivated (a running gateway stops accounting for it within a second; "
          "its history stays in the ledger)")
    return EXIT_OK


@_operation
def cmd_subscriber_activate(args, ops, cfg) -> int:
    view = ops.get(args.name)
    if view["active"]:
        print(f"{view['name']} is active already; nothing changed")
        return EXIT_OK
    ops.update(view["id"], active=True)
    print(f"{view['name']}: active again (a running gateway accounts for it within a second)")
    return EXIT_OK


@_operation
def cmd_block(args, ops, cfg) -> int:
    view = ops.block(args.subscriber, args.reason)
    print(f"{view['name']}: blocked by hand ({args.reason.strip()}); a running gateway enforces it within a second")
    return EXIT_OK


@_operation
def cmd_unblock(args, ops, cfg) -> int:
    view = ops.unblock(args.subscriber, args.reason)
    print(f"{view['name']}: manual block lifted (a running gateway follows within a second)")
    return EXIT_OK


@_operation
def cmd_adjust(args, ops, cfg) -> int:
    done = ops.adjust(args.subscriber, args.amount, args.reason)
    name = ops.get(done["subscriber_id"])["name"]
    print(f"{name}: adjustment {done['amount']} ({done['reason']}), ledger balance {done['balance']} "
          "(a running gateway applies it within a second)")
    return EXIT_OK


@_operation
def cmd_topup(args, ops, cfg) -> int:
    # no --key: a fresh one, so this run records one payment; with --key a repeated run records none
    done = ops.topup(args.subscriber, args.amount, args.key, method="cli", comment=args.comment)
    name = ops.get(done["subscriber_id"])["name"]
    if done["replayed"]:
        print(f"{name}: payment {done['payment_id']} was recorded with this --key before; nothing new "
              f"(ledger balance {done['balance']})")
        return EXIT_OK
    print(f"{name}: +{done['amount']}, ledger balance {done['balance']} (a running gateway applies it within a second)")
    return EXIT_OK


@_operation
def cmd_tariff(args, ops, cfg) -> int:
    from zoneinfo import ZoneInfo

    from accounting.billing import period_of
    from accounting.operations import OperationError

    if args.action == "versions":
        rows = ops.ledger.tariff_versions(args.subscriber)
        if not rows:
            print("no tariff versions recorded (the gateway records them when it starts)")
        for r in rows:
            print(f"{r['name']}@{r['version']}  recorded {_utc(r['created_ns'])}")
        return EXIT_OK
    if not args.subscriber or not args.name:
        raise OperationError("tariff change needs SUBSCRIBER and TARIFF")
    sub = ops.get(args.subscriber)
    now = time.time_ns()
    if args.at == "now":
        when = now
    elif args.at == "next-period":
        current = cfg.tariffs.get(sub["tariff"])
        if current is None:
            raise OperationError(f"{sub['name']} has tariff {sub['tariff']!r}, which the config does not define: "
                                 "give --at now or a date", 409)
        when = period_of(current.plan, now, ZoneInfo(cfg.timezone))[1]
    else:
        when = _instant_ns(args.at, "--at", cfg)
    view = ops.update(sub["id"], tariff=args.name, effective_ns=when)
    if "tariff_change" not in view:
        print(f"{sub['name']} is on tariff {args.name} already; nothing changed")
        return EXIT_OK
    print(f"{sub['name']}: tariff {args.name} from {_local_time(when, cfg)} (a running gateway applies it then)")
    return EXIT_OK


@_operation
def cmd_cards(args, ops, cfg) -> int:
    from accounting.operations import OperationError

    if args.action == "generate":
        if not (args.count and args.value and args.expires):
            raise OperationError("cards generate needs --count, --value and --expires")
        expires = _instant_ns(args.expires, "--expires", cfg)
        cards = ops.generate_cards(args.count, args.value, expires_ns=expires, batch=args.batch)
        from accounting.money import format_amount, parse_amount

        value = format_amount(parse_amount(args.value, cfg.currency), cfg.currency)  # checked by generate_cards
        print(f"# {len(cards)} cards of {value}, valid until {args.expires}; "
              "the codes are not kept anywhere else: print or store them now")
        print("serial,code")
        for card in cards:
            print(f"{card['serial']},{card['code']}")
        return EXIT_OK
    if not (args.subscriber and args.code):
        raise OperationError("cards activate needs SUBSCRIBER and CODE")
    done = ops.activate_card(args.subscriber, args.code)
    print(f"card {done['serial']}: +{done['value']} for {args.subscriber}, ledger balance {done['balance']} "
          "(a running gateway applies it within a second)")
    return EXIT_OK


@_operation
def cmd_terms(args, ops, cfg) -> int:
    """A subscriber's own billing terms and limits: shown, or set (the running gateway follows within a second)."""
    from accounting.money import parse_volume
    from accounting.operations import OperationError
    from accounting.tariff import parse_discount
    from policy.limits import parse_rate

    def maybe(value, parse):
        return None if value in (None, "none", "tariff") else parse(value)

    # the text of each option is read here ("15%", "50M", a date); Operations checks the values and writes them
    # with their audit row, as for every other change
    changes = {}
    try:
        if args.group is not None:
            changes["group_name"] = None if args.group == "none" else args.group
        if args.discount is not None:
            changes["discount_bp"] = maybe(args.discount, lambda v: parse_discount(v, "--discount"))
            changes["discount_until_ns"] = maybe(args.until, lambda v: parse_instant(v, "--until", cfg.timezone))
        if args.access is not None:
            from accounting.access import parse_access

            if args.access != "none":
                parse_access(args.access, "--access")  # its error names the option
            changes["access_hours"] = None if args.access == "none" else args.access
        if args.credit_until is not None:
            changes["credit_until_ns"] = maybe(args.credit_until,
                                               lambda v: parse_instant(v, "--credit-until", cfg.timezone))
        for opt, key, parse in (("volume_limit", "volume_limit", parse_volume), ("speed_up", "speed_up_bps", parse_rate),
                                ("speed_down", "speed_down_bps", parse_rate),
                                ("max_connections", "max_connections", int)):
            if getattr(args, opt) is not None:
                changes[key] = maybe(getattr(args, opt), parse)
    except (ValueError, ConfigError) as exc:
        raise OperationError(str(exc)) from None
    shown = ops.set_terms(args.subscriber, **changes) if changes else ops.terms(args.subscriber)
    print(f"{shown['name']} (tariff {shown['tariff']}): " + ", ".join(
        f"{k} {'(tariff/group)' if v is None else v}" for k, v in shown["terms"].items()))
    return EXIT_OK


def _ledger_rollup(args) -> int:
    from accounting.rollup import main as roll_up

    cfg = _config(args)
    db = args.db or cfg.database
    if db is None:
        return _fail("no ledger: give --db FILE or set gateway.database", EXIT_USAGE)
    if not ledger_exists(db):
        return _fail(f"cannot read {db}: no such ledger file", EXIT_USAGE)
    windows = {k: v for k, v in (("minute_window", args.minute_window), ("hour_window", args.hour_window),
                                 ("flush_horizon", args.flush_horizon)) if v is not None}
    try:
        print(roll_up(db, cfg.timezone, **windows).text())
    except LedgerError as exc:  # a window too short, a ledger rolled up in another time zone: nothing changed
        return _fail(f"ledger: {exc}", EXIT_USAGE)
    return EXIT_OK


def cmd_ledger(args) -> int:
    """``tollgate ledger check``: the ledger's invariants (accounting.checks); exit 1 naming each problem.
    ``tollgate ledger rollup``: accounting.rollup, in the config's time zone."""
    if args.action == "rollup":
        return _ledger_rollup(args)
    from accounting.checks import check_ledger, summary
    from accounting.ledger import Ledger
    from accounting.store import is_conninfo

    db = args.db or _config(args).database
    if db is None:
        return _fail("no ledger: give --db FILE or set gateway.database", EXIT_USAGE)
    if not ledger_exists(db):  # opening would create an empty ledger, which is sound but not the one meant
        return _fail(f"cannot read {db}: no such ledger file", EXIT_USAGE)
    # not through Ledger.open, which would migrate an older schema: a check changes nothing (SQLite: read only)
    try:
        if is_conninfo(db):
            from accounting.store.postgres import PostgresBackend

            backend = PostgresBackend.open(db)
        else:
            from accounting.store.sqlite import SqliteBackend

            backend = SqliteBackend.open(db, read_only=True)
    except LedgerError as exc:
        return _fail(str(exc), EXIT_USAGE if "not a Tollgate ledger" in str(exc) else EXIT_FAILED)
    try:
        ledger = Ledger(backend)
        problems = check_ledger(ledger)
        if not problems:
            print(f"ledger ok ({summary(ledger)})")
            return EXIT_OK
    except backend.errors as exc:  # a page that does not read
        return _fail(f"{db}: not a readable {backend.dialect} database ({exc})".replace("sqlite", "SQLite"),
                     EXIT_FAILED)
    finally:
        backend.close()
    for problem in problems:
        print(problem)
    return _fail(f"ledger {db}: {len(problems)} problem{'s' if len(problems) != 1 else ''} (listed above)",
                 EXIT_FAILED)


def _usage_table(rows: list[dict], keys: list[str], total: dict | None = None) -> None:
    """Rows of usage: their ``keys`` columns, then volume, packets and amount; a total line if given."""
    from accounting.money import format_volume

    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}

    def line(cells: list[str], r: dict) -> str:
        return "  ".join([*(f"{c:<{widths[k]}}" for k, c in zip(keys, cells)),
                          f"{format_volume(r['bytes']):>10}", f"{r['packets']:>10}", f"{r['amount']:>16}"])

    print("  ".join([*(f"{k:<{widths[k]}}" for k in keys), f"{'volume':>10}", f"{'packets':>10}", f"{'amount':>16}"]))
    for r in rows:
        print(line([str(r[k]) for k in keys], r))
    if total is not None:
        print(line(["total"] + [""] * (len(keys) - 1), total))


@_operation
def cmd_usage(args, ops, cfg) -> int:
    since, until = _range_seconds(args, cfg)
    by = tuple(b.strip() for b in args.by.split(",") if b.strip())
    rows = ops.usage(args.subscriber, since, until, by, args.zone, args.direction)
    if "subscriber" in by:
        names = ops.ledger.names_of(r["subscriber_id"] for r in rows)
        rows = [{"name": names.get(r["subscriber_id"]), **r} for r in rows]
    if "minute" in by:  # the same clock as "day": UTC
        rows = [{**r, "minute": time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["minute"]))} for r in rows]
    if args.json:
        _print_json(rows)
        return EXIT_OK
    if not rows:
        print("no usage in that range")
        return EXIT_OK
    keys = [k for k in rows[0] if k not in ("bytes", "packets", "amount")]
    total = None
    if len(rows) > 1 and keys:
        total, = ops.usage(args.subscriber, since, until, (), args.zone, args.direction)
    _usage_table(rows, keys, total)
    return EXIT_OK


@_operation
def cmd_top(args, ops, cfg) -> int:
    since, until = _range_seconds(args, cfg)
    rows = ops.top(args.n, since, until)
    if args.json:
        _print_json(rows)
        return EXIT_OK
    if not rows:
        print("no usage in that range")
        return EXIT_OK
    _usage_table([{"rank": i, **r} for i, r in enumerate(rows, 1)], ["rank", "name"])
    return EXIT_OK


def cmd_audit(args) -> int:
    """Check the audit log's hash chain, or show its last rows."""
    from accounting.audit import AuditLog

    with _admin_ledger(args) as ledger:
        audit = AuditLog(ledger)
        if args.action == "verify":
            ok, bad = audit.verify()
            if not ok:
                print(f"audit chain broken at row {bad}: it, or the row before it, was changed or deleted "
                      "after it was written")
                return EXIT_FAILED
            head = audit.head()
            print(f"audit chain intact: {audit.count()} rows")
            if head:
                print(f"last row {head[0]}, hash {head[1]} (note it elsewhere to detect rows cut off the end later)")
            return EXIT_OK
        if args.limit < 1:
            return _fail("--limit must be at least 1", EXIT_USAGE)
        head = audit.head()
        rows = audit.rows(limit=min(args.limit, 10_000), after_id=max(0, head[0] - args.limit)) if head else []
    if not rows:
        print("the audit log is empty")
    for r in rows:
        change = " ".join(f"{k} {json.dumps(r[k], sort_keys=True)}" for k in ("before", "after") if r[k] is not None)
        print(f"{r['id']:>6}  {_utc(r['ts_ns'])}  {r['actor']}  {r['action']}  {r['target']}"
              + (f"  {change}" if change else ""))
    return EXIT_OK


def cmd_run(args) -> int:
    from .daemon import RunOptions, run

    cfg = _config(args)
    db = args.db or cfg.database
    if db is None:
        return _fail("no ledger: give --db FILE or set gateway.database", EXIT_USAGE)
    queues = _queues(args.queues)
    if not 0 <= args.linger_us <= 1000:
        return _fail("--linger-us is 0..1000", EXIT_USAGE)
    if args.drift_interval <= 0:
        return _fail("--drift-interval must be positive", EXIT_USAGE)
    source_options = parse_source_options(args.source, args.source_option)
    return run(RunOptions(args.config, db, queues, not args.fail_closed, args.listen, args.port, args.engine,
                          linger_us=args.linger_us, drift_interval=args.drift_interval, source=args.source,
                          source_options=source_options, clock_offset=args.clock_offset,
                          kernel_quota=args.kernel_quota))


def _queues(text: str) -> tuple:
    lo, _, hi = text.partition("-")
    try:
        lo_n, hi_n = int(lo), int(hi or lo)
    except ValueError:
        raise ConfigError("--queues", f"{text!r} is not a queue number or a range like 0-1") from None
    if not 0 <= lo_n <= hi_n <= 65535 or hi_n - lo_n >= 64:
        raise ConfigError("--queues", f"{text!r}: queues are 0..65535, at most 64 of them")
    return tuple(range(lo_n, hi_n + 1))


def cmd_policy(args) -> int:
    from policy.nft import Enforcer

    cfg = _config(args)
    enforcer = Enforcer(local_networks=cfg.zones.local_networks)
    if args.action == "remove":
        from policy.limits import Limits

        enforcer.remove()
        Limits().remove()  # it knows the interfaces it shaped from its own table
        from pathlib import Path

        from ext.bpfmaps import DEFAULT_PIN_DIR

        if Path(DEFAULT_PIN_DIR).exists():  # the eBPF data path: our tc filters wherever they are, then the pins
            from policy import bpf

            bpf.detach(None, DEFAULT_PIN_DIR)
            print(f"detached the tc/eBPF program and unpinned {DEFAULT_PIN_DIR}")
        print("removed tables inet tollgate and tollgate_limits, the queue rules and the shaping on "
              f"{', '.join(cfg.lan_interfaces + cfg.wan_interfaces) or 'no interface'}; nothing else was touched")
    else:
        print(enforcer.dump() or "no table inet tollgate")
    return EXIT_OK


def cmd_lab(args) -> int:
    from . import lab

    if args.action == "up":
        lab.lab_up(args.subscribers, prefix=args.prefix)
    elif args.action == "down":
        lab.lab_down(prefix=args.prefix)
    else:
        lab.lab_status(prefix=args.prefix)
    return EXIT_OK


def _raw(help_text: str, description: str, epilog: str) -> dict:
    """A subcommand whose epilog keeps its example lines as written."""
    import textwrap

    return {"help": help_text, "description": textwrap.fill(description, 100), "epilog": epilog,
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def _subscriber_parsers(sub, with_config) -> None:
    """``tollgate subscriber ACTION``: add, show, list, set, deactivate (through accounting.operations) and password."""
    p = with_config(sub.add_parser(
        "subscriber", help="subscribers: add, show, list, set, deactivate, import, export; a portal password",
        description="Every change is checked first (nothing is written if it is refused) and written with its "
                    "audit row, as the admin API does; a running gateway follows within a second.",
        epilog="examples:\n  tollgate subscriber add alice --tariff basic --address 100.64.0.2/32 --balance 10.00\n"
               "  tollgate subscriber list --inactive\n  tollgate subscriber password alice",
        formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    actions = p.add_subparsers(dest="subscriber_action", metavar="ACTION", required=True)

    def action(name: str, func, help_text: str, description: str, epilog: str):
        a = actions.add_parser(name, **_raw(help_text, description, epilog))
        # SUPPRESS: given before ACTION or after it, either way (a default here would undo one given before)
        a.add_argument("--config", "-c", default=argparse.SUPPRESS,
                       help=f"the TOML config (default: $TOLLGATE_CONFIG or {DEFAULT_CONFIG})")
        a.add_argument("--db", default=argparse.SUPPRESS, help="the ledger (default: gateway.database)")
        a.set_defaults(func=func)
        return a

    a = action("add", cmd_subscriber_add, "add a subscriber",
               "Add a subscriber with its tariff, addresses, opening balance and credit limit.",
               "example:\n  tollgate subscriber add alice --tariff basic --address 100.64.0.2/32 "
               "--address 2001:db8:100:2::/64 --balance 10.00 --contract C-2026-017")
    a.add_argument("name", help="the new subscriber's name")
    a.add_argument("--tariff", required=True, help="a tariff of the config")
    a.add_argument("--address", action="extend", nargs="+", default=[], metavar="NET",
                   help="an address or prefix no other subscriber holds (repeatable)")
    a.add_argument("--balance", default="0", help='opening balance, e.g. "10.00" (default 0)')
    a.add_argument("--credit-limit", default="0", help="how far below zero the balance may go (default 0)")
    a.add_argument("--contract", help="a contract reference")
    a.add_argument("--json", action="store_true", help="print the new subscriber as JSON")

    a = action("show", cmd_subscriber_show, "show one subscriber",
               "A subscriber's tariff (and a scheduled change), balance, credit limit, state and addresses.",
               "example:\n  tollgate subscriber show alice --json")
    a.add_argument("name", help="name or id")
    a.add_argument("--json", action="store_true", help="as JSON")

    a = action("list", cmd_subscriber_list, "list subscribers with balance and blocked state",
               "A page of subscribers, by id, that match every filter given.",
               "examples:\n  tollgate subscriber list --tariff basic --active\n"
               "  tollgate subscriber list --name ali --limit 50 --offset 50 --json")
    a.add_argument("--tariff", help="only this tariff's subscribers")
    state = a.add_mutually_exclusive_group()
    state.add_argument("--active", dest="active", action="store_const", const=True, default=None,
                       help="only active subscribers")
    state.add_argument("--inactive", dest="active", action="store_const", const=False, help="only inactive ones")
    a.add_argument("--name", metavar="SUBSTR", help="only names containing this (any case)")
    a.add_argument("--limit", type=int, default=100, help="at most this many (1..1000, default 100)")
    a.add_argument("--offset", type=int, default=0, help="skip this many first (default 0)")
    a.add_argument("--after", type=int, default=0, metavar="ID",
                   help="the page after this id (a cursor: as fast deep in the table as at its start)")
    a.add_argument("--json", action="store_true", help="as JSON, with the total that match")

    a = action("import", cmd_subscriber_import, "add subscribers from a CSV or JSON lines file, all or nothing",
               "Every line gets the checks of `subscriber add` (and of `terms`), and no address may overlap another "
               "of the file or of the ledger; any bad line refuses the whole file (each listed with its line "
               "number, exit 2) and nothing is written. A line whose subscriber exists with the same values is "
               "left as it is, so the same file again changes nothing. One transaction, one audit row.",
               "examples:\n  tollgate subscriber import new.csv\n  tollgate subscriber export > all.jsonl && "
               "tollgate subscriber import all.jsonl --db other.db\n\n"
               "JSON lines: {\"name\": \"alice\", \"tariff\": \"basic\", \"balance\": \"10.00\", "
               "\"credit_limit\": \"0\", \"contract\": \"C-17\",\n  \"active\": true, \"addresses\": "
               "[\"100.64.0.2/32\"], \"terms\": {\"volume_limit\": 50000000000}}\n"
               "CSV: a header of name,tariff and any of balance,credit_limit,contract,active,addresses "
               "(space-separated)\n  and the terms (group_name, discount_bp, ...); empty cells are not given.")
    a.add_argument("file", help="the file (- for stdin)")
    a.add_argument("--format", choices=("csv", "jsonl"), help="default: csv for *.csv, else jsonl")

    a = action("export", cmd_subscriber_export, "write every subscriber in the import format",
               "Every subscriber by id, as `subscriber import` reads them (streamed): the balance now becomes the "
               "opening balance of the ledger it is imported into.",
               "examples:\n  tollgate subscriber export > subscribers.jsonl\n"
               "  tollgate subscriber export --format csv --output subscribers.csv")
    a.add_argument("--format", choices=("csv", "jsonl"), default="jsonl", help="default jsonl")
    a.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")

    a = action("set", cmd_subscriber_set, "change a subscriber's tariff, credit limit or addresses",
               "Change what is given. A tariff change is scheduled (now, or at --effective); the gateway "
               "closes the old tariff's billing then and opens the new one's. --address replaces all addresses.",
               "examples:\n  tollgate subscriber set alice --tariff premium --effective '2027-01-01 00:00'\n"
               "  tollgate subscriber set alice --credit-limit 5.00 --address 100.64.0.2/32 --address 100.64.0.3/32")
    a.add_argument("name", help="name or id")
    a.add_argument("--tariff", help="the new tariff")
    a.add_argument("--effective", metavar="'YYYY-MM-DD HH:MM'",
                   help="with --tariff: when it applies, local time of the config (default: now)")
    a.add_argument("--credit-limit", help='e.g. "5.00"')
    addresses = a.add_mutually_exclusive_group()
    addresses.add_argument("--address", action="extend", nargs="+", metavar="NET",
                           help="the subscriber's addresses from now on, replacing all it has (repeatable)")
    addresses.add_argument("--no-address", action="store_true", help="take all its addresses away")

    a = action("deactivate", cmd_subscriber_deactivate, "deactivate a subscriber",
               "The gateway stops accounting for it; its ledger history, balance and addresses stay.",
               "example:\n  tollgate subscriber deactivate alice")
    a.add_argument("name", help="name or id")

    a = action("activate", cmd_subscriber_activate, "make a deactivated subscriber active again",
               "The gateway accounts for it again, with the balance and addresses it had.",
               "example:\n  tollgate subscriber activate alice")
    a.add_argument("name", help="name or id")

    a = action("password", cmd_subscriber, "set a subscriber's portal password",
               "From stdin when it is not a terminal (one line), else asked twice without echo.",
               "examples:\n  tollgate subscriber password alice            (asks twice)\n"
               "  printf '%%s\\n' \"$PW\" | tollgate subscriber password alice")
    a.add_argument("subscriber", help="name or id")


def _operation_parsers(sub, with_config) -> None:
    """block, unblock, adjust, usage, top: through accounting.operations, like the admin API."""
    def command(name: str, func, help_text: str, description: str, epilog: str):
        p = with_config(sub.add_parser(name, **_raw(help_text, description, epilog)))
        p.add_argument("--db", help="the ledger (default: gateway.database)")
        p.set_defaults(func=func)
        return p

    p = command("block", cmd_block, "block a subscriber by hand",
                "Block a subscriber whatever its balance, until `tollgate unblock`; a running gateway "
                "enforces it within a second.",
                "example:\n  tollgate block alice --reason 'abuse report #1234'")
    p.add_argument("subscriber", help="name or id")
    p.add_argument("--reason", required=True, help="why (1 to 500 characters; kept in the ledger and audit log)")

    p = command("unblock", cmd_unblock, "lift a manual block",
                "Lift a block made with `tollgate block`; a block for a low balance stays until it is paid.",
                "example:\n  tollgate unblock alice --reason 'resolved with the customer'")
    p.add_argument("subscriber", help="name or id")
    p.add_argument("--reason", default="lifted", help="why (default: lifted)")

    p = command("adjust", cmd_adjust, "correct a subscriber's balance, with a reason",
                "Add (or, negative, take away) an amount; a refund is a negative adjustment, a payment is "
                "`tollgate topup`.",
                "examples:\n  tollgate adjust alice 2.50 --reason 'outage 2026-03-02'\n"
                "  tollgate adjust alice -1.00 --reason 'double card activation'")
    p.add_argument("subscriber", help="name or id")
    p.add_argument("amount", help='in the currency, e.g. "2.50" or "-1.00"')
    p.add_argument("--reason", required=True, help="why (kept with the adjustment and in the audit log)")

    dates = ("DATE is YYYY-MM-DD (its midnight) or 'YYYY-MM-DD HH:MM', local time of the config; "
             "--since is included, --until is not.")
    p = command("usage", cmd_usage, "traffic and charges, totalled per zone and direction, day or subscriber",
                "Bytes, packets and amounts from the ledger, of one subscriber or all. " + dates
                + " Days are UTC days.",
                "examples:\n  tollgate usage alice --since 2026-03-01 --until 2026-04-01\n"
                "  tollgate usage --by subscriber --zone external --direction download --json\n"
                "  tollgate usage alice --by day --since '2026-03-01 08:00'")
    p.add_argument("subscriber", nargs="?", help="name or id (default: everyone)")
    p.add_argument("--since", metavar="DATE")
    p.add_argument("--until", metavar="DATE")
    p.add_argument("--by", default="zone,direction",
                   help="comma-separated: zone, direction, day, subscriber, minute (default zone,direction)")
    p.add_argument("--zone", help="only this zone")
    p.add_argument("--direction", choices=("upload", "download"), help="only this direction")
    p.add_argument("--json", action="store_true", help="as JSON (bytes as integers)")

    p = command("top", cmd_top, "the subscribers with the most traffic",
                "The top talkers by bytes in a time range. " + dates,
                "example:\n  tollgate top --n 5 --since 2026-03-01")
    p.add_argument("--n", "-n", type=int, default=10, help="how many (1..1000, default 10)")
    p.add_argument("--since", metavar="DATE")
    p.add_argument("--until", metavar="DATE")
    p.add_argument("--json", action="store_true", help="as JSON (bytes as integers)")



# ---- sessions, bindings, RADIUS accounting and DHCP hooks (issue 15) ----------------------------------------

def _session_line(r: dict, cfg) -> str:
    if r.get("static"):
        return f"{r['network']:<22} {r['subscriber']:<16} static (the ledger keeps no history of static addresses)"
    end = "live" if r["ended_ns"] is None else f"{_local_time(r['ended_ns'], cfg)} ({r['end_reason']})"
    return (f"{r['network']:<22} {r['subscriber']:<16} {r['source']}:{r['client']} {r['session_key']}  "
            f"{_local_time(r['started_ns'], cfg)} .. {end}  up {r['up_bytes']} B down {r['down_bytes']} B"
            + (f"  mac {r['mac']}" if r["mac"] else ""))


def cmd_session(args, ops, cfg) -> int:
    if args.session_action == "who":
        if args.address is None:
            return _fail("session who: give an address", EXIT_USAGE)
        at = None if args.at is None else _instant_ns(args.at, "--at", cfg)
        found = ops.who_had(args.address, at)
        if args.json:
            _print_json(found)
        elif not found:
            print(f"{args.address}: nobody's{'' if at is None else ' at ' + _local_time(at, cfg)}")
        for r in [] if args.json else found:
            print(_session_line(r, cfg))
        return EXIT_OK if found else EXIT_FAILED
    if args.session_action == "expire":
        done = ops.expire_sessions()
        print(f"{len(done['closed'])} session rows expired")
        return EXIT_OK
    live = True if args.live else False if args.closed else None
    rows = ops.sessions(live, args.subscriber, args.address, args.limit, args.after_id)
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            print(f"{r['id']:>6} {_session_line(r, cfg)}")
    return EXIT_OK


def _binding_of(args) -> tuple[str, str]:
    from accounting.operations import OperationError

    given = [(k, v) for k, v in (("mac", args.mac), ("client_id", args.client_id), ("circuit_id", args.circuit_id))
             if v is not None]
    if len(given) != 1:
        raise OperationError("give one of --mac, --client-id, --circuit-id")
    return given[0]


def cmd_binding(args, ops, cfg) -> int:
    if args.binding_action == "list":
        rows = ops.bindings(args.subscriber)
        if args.json:
            _print_json(rows)
        for r in [] if args.json else rows:
            print(f"{r['subscriber']:<16} {r['kind']:<10} {r['value']}")
        return EXIT_OK
    kind, value = _binding_of(args)
    if args.binding_action == "add":
        if args.subscriber is None:
            return _fail("binding add: name the subscriber", EXIT_USAGE)
        r = ops.bind(args.subscriber, kind, value)
        print(f"{kind} {r['value']}: subscriber {r['subscriber_id']}{' (already)' if r['replayed'] else ''}")
    else:
        r = ops.unbind(kind, value)
        print(f"{kind} {r['value']}: unbound from subscriber {r['subscriber_id']}")
    return EXIT_OK


def cmd_radius(args) -> int:
    from .config import parse_listen
    from .radius import serve

    cfg = _config(args)
    db = args.db or cfg.database
    if db is None:
        raise ConfigError("gateway.database", "no ledger: give --db FILE or set gateway.database")
    listen = [parse_listen(v, "--listen") for v in args.listen] if args.listen else None
    metrics = parse_listen(args.metrics, "--metrics", 9813) if args.metrics else None
    if not (cfg.radius and cfg.radius.clients):
        return _fail("config: no [[radius.client]]: nobody could send accounting", EXIT_USAGE)
    return serve(cfg, db, listen, metrics)


def cmd_api(args) -> int:
    """``tollgate api``: the admin API and the portal from a ledger alone, without the gateway (a gateway
    on the same ledger picks up the changes within a second)."""
    import uvicorn

    from api.app import LedgerView, create_app

    cfg = _config(args)
    db = args.db or cfg.database
    if db is None:
        return _fail("no ledger: give --db FILE (or a PostgreSQL conninfo) or set gateway.database", EXIT_USAGE)
    uvicorn.run(create_app(LedgerView(cfg, db)), host=args.listen, port=args.port, log_level="warning")
    return EXIT_OK


def cmd_dhcp_hook(args) -> int:
    from accounting.operations import OperationError

    from .dhcp_hook import main as hook

    by = tuple(b.strip() for b in args.by.split(",") if b.strip())
    if not by or not set(by) <= {"mac", "client_id", "circuit_id"}:
        return _fail(f"--by {args.by!r}: a comma-separated list of mac, client_id, circuit_id", EXIT_USAGE)
    cfg = _config(args)
    if args.server is not None and not args.server.strip():
        return _fail("--server: a name", EXIT_USAGE)
    try:
        return hook(args.kind, args.args, cfg, lambda: _ledger(args, cfg), args.server, by)
    except OperationError as exc:
        return _fail(str(exc), EXIT_USAGE if exc.status == 422 else EXIT_FAILED)


def cmd_voucher(args, ops, cfg) -> int:
    """tollgate voucher generate: guest vouchers (issue 15); the codes are printed once, as CSV."""
    from accounting.operations import OperationError

    if args.value is None and args.volume is None:
        raise OperationError("voucher generate: give --value, --volume or both")
    made = ops.generate_vouchers(args.count, args.value, args.volume, days=args.days, hours=args.hours,
                                 devices=args.devices, tariff=args.tariff, redeem_days=args.redeem_days,
                                 batch=args.batch)
    held = " and ".join(x for x in (args.value and f"{args.value} {cfg.currency}", args.volume) if x)
    print(f"# {len(made)} vouchers of {held}, valid {f'{args.hours} h' if args.hours else f'{args.days} days'} "
          f"from first use{f' on {args.devices} devices' if args.devices else ''}; redeem within {args.redeem_days} "
          "days; the codes are not kept anywhere else: print or store them now")
    print("serial,code")
    for v in made:
        print(f"{v['serial']},{v['code']}")
    return EXIT_OK


def _session_parsers(sub, with_config) -> None:
    p = with_config(sub.add_parser(
        "voucher", **_raw("guest vouchers: prepaid cards that open a guest account on first use",
                          "A voucher redeemed on the portal ([sessions] portal_login) opens an account with its value "
                          "as the balance and its volume as the volume limit, valid from the first use, and binds "
                          "the device; --devices limits the devices online at once.",
                          "examples:\n  tollgate voucher generate --count 50 --volume 1GB --days 1 --devices 2\n"
                          "  tollgate voucher generate --count 10 --value 5.00 --days 7 --tariff guest")))
    p.add_argument("action", choices=("generate",))
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--value", help='a balance, e.g. "5.00"')
    p.add_argument("--volume", help='a volume limit, e.g. "1GB" (traffic outside the local zone)')
    p.add_argument("--days", type=int, default=1, help="valid this many days from first use (default 1)")
    p.add_argument("--hours", type=int, help="valid this many hours from first use (instead of --days)")
    p.add_argument("--devices", type=int, help="devices online at once (default: any)")
    p.add_argument("--tariff", help="the guest accounts' tariff (default: [sessions] voucher_tariff)")
    p.add_argument("--redeem-days", type=int, default=365, help="redeemable for this many days (default 365)")
    p.add_argument("--batch", help="a name for the batch (default: the time)")
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.set_defaults(func=_operation(cmd_voucher))

    p = with_config(sub.add_parser(
        "session", **_raw("sessions: who is (and was) behind an address",
                          "Sessions bind addresses to subscribers for a while: DHCP leases (tollgate dhcp-hook), "
                          "RADIUS accounting (tollgate radius serve), portal logins. History is kept.",
                          "examples:\n  tollgate session who 100.64.7.9 --at '2026-03-03 14:03'\n"
                          "  tollgate session list --live --subscriber alice\n  tollgate session expire")))
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.set_defaults(func=_operation(cmd_session))
    p.add_argument("session_action", choices=("who", "list", "expire"),
                   help="who: who had ADDRESS at --at (default now); list: sessions, oldest first; expire: close "
                        "those whose expiry passed (lost Stops, leases with no del)")
    p.add_argument("address", nargs="?", help="an address or prefix (who; list: those on it)")
    p.add_argument("--at", metavar="TIME", help="YYYY-MM-DD or 'YYYY-MM-DD HH:MM[:SS]', local time of the config")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--live", action="store_true", help="list: only live ones")
    g.add_argument("--closed", action="store_true", help="list: only ended ones")
    p.add_argument("--subscriber", help="list: name or id")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--after-id", type=int, default=0, help="list: the page after this session id")
    p.add_argument("--json", action="store_true")

    p = with_config(sub.add_parser(
        "binding", **_raw("what binds a DHCP lease to a subscriber: its MAC, client id or circuit id",
                          "A lease whose MAC (or client id, or option 82 circuit id, see tollgate dhcp-hook --by) "
                          "is bound to a subscriber becomes that subscriber's session.",
                          "examples:\n  tollgate binding add alice --mac 52:54:00:12:34:56\n"
                          "  tollgate binding remove --mac 52:54:00:12:34:56\n  tollgate binding list alice")))
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.set_defaults(func=_operation(cmd_binding))
    p.add_argument("binding_action", choices=("add", "remove", "list"))
    p.add_argument("subscriber", nargs="?", help="name or id (add, list)")
    p.add_argument("--mac")
    p.add_argument("--client-id")
    p.add_argument("--circuit-id")
    p.add_argument("--json", action="store_true")

    p = with_config(sub.add_parser(
        "radius", **_raw("RADIUS accounting server (RFC 2866): access servers report sessions",
                         "Listen for Accounting-Request Start, Interim-Update, Stop and Accounting-On/Off from the "
                         "clients of [[radius.client]] and bind the sessions' addresses to the subscribers named "
                         "by User-Name. Runs until SIGTERM or SIGINT.",
                         "example:\n  tollgate radius serve -c /etc/tollgate/tollgate.toml --listen '[::]:1813'")))
    p.add_argument("action", choices=("serve",))
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.add_argument("--listen", action="append", metavar="ADDR[:PORT]",
                   help="instead of [radius] listen (repeatable; [v6]:port for IPv6)")
    p.add_argument("--metrics", metavar="ADDR[:PORT]", help="serve Prometheus metrics here (port 9813 by default)")
    p.set_defaults(func=cmd_radius)

    p = with_config(sub.add_parser(
        "api", **_raw("the admin API and the portal from a ledger alone, without the gateway",
                      "Serve /api/v1 and the portal on a ledger (a file or a PostgreSQL conninfo) without "
                      "running the gateway; a gateway on the same ledger picks the changes up within a second.",
                      "example:\n  tollgate api -c /etc/tollgate/tollgate.toml --db ledger.db --port 8081")))
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.add_argument("--listen", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8081, help="port (default 8081)")
    p.set_defaults(func=cmd_api)

    p = with_config(sub.add_parser(
        "dhcp-hook", **_raw("the lease script of dnsmasq (--dhcp-script) or Kea (libdhcp_run_script.so)",
                            "Bind leases to subscribers by their bindings (tollgate binding): dnsmasq's add, old "
                            "and del; Kea's leases4_committed, lease4_renew, lease4_recover, lease4_release, "
                            "lease4_expire, lease4_decline, and for DHCPv6 leases6_committed, lease6_renew, "
                            "lease6_rebind, lease6_recover, lease6_release, lease6_expire, lease6_decline "
                            "(addresses and delegated prefixes; --by client_id binds by the DUID). "
                            "Exit 0 done, 1 refused, 2 garbage arguments.",
                            "examples (through a wrapper script, see the README):\n"
                            "  tollgate dhcp-hook -c tollgate.toml dnsmasq add 52:54:00:12:34:56 100.64.7.9\n"
                            "  tollgate dhcp-hook -c tollgate.toml --server kea1 kea lease4_release")))
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.add_argument("--server", help="this DHCP server's name in the sessions (default: dnsmasq or kea)")
    p.add_argument("--by", default="mac", help="what names the subscriber, in order: mac,client_id,circuit_id")
    p.add_argument("kind", choices=("dnsmasq", "kea"))
    p.add_argument("args", nargs=argparse.REMAINDER, help="what the DHCP server passes")
    p.set_defaults(func=cmd_dhcp_hook)


class _Unbuilt:
    """Stands for the parser of a command the command line does not name: what is added to it is dropped
    (it is never parsed with, nor shown: see :func:`build_parser`)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: self


class _OneCommand:
    """The subparsers of ``tollgate``, where only ``command``'s parser is made (``found`` says whether
    the definitions named it); every other ``add_parser`` gives an :class:`_Unbuilt`."""

    def __init__(self, sub, command: str) -> None:
        self.sub, self.command, self.found = sub, command, False

    def add_parser(self, name: str, **kwargs):
        if name != self.command:
            return _Unbuilt()
        self.found = True
        return self.sub.add_parser(name, **kwargs)


def _named_command(argv: list[str]) -> str | None:
    """The command ``argv`` names, if it is its first word after nothing but -v/--verbose; else None (no
    command, -h, anything else before it: the whole parser answers that, with its usage and choices)."""
    for word in argv:
        if word not in ("-v", "--verbose"):
            return None if word.startswith("-") else word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole ``tollgate`` parser; with ``command`` (the one the command line names, see main), only
    that command's subparser is made, the others not at all (36 parsers of some 165 arguments: 10-20 ms of
    each run). That parses the same: argparse hands everything after the command's name to that one
    subparser, and the top level's own usage and errors do not list the commands (metavar COMMAND); where
    the list is shown (--help, no command, an unknown one) ``command`` is None or not found, and the whole
    parser is built. A ``command`` that is no command's name builds the whole parser too."""
    parser = argparse.ArgumentParser(
        prog="tollgate",
        description="Traffic accounting and prepaid enforcement for a Linux NAT/router box.",
        epilog="Each command has its own --help. Exit codes: 0 ok, 1 failed, 2 bad input.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (to stderr)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if command is not None:
        sub = _OneCommand(sub, command)

    def with_config(p):
        p.add_argument("--config", "-c", default=os.environ.get("TOLLGATE_CONFIG", DEFAULT_CONFIG),
                       help=f"the TOML config (default: $TOLLGATE_CONFIG or {DEFAULT_CONFIG})")
        return p

    p = with_config(sub.add_parser(
        "replay", help="rate a pcap/pcapng capture through the engine and the ledger",
        description="Run a capture file through the same engine and ledger as the live gateway, "
                    "with the packets' timestamps as the clock, and print per-subscriber usage, "
                    "charges, balances and blocks.",
        epilog="examples:\n  tollgate replay -c examples/tollgate.toml --db ledger.db day.pcap\n"
               "  tollgate replay -c new-tariff.toml --db ledger.db --dry-run --json last-month.pcapng",
        formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("capture", metavar="FILE.pcap", help="a pcap or pcapng file")
    p.add_argument("--db", help="the ledger (SQLite file; created if missing). Default: gateway.database")
    p.add_argument("--engine", choices=("c", "py"), help="engine implementation (default: c if built)")
    p.add_argument("--dry-run", action="store_true",
                   help="rate without writing to the ledger (balances start from the ledger if it exists)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.add_argument("--tariff", action="append", default=[], metavar="NAME@VERSION",
                   help="rate with a version of a tariff recorded in the ledger instead of the config's (with "
                        "--dry-run: what would this traffic have cost then?); repeatable")
    p.add_argument("--bill-until", metavar="DATE",
                   help="run the billing calendar on past the last packet to this date or local time (e.g. "
                        "2026-12-01: the end of November, with its postpaid or prevailing settlement)")
    p.set_defaults(func=cmd_replay)

    p = with_config(sub.add_parser(
        "run", help="run the gateway (nfqueue accounting, nftables enforcement, block page, metrics)",
        description="Run the live gateway until SIGTERM. SIGHUP reloads the config. Blocks stay in the "
                    "kernel when it stops."))
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.add_argument("--source", default="nfqueue", choices=source_names(),
                   help="where traffic is counted: nfqueue (inline, default; stops a subscriber at the exact "
                        "packet) or a passive source (see gateway/sources)")
    p.add_argument("--kernel-quota", action=argparse.BooleanOptionalAction, default=None,
                   help="under a passive source, a kernel quota per subscriber kept at what its balance buys, "
                        "so traffic stops at the byte however far the source lags (default: on for nflog and "
                        "conntrack, off for netflow, whose traffic the gateway may not forward)")
    p.add_argument("--source-option", "-o", action="append", default=[], metavar="NAME=VALUE",
                   help="an option of a passive source, e.g. -o listen=0.0.0.0:2055 (repeatable; a wrong name "
                        "lists the source's options)")
    p.add_argument("--queues", default="0", help="nfqueue number or range, one thread each (default: 0)")
    p.add_argument("--fail-closed", action="store_true",
                   help="drop subscriber traffic while no reader is bound (default: fail-open, traffic flows; "
                        "blocks hold either way)")
    p.add_argument("--listen", default="::", help="address of the portal/metrics HTTP service (default ::, "
                   "IPv4 and IPv6 on one socket; 0.0.0.0 for IPv4 only)")
    p.add_argument("--port", type=int, default=8080, help="port of the portal/metrics HTTP service (default 8080)")
    p.add_argument("--engine", choices=("c", "py"), help="engine implementation (default: c)")
    p.add_argument("--linger-us", type=int, default=0,
                   help="when a batch is thin, wait this long for more packets before rating it: fewer system "
                        "calls per packet, this much more latency (default 0: never wait)")
    p.add_argument("--clock-offset", type=float, default=0.0, metavar="SECONDS",
                   help="shift the clock of the billing calendar and the access hours by this much (drills and "
                        "tests: see what 08:00 does at 07:59); packets keep the kernel's time. Default 0")
    p.add_argument("--drift-interval", type=float, default=10.0,
                   help="seconds between comparisons of the engine's per-subscriber bytes with the kernel's "
                        "(default 10); a gap is logged and exported as tollgate_drift_bytes")
    p.set_defaults(func=cmd_run)

    p = with_config(sub.add_parser("topup", help="record a payment; a running gateway applies it within a second"))
    p.add_argument("subscriber", help="name or id")
    p.add_argument("amount", help='amount in the currency, e.g. "10.00"')
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.add_argument("--comment")
    p.add_argument("--key", help="idempotency key: the same key twice records one payment")
    p.set_defaults(func=cmd_topup)

    p = with_config(sub.add_parser(
        "terms", help="show or set a subscriber's own discount, group, volume, speed and connection limits",
        description="Without options: show them. \"none\" clears a setting (the group's or tariff's applies).",
        epilog="example:\n  tollgate terms alice --discount 20%% --until 2027-01-01 --speed-down 50M --volume-limit '100 GB'",
        formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("subscriber", help="name or id")
    p.add_argument("--group", help="a [[group]] of the config, or none")
    p.add_argument("--discount", help='e.g. "15%%", or none')
    p.add_argument("--until", metavar="DATE", help="with --discount: when it ends")
    p.add_argument("--credit-until", metavar="DATE", help="the credit limit is 0 from then on, or none")
    p.add_argument("--volume-limit", help='per period, e.g. "100 GB", or none')
    p.add_argument("--speed-up", help='bits per second, e.g. "10M", or none')
    p.add_argument("--speed-down", help='bits per second, e.g. "50M", or none')
    p.add_argument("--max-connections", help="a number, or none")
    p.add_argument("--access", help='access hours, e.g. "Mon-Fri 08:00-20:00; Sat 10:00-14:00", or none')
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.set_defaults(func=cmd_terms)

    p = with_config(sub.add_parser(
        "cards", help="prepaid cards: generate a batch, activate one for a subscriber",
        epilog="examples:\n  tollgate cards generate --count 100 --value 10.00 --expires 2027-06-30 > batch.csv\n"
               "  tollgate cards activate alice 7K2M-QX9D-4TPH-8WNC",
        formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("action", choices=("generate", "activate"))
    p.add_argument("subscriber", nargs="?", help="activate: name or id")
    p.add_argument("code", nargs="?", help="activate: the card's code (dashes, spaces and case do not matter)")
    p.add_argument("--count", type=int, help="generate: how many cards")
    p.add_argument("--value", help='generate: face value, e.g. "10.00"')
    p.add_argument("--expires", metavar="DATE", help="generate: last day of validity (its midnight, local time)")
    p.add_argument("--batch", help="generate: a name for the batch (default: the time)")
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.set_defaults(func=cmd_cards)

    p = with_config(sub.add_parser(
        "tariff", help="tariff versions recorded in the ledger; schedule a subscriber's tariff change",
        epilog="examples:\n  tollgate tariff versions basic\n"
               "  tollgate tariff change alice premium --at next-period\n"
               "  tollgate replay -c tollgate.toml --db ledger.db --dry-run --tariff basic@1 march.pcap",
        formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("action", choices=("versions", "change"))
    p.add_argument("subscriber", nargs="?", help="change: name or id; versions: a tariff name (optional)")
    p.add_argument("name", nargs="?", help="change: the new tariff")
    p.add_argument("--at", default="next-period",
                   help="change: next-period (default), now, or a date / local time like 2027-01-01")
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.set_defaults(func=cmd_tariff)

    p = with_config(sub.add_parser(
        "invoice", help="a subscriber's invoice for a billing period, as PDF and/or HTML",
        epilog="example:\n  tollgate invoice alice --at 2026-03-15 --pdf alice-2026-03.pdf",
        formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("subscriber", help="name or id")
    p.add_argument("--at", metavar="DATE", help="a date inside the period (default: the last period that has ended)")
    p.add_argument("--pdf", metavar="FILE", help="write the invoice as PDF")
    p.add_argument("--html", metavar="FILE", help="write the invoice as HTML")
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.set_defaults(func=cmd_invoice)

    p = with_config(sub.add_parser("subscribers", help="list subscribers with balances"))
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.set_defaults(func=cmd_subscribers)

    p = with_config(sub.add_parser(
        "token", help="admin API tokens: create (shown once), list, revoke",
        epilog="examples:\n  tollgate token create billing-desk --role cashier\n  tollgate token list\n"
               "  tollgate token revoke billing-desk\nroles: admin (everything), operator (read only), "
               "cashier (read, payments)",
        formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("action", choices=("create", "list", "revoke"))
    p.add_argument("name", nargs="?", help="create, revoke: the token's name")
    p.add_argument("--role", choices=("admin", "operator", "cashier"), help="create: what the token may do")
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.set_defaults(func=cmd_token)

    _subscriber_parsers(sub, with_config)
    _operation_parsers(sub, with_config)

    p = with_config(sub.add_parser(
        "audit", help="the audit log of changes: verify its hash chain, show its last rows",
        description="Every change made through the admin API or these commands is a row of a hash chain; "
                    "`verify` recomputes it (exit 1 and the first bad row if a row was changed or deleted)."))
    p.add_argument("action", choices=("verify", "show"))
    p.add_argument("--limit", type=int, default=20, help="show: how many of the last rows (default 20)")
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.set_defaults(func=cmd_audit)

    p = with_config(sub.add_parser(
        "ledger", help="check the ledger (balances against their history, flushes, keys, integrity, addresses) "
                       "or roll it up",
        description="`check` recomputes what the ledger keeps twice (each balance against its opening balance, "
                    "payments, adjustments, charges and postings; usage against charges), and checks flush ids, "
                    "foreign keys, SQLite's integrity, overlapping prefixes of different subscribers and the "
                    "audit chain. The file is opened read only. Exit 0 if all hold, 1 listing each problem.\n"
                    "`rollup` replaces minute usage and one-flush charges older than --minute-window by local "
                    "hours, hours older than --hour-window by local days (the config's time zone), and prunes "
                    "flushes older than --flush-horizon; every total stays exact (accounting/rollup.py). "
                    "A running gateway does it hourly by itself.",
        epilog="examples:\n  tollgate ledger check --db /var/lib/tollgate/ledger.db\n"
               "  tollgate ledger rollup -c /etc/tollgate/tollgate.toml --minute-window 86400",
        formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("action", choices=("check", "rollup"))
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.add_argument("--minute-window", type=int, metavar="SECONDS", help="keep minute rows this long (default 2 days)")
    p.add_argument("--hour-window", type=int, metavar="SECONDS", help="keep hourly rows this long (default 35 days)")
    p.add_argument("--flush-horizon", type=int, metavar="SECONDS", help="keep flush ids this long (default 1 day)")
    p.set_defaults(func=cmd_ledger)

    p = with_config(sub.add_parser(
        "policy", help="show or remove the kernel side (table inet tollgate and the queue rules)",
        description="`tollgate run` leaves its table in place when it stops, so blocks hold while it is "
                    "down. `policy remove` takes the table and the queue rules away (blocks end)."))
    p.add_argument("action", choices=("show", "remove"))
    p.set_defaults(func=cmd_policy)

    p = sub.add_parser("lab", help="network-namespace lab: subscribers, gateway and upstream on this machine",
                       description="Build or remove a lab of network namespaces joined by veth pairs "
                                   "(only 100.64.0.0/10, 198.18.0.0/15 and 2001:db8:100::/40, 2001:db8:198::/48).")
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--subscribers", "-n", type=int, default=4, help="how many subscriber namespaces (default 4)")
    p.add_argument("--prefix", default="tg", help="name prefix of the namespaces (default tg)")
    p.set_defaults(func=cmd_lab)

    p = sub.add_parser("config", help="work with the configuration file")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = with_config(csub.add_parser("check", help="validate the config and summarise it"))
    p.set_defaults(func=cmd_config_check)
    _session_parsers(sub, with_config)
    if command is not None and not sub.found:
        return build_parser()
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_named_command(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        return _fail(f"config: {exc}", EXIT_USAGE)
    except CaptureError as exc:
        return _fail(f"capture: {exc}", EXIT_USAGE)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        return _fail(f"cannot read {exc.filename or exc}: {exc.strerror or 'no such file'}", EXIT_USAGE)
    except LedgerError as exc:
        return _fail(f"ledger: {exc}", EXIT_FAILED)
    except TollgateError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
