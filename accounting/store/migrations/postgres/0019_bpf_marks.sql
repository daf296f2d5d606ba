-- Tollgate ledger, schema 19 (PostgreSQL 15; migrations/sqlite/0019_bpf_marks.sql):
-- the kernel marks of the eBPF data path (gateway/sources/ebpf.py), per zone.

-- The tc program counts per (slot, zone, direction) in monotonic counters
-- that live as long as its pinned maps (a restart or a SIGKILL of the daemon
-- keeps them). The part of each count the ledger already holds as usage is
-- kept here, advanced in the same transaction as the flush that adds those
-- bytes to the usage (Ledger.apply_flush_bpf), so that at start kernel - mark
-- is exactly what was forwarded and never flushed: charged once, never twice.
-- The slot of a subscriber is its id. (WITHOUT ROWID in SQLite: a plain table.)
CREATE TABLE bpf_marks (
    subscriber_id BIGINT NOT NULL REFERENCES subscribers(id),
    zone          BIGINT NOT NULL CHECK (zone >= 0),
    direction     BIGINT NOT NULL CHECK (direction IN (0, 1)),
    bytes         BIGINT NOT NULL,
    packets       BIGINT NOT NULL,
    PRIMARY KEY (subscriber_id, zone, direction)
);

-- Which load of the maps the marks belong to (ext/bpfmaps.pyx Maps.load_id,
-- random at each load): maps loaded afresh count from 0, and the marks with
-- them. (load_id is an unsigned 32-bit number: above 2^31, a bigint.)
CREATE TABLE bpf_maps (
    pin_dir TEXT PRIMARY KEY,
    load_id BIGINT NOT NULL
);
