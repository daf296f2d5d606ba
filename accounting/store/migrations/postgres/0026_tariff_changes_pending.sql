-- Tollgate ledger, schema 26 (PostgreSQL 15; migrations/sqlite/0026_tariff_changes_pending.sql):
-- a subscriber's pending tariff change is found through its subscriber.
-- `tollgate subscriber show` (the change it prints) and the ledger's scheduling of a change (which
-- replaces the one pending) ask for the pending change of one subscriber; tariff_changes_due orders
-- by time only, so each of them read every pending change of every subscriber: 0.44 s for one
-- subscriber with 1M changes pending (a price change scheduled for everyone), 0.4 ms with this.
CREATE INDEX tariff_changes_pending ON tariff_changes(subscriber_id, effective_ns) WHERE applied_ns IS NULL;
