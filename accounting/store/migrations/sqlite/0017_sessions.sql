-- Tollgate ledger, schema 17: sessions (issue 15). Who is behind an address, from DHCP leases, RADIUS
-- accounting and portal logins, with the history kept: closed rows stay, so "who had 100.64.7.9 at T"
-- has one answer (accounting/sessions.py). One row per network of a session; a source's session
-- (source, client, session_key) may hold several networks (a Framed-IP-Address and a delegated prefix).
CREATE TABLE sessions (
    id            INTEGER PRIMARY KEY,
    network       TEXT NOT NULL,          -- canonical CIDR, host bits zero
    subscriber_id INTEGER NOT NULL REFERENCES subscribers(id),
    source        TEXT NOT NULL CHECK (source IN ('radius', 'dnsmasq', 'kea', 'portal')),
    session_key   TEXT NOT NULL,          -- the source's id: Acct-Session-Id, a lease's MAC or client id
    client        TEXT NOT NULL,          -- which NAS (RADIUS client name) or DHCP server reported it
    mac           TEXT,                   -- lower-case aa:bb:cc:dd:ee:ff, where known
    started_ns    INTEGER NOT NULL,
    last_seen_ns  INTEGER NOT NULL,
    expires_ns    INTEGER,                -- closed as 'expired' after this (lost Stop, lease end); NULL: never
    ended_ns      INTEGER,                -- NULL while live
    end_reason    TEXT,
    up_bytes      INTEGER NOT NULL DEFAULT 0 CHECK (up_bytes >= 0),     -- as the source reports them
    down_bytes    INTEGER NOT NULL DEFAULT 0 CHECK (down_bytes >= 0),
    CHECK (last_seen_ns >= started_ns),
    CHECK ((ended_ns IS NULL) = (end_reason IS NULL)),
    CHECK (ended_ns IS NULL OR ended_ns >= started_ns)
);
-- no two live owners of one network, whoever writes (the overlap of different prefixes is refused by
-- accounting.operations, as for static addresses: the live rows are in the addresses table too)
CREATE UNIQUE INDEX sessions_live_network ON sessions(network) WHERE ended_ns IS NULL;
CREATE INDEX sessions_network ON sessions(network, started_ns);
CREATE INDEX sessions_key ON sessions(source, client, session_key) WHERE ended_ns IS NULL;
CREATE INDEX sessions_expiry ON sessions(expires_ns) WHERE ended_ns IS NULL AND expires_ns IS NOT NULL;
CREATE INDEX sessions_subscriber ON sessions(subscriber_id, started_ns);

-- While a session is live its network is one of the subscriber's addresses (a row here marked with the
-- session), so the change feed (schema 14) tells a running gateway within a poll; NULL: a static address.
ALTER TABLE addresses ADD COLUMN session_id INTEGER REFERENCES sessions(id);

-- What binds a DHCP lease to a subscriber: its MAC, DHCP client id or option 82 circuit id.
CREATE TABLE bindings (
    kind          TEXT NOT NULL CHECK (kind IN ('mac', 'client_id', 'circuit_id')),
    value         TEXT NOT NULL,
    subscriber_id INTEGER NOT NULL REFERENCES subscribers(id),
    PRIMARY KEY (kind, value)
) WITHOUT ROWID;
CREATE INDEX bindings_subscriber ON bindings(subscriber_id);
