-- Tollgate ledger, schema 10 (PostgreSQL 15; migrations/sqlite/0010_subscriber_access.sql):
-- a subscriber's own access hours, in the text form of accounting/access.py
-- ("Mon-Fri 08:00-20:00; Sat 10:00-14:00"); NULL: the tariff's.

ALTER TABLE subscribers ADD COLUMN access_hours TEXT;
