-- Tollgate ledger, schema 14: a change feed, so that a running gateway reads
-- what changed since it last looked instead of every subscriber every second.
-- Triggers fill it, whichever process writes (CLI, API, import): one row per
-- change of a subscriber, its addresses, its terms or its manual block. SQLite
-- has one writer at a time, so ids are in commit order and "id > last seen"
-- misses nothing. Rows older than what every gateway has read can be pruned.
CREATE TABLE changes (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    subscriber_id INTEGER NOT NULL,
    what          TEXT NOT NULL
);

CREATE TRIGGER changes_subscriber_insert AFTER INSERT ON subscribers
BEGIN INSERT INTO changes (subscriber_id, what) VALUES (NEW.id, 'subscriber'); END;

-- the balance cache changes with every flush: not a change of the subscriber (payments have their own feed)
CREATE TRIGGER changes_subscriber_update AFTER UPDATE ON subscribers
WHEN NEW.balance IS OLD.balance OR
     (NEW.name, NEW.tariff, NEW.credit_limit, NEW.active) IS NOT (OLD.name, OLD.tariff, OLD.credit_limit, OLD.active)
BEGIN INSERT INTO changes (subscriber_id, what) VALUES (NEW.id, 'subscriber'); END;

CREATE TRIGGER changes_address_insert AFTER INSERT ON addresses
BEGIN INSERT INTO changes (subscriber_id, what) VALUES (NEW.subscriber_id, 'addresses'); END;

CREATE TRIGGER changes_address_delete AFTER DELETE ON addresses
BEGIN INSERT INTO changes (subscriber_id, what) VALUES (OLD.subscriber_id, 'addresses'); END;

CREATE TRIGGER changes_address_update AFTER UPDATE ON addresses
BEGIN
    INSERT INTO changes (subscriber_id, what) VALUES (OLD.subscriber_id, 'addresses');
    INSERT INTO changes (subscriber_id, what) VALUES (NEW.subscriber_id, 'addresses');
END;

CREATE TRIGGER changes_manual_block AFTER INSERT ON blocks WHEN NEW.reason LIKE 'manual%'
BEGIN INSERT INTO changes (subscriber_id, what) VALUES (NEW.subscriber_id, 'manual'); END;
