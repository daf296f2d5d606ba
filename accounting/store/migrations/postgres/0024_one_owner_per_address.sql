-- Tollgate ledger, schema 24: one owner per address, held by the database.
-- A prefix of one subscriber may not overlap a prefix of another (static addresses and the
-- addresses of live sessions alike, both rows of addresses): accounting/operations.py refuses it
-- in words, and since PostgreSQL runs writers side by side (no lock for the whole ledger), two
-- writers that each checked before the other wrote could both pass; this constraint refuses the
-- second. Overlapping prefixes of one subscriber stay legal (a /64 and an address inside it).
-- inet's && is "either contains the other"; an IPv4 and an IPv6 prefix never overlap. The
-- subscriber's <> needs btree_gist (a trusted extension: the ledger's owner may create it).
CREATE EXTENSION IF NOT EXISTS btree_gist;

-- A ledger that holds overlaps already (written before this check existed) is refused with what
-- clashes, and stays at schema 23 until they are given one owner each.
DO $$
DECLARE
    detail text;
BEGIN
    ALTER TABLE addresses ADD CONSTRAINT addresses_one_owner
        EXCLUDE USING gist ((network::inet) inet_ops WITH &&, subscriber_id WITH <>);
EXCEPTION WHEN exclusion_violation THEN
    GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
    RAISE EXCEPTION 'addresses of two subscribers overlap: % Give each address one owner (tollgate ledger '
                    'check lists them all), then open the ledger again', detail;
END
$$;
