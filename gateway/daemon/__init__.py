"""``tollgate run``: the live gateway, one module per job.

Threads, each with one job:

* one **reader** per nfqueue queue (or the passive source's one reader):
  receives packet batches, runs them through the engine (GIL released) and
  sends verdicts; engine events go to the policy queue (``ext/nfqueue.pyx``,
  ``gateway/sources``);
* the **policy pusher** (:mod:`.pusher`): turns block/unblock events into
  batched nftables set changes at once (the kernel drops the subscriber from
  then on, even if this process dies), times each from the breaching packet
  to the set holding it, and writes the block state to the ledger;
* the **flusher** (:mod:`.flusher`): once a second drains the engine's
  counters into the ledger (idempotent flush ids), compares the engine with
  the kernel's counters (:mod:`.kernel`: drift, and what was forwarded but
  never rated), bills, and keeps the time-slot timeline ahead of the clock;
  five times a second it applies what changed in the ledger
  (:mod:`.changes`: a top-up from the CLI or the API unblocks well within a
  second);
* the **drift thread** (:mod:`.kernel`): reads the kernel's counters of the
  active subscribers and a slice of the others, through a libnftables
  context of its own, for the flusher to compare after its next flush;
* the **quota keeper** (:mod:`.quotas`), under a passive source with kernel
  quotas; under the eBPF source, its reader charges the tc program's
  counters and the **grant keeper** (:mod:`.grants`) turns money into the
  kernel's byte grants (gateway/sources/ebpf.py);
* the **session host** (:mod:`.sessions`): expiry of sessions, the RADIUS
  accounting server when the gateway serves it, and address binding;
* the **HTTP service** (:mod:`.http`): health, ``/metrics`` (:mod:`.metrics`),
  the admin API, the block page and the portal;
* the **rollup** and **notification** threads (:mod:`.flusher`), on
  connections of their own.
* the **sessions** thread (:mod:`.sessions`): closes expired sessions every
  few seconds, keeps the kernel's address bindings (anti-spoofing) in line
  with the ledger; and the **radius** thread, the hosted RADIUS accounting
  server (``[radius] serve_in_gateway``).

:mod:`.gateway` holds what they share and the lock order; speed and
connection limits are :mod:`.limits`.

SIGTERM/SIGINT: stop the readers, flush, leave the kernel table and its blocks
in place (the queue rule bypasses to the fail-open/closed choice). SIGHUP:
reload the config (zones, tariffs, time slots, allow-list).
"""

from .gateway import Gateway, run
from .options import RunOptions

__all__ = ["Gateway", "RunOptions", "run"]
