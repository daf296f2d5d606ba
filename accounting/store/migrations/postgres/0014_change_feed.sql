-- Tollgate ledger, schema 14 (PostgreSQL 15; migrations/sqlite/0014_change_feed.sql):
-- a change feed, so that a running gateway reads what changed since it last
-- looked instead of every subscriber every second. Triggers fill it, whichever
-- process writes (CLI, API, import): one row per change of a subscriber, its
-- addresses, its terms or its manual block. Rows older than what every gateway
-- has read can be pruned.
--
-- Commit order. In SQLite one writer at a time makes ids commit-ordered, so
-- "id > last seen" (Ledger.changes_since) misses nothing. A PostgreSQL
-- identity would not be: ids are taken at insert and become visible at commit,
-- so a transaction that took id 7 and commits after the one that took 8 is
-- skipped for ever by a reader that already moved past 8 (a new subscriber, an
-- address or a manual block a gateway never hears of). So changes.id is not an
-- identity: the BEFORE INSERT trigger changes_commit_order (schema 1's
-- feed_commit_order) locks the one row of feed_head, held until the writing
-- transaction commits, and only then takes the id from changes_id_seq. The
-- next writer of the feed (or of payments or adjustments: one lock for all
-- three, so no two of them can deadlock on each other) waits for that commit
-- before it can take an id, so ids become visible in commit order, as in
-- the older credit store's feed (retired). Every row written to changes, by these
-- triggers or by an INSERT of the code (Ledger.insert_subscribers writes the
-- rows of a bulk import itself), gets its id so; an id given in the INSERT is
-- replaced. AUTOINCREMENT (ids never reused after a prune) is what a sequence
-- does anyway.
CREATE TABLE changes (
    id            BIGINT PRIMARY KEY,
    subscriber_id BIGINT NOT NULL,
    what          TEXT NOT NULL
);
CREATE SEQUENCE changes_id_seq AS bigint CACHE 1 OWNED BY changes.id;  -- CACHE 1: cached ids would come out of order
CREATE TRIGGER changes_commit_order BEFORE INSERT ON changes
    FOR EACH ROW EXECUTE FUNCTION feed_commit_order('changes_id_seq');

-- SQLite's triggers, each as a function of the same name and a trigger of that name
CREATE FUNCTION changes_subscriber_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO changes (subscriber_id, what) VALUES (NEW.id, 'subscriber');
    RETURN NULL;
END
$$;
CREATE TRIGGER changes_subscriber_insert AFTER INSERT ON subscribers
    FOR EACH ROW EXECUTE FUNCTION changes_subscriber_insert();

-- the balance cache changes with every flush: not a change of the subscriber (payments have their own feed).
-- SQLite's IS / IS NOT on values are IS NOT DISTINCT FROM / IS DISTINCT FROM (NULLs compare as equal),
-- on a row value as there. (The columns compared are all NOT NULL, so = and <> would do the same today;
-- the translation keeps the meaning should one of them become nullable.)
CREATE FUNCTION changes_subscriber_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO changes (subscriber_id, what) VALUES (NEW.id, 'subscriber');
    RETURN NULL;
END
$$;
CREATE TRIGGER changes_subscriber_update AFTER UPDATE ON subscribers
    FOR EACH ROW
    WHEN (NEW.balance IS NOT DISTINCT FROM OLD.balance OR
          (NEW.name, NEW.tariff, NEW.credit_limit, NEW.active)
              IS DISTINCT FROM (OLD.name, OLD.tariff, OLD.credit_limit, OLD.active))
    EXECUTE FUNCTION changes_subscriber_update();

CREATE FUNCTION changes_address_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO changes (subscriber_id, what) VALUES (NEW.subscriber_id, 'addresses');
    RETURN NULL;
END
$$;
CREATE TRIGGER changes_address_insert AFTER INSERT ON addresses
    FOR EACH ROW EXECUTE FUNCTION changes_address_insert();

CREATE FUNCTION changes_address_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO changes (subscriber_id, what) VALUES (OLD.subscriber_id, 'addresses');
    RETURN NULL;
END
$$;
CREATE TRIGGER changes_address_delete AFTER DELETE ON addresses
    FOR EACH ROW EXECUTE FUNCTION changes_address_delete();

CREATE FUNCTION changes_address_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO changes (subscriber_id, what) VALUES (OLD.subscriber_id, 'addresses');
    INSERT INTO changes (subscriber_id, what) VALUES (NEW.subscriber_id, 'addresses');
    RETURN NULL;
END
$$;
CREATE TRIGGER changes_address_update AFTER UPDATE ON addresses
    FOR EACH ROW EXECUTE FUNCTION changes_address_update();

-- SQLite's LIKE ignores ASCII case, PostgreSQL's does not. Plain LIKE is the same here: every block reason
-- the code writes is lower case ('manual: ...' from accounting.operations, the engine's 'limit', 'manual',
-- 'volume', 'schedule' of ext/constants.py BLOCK_REASONS), and the readers (Ledger.manually_blocked and
-- friends) test the same lower-case prefix with the same LIKE on either backend.
CREATE FUNCTION changes_manual_block() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO changes (subscriber_id, what) VALUES (NEW.subscriber_id, 'manual');
    RETURN NULL;
END
$$;
CREATE TRIGGER changes_manual_block AFTER INSERT ON blocks
    FOR EACH ROW WHEN (NEW.reason LIKE 'manual%')
    EXECUTE FUNCTION changes_manual_block();
