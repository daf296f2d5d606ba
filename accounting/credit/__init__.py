"""Credit control on a shared PostgreSQL ledger (issue 13, in progress).

RFC 8506-style credit grants between one ledger and many gateways: a gateway
reserves a slice of balance + credit for a subscriber, reports what it used
under an idempotent report id, asks for more before it runs out, and the
unused part comes back at the final report, at shutdown or at the grant's
expiry. The database holds the rule that outstanding grants never exceed
what the balance can pay. See :mod:`accounting.credit.pg`.

Nothing else in Tollgate uses this package yet: the SQLite ledger
(:mod:`accounting.ledger`) is unchanged.
"""
