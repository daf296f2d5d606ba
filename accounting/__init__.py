"""The billing domain: subscribers, tariffs, zones, money and the ledger. No netlink here."""
