-- Tollgate ledger, schema 23: a wake-up for gateways when the change feed moves. Each statement that
-- writes a payment, an adjustment or a change-feed row (schema 14; any writer: CLI, API, another
-- gateway) notifies the channel tollgate_ledger; PostgreSQL delivers it when the transaction commits,
-- once per transaction (equal payloads fold), so listeners read the commit-ordered feed right away.
-- The feed stays the truth: a notification only wakes, and a listener that missed one (a lost
-- connection) finds the rows at its next poll.
CREATE FUNCTION ledger_feed_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tollgate_ledger', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER payments_notify AFTER INSERT ON payments FOR EACH STATEMENT EXECUTE FUNCTION ledger_feed_notify();
CREATE TRIGGER adjustments_notify AFTER INSERT ON adjustments FOR EACH STATEMENT EXECUTE FUNCTION ledger_feed_notify();
CREATE TRIGGER changes_notify AFTER INSERT ON changes FOR EACH STATEMENT EXECUTE FUNCTION ledger_feed_notify();
