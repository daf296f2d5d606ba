"""What a command of the command line does before its work (issue 12: list, show, top and usage within 200 ms
at a million subscribers, where most of the time was Python's imports, not the query).

No timings here (those are the bench's): the modules a fresh process has loaded after ``import gateway.cli``
and after each daily command, which must not include the heavy ones that only other commands need; what a
command prints; and that the parser built for the one command named (``build_parser(command)``) parses and
helps exactly as the whole parser does."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest

from gateway import cli

# Each of these cost the CLI's start 4-60 ms and none is needed by list/show/top/usage/topup/add: sqlite_utils
# (click, pluggy, dateutil, an entry-point scan) was the SQLite backend's; urllib.request (http.client, ssl,
# email) notify's webhook; policy.limits and nftables a tariff speed's parser; uuid (platform) a top-up's key
# when no --key is given (topup below gives none: it may load uuid, checked apart); fastapi/uvicorn the API's.
HEAVY = ("sqlite_utils", "click", "pluggy", "dateutil", "importlib.metadata", "urllib.request", "http.client", "ssl",
         "email", "fastapi", "starlette", "uvicorn", "pydantic", "policy.limits", "policy.nft", "nftables",
         "ctypes", "uuid", "platform")
# and what only a change needs: the audit chain's and the cards' hashing (a read writes no audit row)
CHANGE_ONLY = ("hashlib", "secrets", "accounting.audit", "accounting.prepaid")

CONFIG = """
[gateway]
currency = "EUR"
local_networks = ["100.64.0.0/10"]

[[tariff]]
name = "basic"
price_unit = "MB"
[tariff.prices]
external = "0.01"
"""

# runs one command as `python -m gateway.cli` would (gateway.cli.main), then writes the modules it loaded
RUN = textwrap.dedent("""
    import json, sys
    from gateway import cli
    code = cli.main(sys.argv[2:])
    with open(sys.argv[1], "w") as f:
        json.dump(sorted(sys.modules), f)
    sys.exit(code)
""")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _loaded_by(tmp_path, *args) -> tuple[subprocess.CompletedProcess, set[str]]:
    dump = tmp_path / "modules.json"
    out = subprocess.run([sys.executable, "-c", RUN, str(dump), *args], capture_output=True, text=True, env=_env(),
                         check=False)
    return out, set(json.loads(dump.read_text())) if dump.exists() else set()


def _heavy(modules: set[str], allowed=()) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in {h.split(".")[0] for h in HEAVY}
                  and any(m == h or m.startswith(h + ".") for h in HEAVY if h not in allowed))


def test_importing_the_cli_loads_none_of_the_heavy_modules():
    out = subprocess.run([sys.executable, "-c", "import json, sys, gateway.cli; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, env=_env(), check=True)
    assert _heavy(set(json.loads(out.stdout))) == []


@pytest.fixture
def two(tmp_path):
    """A config and a ledger with alice and bob (added in-process, as `subscriber add` would)."""
    from accounting.ledger import Ledger
    from accounting.operations import Operations
    from gateway.config import load_config

    (tmp_path / "t.toml").write_text(CONFIG)
    cfg = load_config(str(tmp_path / "t.toml"))
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        ops = Operations(ledger, cfg, "cli:test")
        ops.add("alice", "basic", ["100.64.0.2/32"], "10.00")
        ops.add("bob", "basic", ["100.64.0.3/32", "100.64.0.4/32"], "0", "2.50")
    return ["-c", str(tmp_path / "t.toml"), "--db", str(tmp_path / "ledger.db")]


LIST_PAGE = """\
   id  name             tariff                  balance  state    blocked          addresses
    1  alice            basic                 10.00 EUR  active   -                100.64.0.2/32
1-1 of 2 (--offset 1 for more)
"""


@pytest.mark.parametrize("args, printed", [
    (["subscriber", "list", "--limit", "1"], LIST_PAGE),
    (["subscriber", "show", "bob"], "bob (id 2)\n  tariff        basic\n  balance       0.00 EUR\n"
                                    "  credit limit  2.50 EUR\n  state         active\n"
                                    "  addresses     100.64.0.3/32 100.64.0.4/32\n"),
    (["top"], "no usage in that range\n"),
    (["usage", "alice"], "no usage in that range\n"),
    (["topup", "alice", "1.00", "--key", "k1"], "alice: +1.00 EUR, ledger balance 11.00 EUR "
                                                "(a running gateway applies it within a second)\n"),
    (["subscriber", "add", "carol", "--tariff", "basic"], None),
])
def test_a_daily_command_prints_what_it_did_and_loads_none_of_the_heavy_modules(tmp_path, two, args, printed):
    out, modules = _loaded_by(tmp_path, *args, *two)
    assert out.returncode == 0, out.stderr
    if printed is not None:
        assert out.stdout == printed
    assert "accounting.operations" in modules  # it did its work: the check below is not of a process that failed early
    assert _heavy(modules) == []
    if args[0] in ("top", "usage") or args[1] in ("list", "show"):
        assert sorted(m for m in CHANGE_ONLY if m in modules) == []
    else:
        assert "accounting.audit" in modules  # the change wrote its audit row


def test_a_topup_without_a_key_makes_one_and_loads_only_uuid_for_it(tmp_path, two):
    out, modules = _loaded_by(tmp_path, "topup", "alice", "1.00", *two)
    assert out.returncode == 0 and "ledger balance 11.00 EUR" in out.stdout, out.stderr
    assert _heavy(modules, allowed=("uuid", "platform")) == []


def _commands(parser: argparse.ArgumentParser, path=()):
    """Every command and nested action of ``parser``: ``(path, its parser)``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


def _subparser(parser, path):
    for name in path:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def test_the_parser_of_one_command_helps_as_the_whole_parser_does(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # one width for both
    whole = cli.build_parser()
    commands = list(_commands(whole))
    assert len({path[0] for path, _ in commands}) >= 20
    for path, sub in commands:
        alone = cli.build_parser(path[0])
        assert _subparser(alone, path).format_help() == sub.format_help(), path
        # and the others were not made at all
        top = next(a for a in alone._actions if isinstance(a, argparse._SubParsersAction))
        assert list(top.choices) == [path[0]]
    assert cli.build_parser("no-such-command").format_help() == whole.format_help()


@pytest.mark.parametrize("argv", [
    ["subscriber", "list", "--limit", "50", "-c", "t.toml", "--db", "l.db"],
    ["-v", "subscriber", "-c", "t.toml", "show", "b5", "--json"],
    ["top", "--n", "5", "--since", "2026-03-01"],
    ["usage", "b5", "--by", "day", "--direction", "download"],
    ["topup", "b5", "1.00", "--key", "k"],
    ["subscriber", "add", "x", "--tariff", "basic", "--address", "100.64.0.9/32"],
    ["session", "list", "--live"],
    ["config", "check"],
])
def test_the_parser_of_one_command_parses_as_the_whole_parser_does(argv):
    def parsed(parser):
        args = vars(parser.parse_args(argv))
        func = args.pop("func")
        return args, getattr(func, "__wrapped__", func)  # _operation wraps anew in each build

    assert cli._named_command(argv) == next(w for w in argv if w != "-v")
    assert parsed(cli.build_parser(cli._named_command(argv))) == parsed(cli.build_parser())


@pytest.mark.parametrize("argv, named", [
    ([], None), (["--help"], None), (["-v"], None), (["-vh", "top"], None), (["--", "top"], None),
    (["--verbose", "top"], "top"), (["-v", "-v", "top"], "top"),
])
def test_only_a_command_named_first_gets_a_parser_of_its_own(argv, named):
    assert cli._named_command(argv) == named
