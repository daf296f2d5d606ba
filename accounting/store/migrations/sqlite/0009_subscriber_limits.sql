-- Tollgate ledger, schema 9: a subscriber's own speed and connection limits
-- (NULL: the tariff's).

ALTER TABLE subscribers ADD COLUMN speed_up_bps INTEGER CHECK (speed_up_bps > 0);
ALTER TABLE subscribers ADD COLUMN speed_down_bps INTEGER CHECK (speed_down_bps > 0);
ALTER TABLE subscribers ADD COLUMN max_connections INTEGER CHECK (max_connections > 0);
