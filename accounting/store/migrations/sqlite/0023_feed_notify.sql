-- Tollgate ledger, schema 23: a wake-up for gateways when the change feed moves.
-- On PostgreSQL each commit that writes a payment, an adjustment or a change-feed row notifies
-- the channel tollgate_ledger, and a gateway reads the feed at once instead of at its next poll.
-- SQLite has no notifications (and one box has no other gateways to wake): gateways poll the feed
-- every 0.2 s as before. Nothing to create here; the version keeps both backends' numbers equal.
SELECT 1;
