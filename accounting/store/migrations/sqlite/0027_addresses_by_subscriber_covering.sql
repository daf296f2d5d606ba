-- Tollgate ledger, schema 27: a subscriber's networks are read from the index alone.
-- A start reads every subscriber's networks joined, in the subscribers' order
-- (Backend.joined_in_order): through addresses_subscriber (subscriber_id) each of the 1.8M rows
-- of a million subscribers was looked up in the table for its network, 2.7 s of the start; an
-- index of (subscriber_id, network) holds both, 1.5 s. It serves every look-up by subscriber the
-- old index served (its first column), so that one goes. At a million subscribers the upgrade
-- builds the index in a few seconds and the file grows by some 60 MB.
CREATE INDEX addresses_subscriber_network ON addresses(subscriber_id, network);
DROP INDEX addresses_subscriber;
