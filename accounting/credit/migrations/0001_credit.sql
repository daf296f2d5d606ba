-- Tollgate credit control on PostgreSQL, schema 1 (accounting/credit/pg.py).
-- Amounts are bigint nano-units of the currency, times bigint ns since the epoch (UTC).
--
-- The rule the database holds, for every account, whatever a gateway does:
--     charged + outstanding grants <= opening + payments + credit
-- With balance = opening + payments - charged and reserved = the unused part of the open grants
-- this is reserved <= balance + credit_limit: the CHECK below, kept by every writer's one conditional
-- UPDATE of the account row (reserve takes LEAST(asked, balance + credit_limit - reserved)).

CREATE TABLE credit.accounts (
    id           bigint PRIMARY KEY,               -- the subscriber's id
    opening      bigint NOT NULL,
    balance      bigint NOT NULL,                  -- opening + payments - charged
    credit_limit bigint NOT NULL DEFAULT 0 CHECK (credit_limit >= 0),
    reserved     bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),  -- sum of (amount - used) of open grants
    last_take    bigint NOT NULL DEFAULT 0,        -- what the last conditional UPDATE took (read by its RETURNING)
    created_ns   bigint NOT NULL,
    CONSTRAINT grants_covered CHECK (reserved <= balance + credit_limit)
);

CREATE TABLE credit.grants (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id     bigint NOT NULL REFERENCES credit.accounts (id),
    gateway        text NOT NULL,
    amount         bigint NOT NULL CHECK (amount >= 0),   -- reserved on it, ever (grant + extensions)
    used           bigint NOT NULL DEFAULT 0 CHECK (used >= 0),  -- charged on it
    state          text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'final', 'expired', 'released')),
    valid_until_ns bigint NOT NULL,
    created_ns     bigint NOT NULL,
    closed_ns      bigint,
    CHECK (used <= amount)
);
CREATE INDEX grants_open_until ON credit.grants (valid_until_ns) WHERE state = 'open';
CREATE INDEX grants_open_gateway ON credit.grants (gateway) WHERE state = 'open';
CREATE INDEX grants_account ON credit.grants (account_id);

-- reserve and extend, idempotent by the caller's request id (a retry after a lost reply finds its grant)
CREATE TABLE credit.requests (
    request_id text PRIMARY KEY,
    grant_id   bigint NOT NULL REFERENCES credit.grants (id),
    asked      bigint NOT NULL,
    granted    bigint NOT NULL,
    created_ns bigint NOT NULL
);

-- usage reports, idempotent by report id: a replay returns the first answer and changes nothing
CREATE TABLE credit.reports (
    report_id text PRIMARY KEY,
    grant_id  bigint NOT NULL REFERENCES credit.grants (id),
    used      bigint NOT NULL CHECK (used >= 0),
    final     boolean NOT NULL,
    more      bigint NOT NULL,          -- asked for in the same round trip (RFC 8506 CCR-Update)
    charged   bigint NOT NULL,          -- taken off the balance
    unpaid    bigint NOT NULL,          -- used beyond what the grant and the spare balance could pay
    returned  bigint NOT NULL,          -- unused part given back (final)
    granted   bigint NOT NULL,          -- of ``more``
    ts_ns     bigint NOT NULL
);
CREATE INDEX reports_grant ON credit.reports (grant_id);

CREATE TABLE credit.payments (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    account_id      bigint NOT NULL REFERENCES credit.accounts (id),
    amount          bigint NOT NULL CHECK (amount > 0),
    ts_ns           bigint NOT NULL
);
CREATE INDEX payments_account ON credit.payments (account_id);

-- The change feed, in commit order. An identity or sequence column is not: ids are taken when a row is
-- inserted and become visible when its transaction commits, so id 8 can be visible before id 7 and a
-- reader that keeps "id > last seen" skips 7 for ever. Here the id comes from the one row of feed_head,
-- updated by the writing transaction just before it commits: the row lock is held until commit, so the
-- next writer gets its id only after this one's commit, and ids become visible in order. Writers of the
-- feed (payments, accounts, credit limits: rare events, never reports) queue on that row; nothing else does.
CREATE TABLE credit.feed_head (
    one  boolean PRIMARY KEY DEFAULT true CHECK (one),
    last bigint NOT NULL
);
INSERT INTO credit.feed_head VALUES (true, 0);

CREATE TABLE credit.changes (
    id         bigint PRIMARY KEY,
    account_id bigint NOT NULL,
    what       text NOT NULL,
    ts_ns      bigint NOT NULL
);
