"""What accounting needs of the operator's configuration: an interface accounting owns.

:class:`accounting.operations.Operations` takes a :class:`Settings` and reads
nothing else of it. ``gateway.config.Config`` (the TOML file, parsed) is one;
a test or another front end can give any object with these attributes.
Accounting never imports the gateway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from .money import Currency
from .tariff import Tariff


class ZoneNames(Protocol):
    names: Sequence[str]  # by zone number: names in the ledger's usage rows


class SessionTerms(Protocol):
    portal_session: int  # seconds a portal login (or a voucher's device) stays bound at most
    voucher_tariff: str | None  # the tariff of the accounts vouchers open, unless a voucher names one


class Settings(Protocol):
    currency: Currency
    timezone: str  # IANA name: invoices, periods and usage days are in it
    tariffs: Mapping[str, Tariff]
    groups: Mapping[str, object]  # names of the subscriber groups (terms shared by several subscribers)
    zones: ZoneNames
    sessions: SessionTerms
