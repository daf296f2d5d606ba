"""``python -m api --config FILE --db LEDGER [--listen 127.0.0.1] [--port 8081]``:
the admin API and the portal from a ledger alone, without the gateway (a
gateway on the same ledger picks up the changes within a second)."""

from __future__ import annotations

import argparse

import uvicorn

from gateway.config import load_config

from .app import LedgerView, create_app


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m api", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", "-c", required=True, help="the gateway's config file")
    ap.add_argument("--db", required=True, help="the ledger (SQLite file)")
    ap.add_argument("--listen", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8081)
    args = ap.parse_args(argv)
    uvicorn.run(create_app(LedgerView(load_config(args.config), args.db)), host=args.listen, port=args.port,
                log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
