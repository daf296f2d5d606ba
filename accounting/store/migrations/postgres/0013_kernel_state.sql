-- Tollgate ledger, schema 13 (PostgreSQL 15; migrations/sqlite/0013_kernel_state.sql):
-- what the gateway must remember about the kernel across restarts and crashes.

-- The part of each subscriber's kernel counters (our nft table's per-network
-- counters, summed over its networks, per direction) that the ledger already
-- holds as usage. The kernel's counters are never reset while the table lives,
-- so after a restart or a SIGKILL the kernel's count minus this is traffic the
-- gateway forwarded but never charged: rated but not yet flushed when it died,
-- or passed fail-open while no reader was bound. It is charged on the way back.
CREATE TABLE kernel_marks (
    subscriber_id BIGINT NOT NULL REFERENCES subscribers(id),
    direction     BIGINT NOT NULL CHECK (direction IN (0, 1)),
    bytes         BIGINT NOT NULL,
    packets       BIGINT NOT NULL,
    PRIMARY KEY (subscriber_id, direction)
);

-- The engine's block bits of each subscriber as last pushed to the kernel
-- (ext/constants.py BLOCK_*), with the newest payment and adjustment ids the
-- engine had applied then: a restart puts a limit block back unless a
-- payment or adjustment came after it (a limit block can leave a small
-- positive balance: the breaching packet is dropped, not charged).
-- ("came after it" is "id > payment_id": it holds because payments and
-- adjustments ids are commit-ordered here too, see schema 1's feed_head.)
CREATE TABLE block_state (
    subscriber_id BIGINT PRIMARY KEY REFERENCES subscribers(id),
    blocked       BIGINT NOT NULL,
    payment_id    BIGINT NOT NULL,
    adjustment_id BIGINT NOT NULL,
    ts_ns         BIGINT NOT NULL
);
