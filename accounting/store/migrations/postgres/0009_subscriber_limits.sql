-- Tollgate ledger, schema 9 (PostgreSQL 15; migrations/sqlite/0009_subscriber_limits.sql):
-- a subscriber's own speed and connection limits (NULL: the tariff's).

ALTER TABLE subscribers ADD COLUMN speed_up_bps BIGINT CHECK (speed_up_bps > 0);
ALTER TABLE subscribers ADD COLUMN speed_down_bps BIGINT CHECK (speed_down_bps > 0);
ALTER TABLE subscribers ADD COLUMN max_connections BIGINT CHECK (max_connections > 0);
