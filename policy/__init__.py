"""Enforcement in the kernel: our nftables table, blocked sets, the portal redirect. No billing arithmetic here."""
