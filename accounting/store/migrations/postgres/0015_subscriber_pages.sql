-- Tollgate ledger, schema 15 (PostgreSQL 15; migrations/sqlite/0015_subscriber_pages.sql):
-- indexes so that the operations people run (a page of subscribers, one
-- subscriber, the top talkers of a range, one subscriber's usage, a portal
-- login) cost a page, not the table (issue 12). Each serves a query of
-- accounting/ledger.py's "pages and bulk" section.

-- list filtered by tariff or by state, in id order (keyset paging: WHERE ... AND id > ? ORDER BY id)
CREATE INDEX subscribers_tariff ON subscribers (tariff, id);
CREATE INDEX subscribers_active ON subscribers (active, id);
-- the portal's login by contract number
CREATE INDEX subscribers_contract ON subscribers (contract);

-- top talkers of a range: every usage row of the range, read from this index alone (covering: no
-- lookup into the table per row), summed per subscriber
CREATE INDEX usage_minute_totals ON usage (minute, subscriber_id, bytes, packets, amount);
-- ... which makes schema 2's index on the minute alone redundant: one index fewer for every flush to write
DROP INDEX usage_minute;
-- one subscriber's usage over a range (the portal's 30 days, `tollgate usage NAME --since`): the
-- primary key starts with the subscriber but then zone and direction, so a range of minutes would
-- read all of the subscriber's history
CREATE INDEX usage_subscriber_minute ON usage (subscriber_id, minute);

-- SQLite's json_extract() for the object paths the ledger uses ('$', '$.key', '$.a.b'), so that the code's
-- query (Ledger.import_of: json_extract(after, '$.file_sha256') = ?) is the same SQL on both backends and
-- matches this index's expression. The value as text (a JSON string without its quotes, as SQLite gives it;
-- a number as its text, where SQLite would give a number: the ledger only compares strings); NULL where the
-- key is missing or the document NULL. Immutable, as an index expression must be.
CREATE FUNCTION json_extract(doc text, path text) RETURNS text LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    IF path = '$' THEN
        RETURN doc::json #>> '{}';
    ELSIF path ~ '^\$(\.[A-Za-z_][A-Za-z0-9_]*)+$' THEN
        RETURN doc::json #>> string_to_array(substr(path, 3), '.');
    END IF;
    RAISE EXCEPTION 'json_extract: path % is not supported here (only $ and $.key.key...)', path
        USING ERRCODE = 'invalid_parameter_value';
END
$$;

-- the bulk imports in the audit log, by the SHA-256 of their file: the same file again is known at once
-- (accounting.operations.Operations.import_subscribers), however long the log
CREATE INDEX audit_log_imports ON audit_log (json_extract(after, '$.file_sha256')) WHERE action = 'subscriber.import';
