"""The gateway's HTTP service (the app is ``api/app.py``): health, /metrics,
the admin API, the block page and the portal, served by uvicorn on a socket
bound at start; and the live view of the gateway the app reads.

Locks: none. The live view reads the engine (which locks inside) and the
request threads' ledger (``Gateway.request_ledgers``: on PostgreSQL one pool
for all of them); changes the API makes reach the engine through the flusher
(``ChangeFollower.request``).
"""

from __future__ import annotations

import socket
import time

from ext.constants import BLOCK_REASONS
from ext.errors import ConfigError


class LiveView:
    """``api.app.GatewayView`` of the running gateway."""

    def __init__(self, gw) -> None:
        self.gw = gw
        self.registry = gw.metrics.registry

    @property
    def config(self):
        return self.gw.config  # the reloaded one after SIGHUP

    def thread_ledger(self):
        return self.gw.request_ledgers.get()

    def refresh_subscriber(self, sid: int) -> None:
        self.gw.changes.request(sid)

    def health(self) -> dict:
        gw = self.gw
        lat = sorted(gw.pusher.latencies)
        pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 3)) if lat else (lambda q: None)
        status = "failed" if gw.failed else "stopping" if gw.stopping.is_set() else "ok"
        return {"status": status, "boot": gw.boot,
                "engine": gw.acct.engine.implementation, "subscribers": len(gw.acct.subscribers),
                "queues": list(gw.opts.queues), "flush_lag_seconds": round(time.time() - gw.flusher.last_flush, 3),
                "block_latency_ms": {"n": len(lat), "p50": pct(0.5), "p99": pct(0.99)},
                "drift_bytes": gw.kernel.drift,
                "source": gw.opts.source,
                "kernel_quotas": gw.quotas.quotas.counts if gw.quotas is not None else None,
                "failed_threads": gw.failed,
                "credit": gw.credit.stats() if gw.credit is not None else None,
                "queue": {gw.reader_label(r): r.stats() for r in gw.readers}}

    def subscriber_page(self, address: str) -> dict | None:
        gw = self.gw
        try:
            sid = gw.acct.engine.lookup_subscriber(address)
        except ValueError:
            return None
        if not sid or sid not in gw.acct.subscribers:
            return None
        from api.app import subscriber_summary

        state = gw.acct.engine.subscriber(sid)  # the live balance: the ledger's lags by a flush
        ledger = self.thread_ledger()
        row = ledger.get_subscriber(sid)
        if row is None:
            return None
        reasons = [name for bit, name in BLOCK_REASONS.items() if state.blocked & bit]
        # the live balance; on a shared ledger ([cluster]) the engine holds a grant: the ledger's balance then
        balance = state.balance if gw.credit is None else row["balance"]
        return subscriber_summary(ledger, gw.config, row, reasons, balance=balance)

    def live_balance(self, sid: int) -> int | None:
        """The engine's balance (the ledger's lags by up to a flush); None if not loaded."""
        gw = self.gw
        return gw.acct.engine.subscriber(sid).balance if sid in gw.acct.subscribers else None


def listen_socket(host: str, port: int) -> socket.socket:
    """The HTTP service's socket, bound in the main thread at start (a port
    in use is a clear error, not a dead thread). ``::`` (the default) is one
    socket for both families: the kernel redirects a blocked subscriber's
    port 80 to us over IPv4 and IPv6 alike, and asyncio would make an IPv6
    socket IPv6-only."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.bind((host, port))
        sock.listen(512)
    except OSError as exc:
        sock.close()
        raise ConfigError("--listen/--port", f"cannot listen on [{host}]:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def serve(view: LiveView, sock: socket.socket) -> None:
    """Run the app on ``sock`` until the process ends (the HTTP thread)."""
    import uvicorn

    from api.app import create_app

    app = create_app(view)

    async def unmapped(scope, receive, send):
        # an IPv4 client of the dual-stack socket shows as ::ffff:a.b.c.d; the block page, the admin
        # networks and the rate limits know it by its IPv4 address
        client = scope.get("client")
        if client and client[0].startswith("::ffff:") and "." in client[0]:
            scope = {**scope, "client": (client[0][7:], client[1])}
        return await app(scope, receive, send)

    server = uvicorn.Server(uvicorn.Config(unmapped, log_level="warning", access_log=False, lifespan="off"))
    server.install_signal_handlers = lambda: None  # signals belong to the main thread's handler
    server.run(sockets=[sock])
