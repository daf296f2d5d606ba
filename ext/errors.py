"""The one exception hierarchy of Tollgate.

Every error the project raises on purpose derives from :class:`TollgateError`,
so a caller can catch the project's failures without catching its bugs. The
module lives in ``ext/`` because that is the lowest layer: everything above it
(accounting, policy, gateway, api) may import it, nothing here imports them.
"""

from __future__ import annotations


class TollgateError(Exception):
    """Root of all errors raised by Tollgate on purpose."""


class ConfigError(TollgateError):
    """A configuration value is missing or wrong.

    ``field`` is the dotted path of the offending value (``tariffs[0].prices``)
    so that the message points the operator at the exact line to fix.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)


class EngineError(TollgateError):
    """A control-plane call to the engine was given something inconsistent
    (an unknown subscriber, a duplicate address, a price out of range)."""


class CaptureError(TollgateError):
    """A capture file cannot be read. ``offset`` is the byte offset in the file
    where reading stopped, when known."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.offset = offset
        super().__init__(message if offset is None else f"{message} (at byte {offset})")


class LedgerError(TollgateError):
    """The ledger refused an operation (unknown subscriber, bad amount, a
    database that is not a Tollgate ledger)."""


class LedgerConflict(LedgerError):
    """The database refused a row that another holds: a name, an address or a key someone has (on
    PostgreSQL, often a writer that passed the same checks at the same moment). Front ends answer
    409, as to the checks that find it first."""


class SourceError(TollgateError, OSError):
    """A packet source (nfqueue, NFLOG) could not be opened or bound:
    ``errno`` is the kernel's (EBUSY: the queue or group has another reader)."""


class QueueError(SourceError):
    """The nfqueue queue could not be opened, bound or configured."""


class LogError(SourceError):
    """The NFLOG group could not be opened, bound or configured."""


class BpfError(TollgateError, OSError):
    """A BPF object, map or program could not be loaded, opened or written
    (``ext/bpfmaps.pyx``), or an argument was refused before anything was
    written. ``errno`` is the kernel's where there is one."""

    def __init__(self, message, err=0):
        OSError.__init__(self, err, message)
        self.message = message

    def __str__(self):
        import os

        return f"{self.message}: {os.strerror(self.errno)}" if self.errno else self.message
