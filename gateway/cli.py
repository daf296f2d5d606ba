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
        if db is None or not os.path.exists(db):
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


def cmd_topup(args) -> int:
    from accounting.money import format_amount, parse_amount

    cfg = _config(args)
    with _ledger(args, cfg) as ledger:
        sub = ledger.get_subscriber(args.subscriber)
        if sub is None:
            return _fail(f"no subscriber {args.subscriber!r}", EXIT_USAGE)
        amount = parse_amount(args.amount, cfg.currency)
        if amount <= 0:
            return _fail("a top-up must be positive", EXIT_USAGE)
        ledger.add_payment(sub["id"], amount, method="cli", comment=args.comment, idempotency_key=args.key)
        balance = ledger.balance(sub["id"])
    print(f"{sub['name']}: +{format_amount(amount, cfg.currency)}, ledger balance {format_amount(balance, cfg.currency)}"
          " (a running gateway applies it within a second)")
    return EXIT_OK


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


def cmd_tariff(args) -> int:
    from zoneinfo import ZoneInfo

    from accounting.billing import period_of

    cfg = _config(args)
    with _ledger(args, cfg) as ledger:
        if args.action == "versions":
            rows = ledger.tariff_versions(args.subscriber)
            if not rows:
                print("no tariff versions recorded (the gateway records them when it starts)")
            for r in rows:
                print(f"{r['name']}@{r['version']}  recorded {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(r['created_ns'] // 10 ** 9))} UTC")
            return EXIT_OK
        if not args.subscriber or not args.name:
            return _fail("tariff change needs SUBSCRIBER and TARIFF", EXIT_USAGE)
        sub = ledger.get_subscriber(args.subscriber)
        if sub is None:
            return _fail(f"no subscriber {args.subscriber!r}", EXIT_USAGE)
        if args.name not in cfg.tariffs:
            return _fail(f"unknown tariff {args.name!r} (tariffs: {', '.join(cfg.tariffs)})", EXIT_USAGE)
        now = time.time_ns()
        if args.at == "now":
            when = now
        elif args.at == "next-period":
            when = period_of(cfg.tariffs[sub["tariff"]].plan, now, ZoneInfo(cfg.timezone))[1]
        else:
            when = parse_instant(args.at, "--at", cfg.timezone)
        ledger.schedule_tariff(sub["id"], args.name, when)
    print(f"{sub['name']}: tariff {args.name} from "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when // 10 ** 9))} (a running gateway applies it then)")
    return EXIT_OK


def cmd_cards(args) -> int:
    from accounting import prepaid
    from accounting.money import format_amount, parse_amount

    cfg = _config(args)
    with _ledger(args, cfg) as ledger:
        try:
            if args.action == "generate":
                if not (args.count and args.value and args.expires):
                    return _fail("cards generate needs --count, --value and --expires", EXIT_USAGE)
                value = parse_amount(args.value, cfg.currency)
                expires = parse_instant(args.expires, "--expires", cfg.timezone)
                cards = prepaid.generate(ledger, args.count, value, cfg.currency.code, expires, args.batch)
                print(f"# {len(cards)} cards of {format_amount(value, cfg.currency)}, valid until {args.expires}; "
                      "the codes are not kept anywhere else: print or store them now")
                print("serial,code")
                for serial, code in cards:
                    print(f"{serial},{code}")
                return EXIT_OK
            if not (args.subscriber and args.code):
                return _fail("cards activate needs SUBSCRIBER and CODE", EXIT_USAGE)
            done = prepaid.activate(ledger, args.subscriber, args.code)
        except prepaid.CardError as exc:
            return _fail(str(exc), EXIT_FAILED)
    print(f"card {done['serial']}: +{format_amount(done['value'], cfg.currency)} for {args.subscriber} "
          "(a running gateway applies it within a second)")
    return EXIT_OK


def cmd_terms(args) -> int:
    """A subscriber's own billing terms and limits: shown, or set (the running gateway follows within a second)."""
    from accounting.money import format_amount, parse_volume
    from accounting.tariff import parse_discount
    from policy.limits import parse_rate

    cfg = _config(args)

    def maybe(value, parse):
        return None if value in (None, "none", "tariff") else parse(value)

    changes = {}
    try:
        if args.group is not None:
            changes["group_name"] = None if args.group == "none" else args.group
            if args.group != "none" and args.group not in cfg.groups:
                return _fail(f"unknown group {args.group!r} (groups: {', '.join(cfg.groups) or 'none'})", EXIT_USAGE)
        if args.discount is not None:
            changes["discount_bp"] = maybe(args.discount, lambda v: parse_discount(v, "--discount"))
            changes["discount_until_ns"] = maybe(args.until, lambda v: parse_instant(v, "--until", cfg.timezone))
        if args.access is not None:
            from accounting.access import parse_access

            if args.access != "none":
                parse_access(args.access, "--access")  # refused here, not when the gateway loads it
            changes["access_hours"] = None if args.access == "none" else args.access
        if args.credit_until is not None:
            changes["credit_until_ns"] = maybe(args.credit_until,
                                               lambda v: parse_instant(v, "--credit-until", cfg.timezone))
        for opt, key, parse in (("volume_limit", "volume_limit", parse_volume), ("speed_up", "speed_up_bps", parse_rate),
                                ("speed_down", "speed_down_bps", parse_rate),
                                ("max_connections", "max_connections", int)):
            if getattr(args, opt) is not None:
                changes[key] = maybe(getattr(args, opt), parse)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    with _ledger(args, cfg) as ledger:
        sub = ledger.get_subscriber(args.subscriber)
        if sub is None:
            return _fail(f"no subscriber {args.subscriber!r}", EXIT_USAGE)
        if changes:
            ledger.set_terms(sub["id"], **changes)
            sub = ledger.get_subscriber(sub["id"])
    shown = {k: sub[k] for k in ledger.TERMS}
    shown["credit_limit"] = format_amount(shown["credit_limit"], cfg.currency)
    print(f"{sub['name']} (tariff {sub['tariff']}): " + ", ".join(
        f"{k} {'(tariff/group)' if v is None else v}" for k, v in shown.items()))
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
            with ledger._tx():  # the change and its audit row: both or neither
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
            with ledger._tx():
                had = passwords.has_password(sub["id"])
                passwords.set(sub["id"], password)
                AuditLog(ledger).append(_cli_actor(), "subscriber.password", f"subscriber:{sub['id']}",
                                        before={"name": sub["name"], "portal_login": had},
                                        after={"name": sub["name"], "portal_login": True})
        except AuthError as exc:
            return _fail(str(exc), EXIT_USAGE)
    print(f"{sub['name']}: portal password {'changed' if had else 'set'}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tollgate",
        description="Traffic accounting and prepaid enforcement for a Linux NAT/router box.",
        epilog="Each command has its own --help. Exit codes: 0 ok, 1 failed, 2 bad input.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (to stderr)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    p.add_argument("--listen", default="0.0.0.0", help="address of the portal/metrics HTTP service")
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

    p = with_config(sub.add_parser(
        "subscriber", help="one subscriber's settings: its portal password",
        epilog="examples:\n  tollgate subscriber password alice            (asks twice)\n"
               "  printf '%%s\\n' \"$PW\" | tollgate subscriber password alice",
        formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("action", choices=("password",))
    p.add_argument("subscriber", help="name or id")
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.set_defaults(func=cmd_subscriber)

    p = with_config(sub.add_parser(
        "audit", help="the audit log of changes: verify its hash chain, show its last rows",
        description="Every change made through the admin API or these commands is a row of a hash chain; "
                    "`verify` recomputes it (exit 1 and the first bad row if a row was changed or deleted)."))
    p.add_argument("action", choices=("verify", "show"))
    p.add_argument("--limit", type=int, default=20, help="show: how many of the last rows (default 20)")
    p.add_argument("--db", help="the ledger (default: gateway.database)")
    p.set_defaults(func=cmd_audit)

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
    return parser


def main(argv=None) -> int:
    parser = build_parser()
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
