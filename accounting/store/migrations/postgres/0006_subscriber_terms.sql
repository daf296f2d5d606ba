-- Tollgate ledger, schema 6 (PostgreSQL 15; migrations/sqlite/0006_subscriber_terms.sql):
-- a subscriber's own billing terms, set by an operator (API, CLI) rather than
-- the config file. NULL: not set here (the config's [[subscriber]] entry, then
-- the group's, then the tariff's apply).

ALTER TABLE subscribers ADD COLUMN group_name TEXT;
ALTER TABLE subscribers ADD COLUMN discount_bp BIGINT CHECK (discount_bp BETWEEN 0 AND 10000);
ALTER TABLE subscribers ADD COLUMN discount_until_ns BIGINT;
ALTER TABLE subscribers ADD COLUMN credit_until_ns BIGINT;
