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

from ext.errors import CaptureError, ConfigError, LedgerError, TollgateError

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
    result = replay(cfg, args.capture, db, engine=args.engine, dry_run=args.dry_run,
                    progress=not args.quiet and not args.json)
    if args.json:
        json.dump(result_json(result, cfg), sys.stdout, indent=2)
        print()
    else:
        print(result_text(result, cfg))
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
    p.set_defaults(func=cmd_replay)

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
