-- Tollgate ledger, schema 21: the head of the audit chain (schema 12) in a
-- row of its own. An append takes its id and the previous row's hash from
-- this row with one UPDATE ... RETURNING and writes its own hash back, so the
-- chain never forks: two appends can never both chain onto the same row. On
-- SQLite the file's one writer orders them anyway; on PostgreSQL the UPDATE's
-- row lock does, held to commit, without the ledger's global writer lock.
CREATE TABLE audit_head (
    one  INTEGER PRIMARY KEY CHECK (one = 1),
    id   INTEGER NOT NULL,
    hash TEXT NOT NULL
) STRICT;

INSERT INTO audit_head (one, id, hash)
SELECT 1, coalesce(max(id), 0),
       coalesce((SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1), printf('%064d', 0))
FROM audit_log;
