-- Tollgate ledger, schema 25: a sum past 2^63-1 is refused, not stored as a float.
-- The ledger adds into balances, grants, usage, charges and the kernel's marks in SQL
-- (balance = balance + ?). SQLite's integer + integer beyond 64 bits becomes a REAL without an
-- error (9.223372036854776e+18: an amount rounded to the nearest 2048 units, and a balance that no
-- longer equals the sum of its postings), where PostgreSQL's bigint refuses it. These triggers make
-- SQLite refuse it too: the statement aborts, and the ledger's transaction with it, nothing written
-- (a LedgerError naming 2^63-1). Only updates add into a stored value; an insert of a number past
-- 2^63-1 is refused already, by sqlite3 (OverflowError).
CREATE TRIGGER subscribers_sums_stay_integers BEFORE UPDATE OF balance, reserved ON subscribers
    WHEN typeof(NEW.balance) = 'real' OR typeof(NEW.reserved) = 'real'
BEGIN
    SELECT RAISE(ABORT, 'a balance past 2^63-1: out of range for the ledger');
END;

CREATE TRIGGER usage_sums_stay_integers BEFORE UPDATE OF bytes, packets, amount ON usage
    WHEN typeof(NEW.bytes) = 'real' OR typeof(NEW.packets) = 'real' OR typeof(NEW.amount) = 'real'
BEGIN
    SELECT RAISE(ABORT, 'usage past 2^63-1: out of range for the ledger');
END;

CREATE TRIGGER charges_sums_stay_integers BEFORE UPDATE OF amount, flush_count ON charges
    WHEN typeof(NEW.amount) = 'real' OR typeof(NEW.flush_count) = 'real'
BEGIN
    SELECT RAISE(ABORT, 'a charge past 2^63-1: out of range for the ledger');
END;

CREATE TRIGGER grants_sums_stay_integers BEFORE UPDATE OF amount ON grants
    WHEN typeof(NEW.amount) = 'real'
BEGIN
    SELECT RAISE(ABORT, 'a grant past 2^63-1: out of range for the ledger');
END;

CREATE TRIGGER kernel_marks_sums_stay_integers BEFORE UPDATE OF bytes, packets ON kernel_marks
    WHEN typeof(NEW.bytes) = 'real' OR typeof(NEW.packets) = 'real'
BEGIN
    SELECT RAISE(ABORT, 'a kernel mark past 2^63-1: out of range for the ledger');
END;

CREATE TRIGGER bpf_marks_sums_stay_integers BEFORE UPDATE OF bytes, packets ON bpf_marks
    WHEN typeof(NEW.bytes) = 'real' OR typeof(NEW.packets) = 'real'
BEGIN
    SELECT RAISE(ABORT, 'an eBPF mark past 2^63-1: out of range for the ledger');
END;
