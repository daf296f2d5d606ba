"""Where the traffic the engine rates comes from.

``nfqueue`` is the inline source: every packet waits for its verdict, so a
subscriber is stopped at the breaching packet. The others are passive: they
see traffic that has already passed (NFLOG copies of packets, conntrack flow
counters, NetFlow/IPFIX records from routers, flow files dropped in a spool
directory). They feed the same engine; blocking then happens in the kernel's
sets (and, for NFLOG, in per-subscriber kernel quotas).

A passive source is a class ``Cls(engine, on_events, **options)`` with
``run()`` (blocks until ``stop()``), ``stop()``, ``close()`` and
``stats() -> dict``; ``on_events`` takes a list of ``(Event, packet_ts_ns)``.
``OPTIONS`` maps each option it takes (given on the command line as
``--source-option NAME=VALUE``, always a string) to a line of help.
"""

from __future__ import annotations

import importlib

from ext.errors import ConfigError

# name -> "module:Class"; nfqueue is run by the daemon itself (one reader per queue)
SOURCES: dict[str, str] = {
    "nfqueue": "ext.nfqueue:QueueReader",
    "conntrack": "gateway.sources.conntrack:ConntrackSource",
    "nflog": "gateway.sources.nflog:NflogSource",
    "netflow": "gateway.sources.netflow:NetflowSource",
    "spool": "gateway.sources.spool:SpoolSource",
    "ebpf": "gateway.sources.ebpf:EbpfSource",
}


def source_names() -> list[str]:
    return sorted(SOURCES)


def source_class(name: str) -> type:
    try:
        module, _, cls = SOURCES[name].partition(":")
    except KeyError:
        raise ConfigError("--source", f"{name!r} is not a source; one of {', '.join(source_names())}") from None
    return getattr(importlib.import_module(module), cls)


def parse_source_options(name: str, pairs: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` pairs checked against the source's ``OPTIONS``."""
    known = getattr(source_class(name), "OPTIONS", {})
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ConfigError("--source-option", f"{pair!r} is not NAME=VALUE")
        if key not in known:
            hint = ", ".join(sorted(known)) or "none"
            raise ConfigError("--source-option", f"source {name} has no option {key!r} (it takes: {hint})")
        options[key] = value
    return options


def process_flows(engine, on_events, batch) -> None:
    """Rate a batch of flow records, hand the engine's events on with their
    records' times, and empty the batch for the next ones."""
    if batch.n:
        events = engine.process(batch)
        if events:
            on_events([(ev, batch.ts[ev.index]) for ev in events])
    batch.clear()
