-- Tollgate ledger, schema 21: the head of the audit chain (schema 12) in a
-- row of its own. An append takes its id and the previous row's hash from
-- this row with one UPDATE ... RETURNING and writes its own hash back, so the
-- chain never forks: two appends can never both chain onto the same row. The
-- UPDATE's row lock, held to commit, orders concurrent appends (a second one
-- waits, then reads the row the first committed: READ COMMITTED re-reads an
-- updated row before updating it), without the ledger's global writer lock.
CREATE TABLE audit_head (
    one  BIGINT PRIMARY KEY CHECK (one = 1),
    id   BIGINT NOT NULL,
    hash TEXT NOT NULL
);

INSERT INTO audit_head (one, id, hash)
SELECT 1, coalesce(max(id), 0),
       coalesce((SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1), repeat('0', 64))
FROM audit_log;
