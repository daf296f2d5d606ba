-- Tollgate ledger, schema 7 (PostgreSQL 15; migrations/sqlite/0007_volume_limit.sql):
-- a subscriber's own volume limit per billing period (bytes of traffic outside
-- the local zone), set by an operator or by the subscriber; NULL: the
-- tariff's, if any.

ALTER TABLE subscribers ADD COLUMN volume_limit BIGINT CHECK (volume_limit >= 0);
