-- Tollgate ledger, schema 27 (PostgreSQL 15; migrations/sqlite/0027_addresses_by_subscriber_covering.sql):
-- a subscriber's networks are read from the index alone (an index-only scan where the visibility map
-- allows). A start reads every subscriber's networks joined, in the subscribers' order
-- (Backend.joined_in_order); an index of (subscriber_id, network) holds both, and serves every look-up
-- by subscriber the old index served (its first column), so that one goes.
CREATE INDEX addresses_subscriber_network ON addresses(subscriber_id, network);
DROP INDEX addresses_subscriber;
