"""The hot path: per-packet accounting and enforcement.

``Engine`` is the fastest implementation available: the compiled
``ext.engine.EngineC`` unless the extension is not built or
``TOLLGATE_NO_EXT=1`` asks for the pure-Python twin ``EnginePy``. Both have the
same interface and, by contract, the same results (see ``ext/engine_py.py``).
"""

from __future__ import annotations

import os

from .batch import PacketBatch
from .engine_py import CounterRow, EnginePy, EngineStats, Event, SubscriberState, ZoneRule

try:
    from .engine import EngineC
except ImportError as exc:  # not built: the twin serves, and says so
    EngineC = None
    EXT_IMPORT_ERROR: str | None = str(exc)
else:
    EXT_IMPORT_ERROR = None

USE_EXT = os.environ.get("TOLLGATE_NO_EXT", "") in ("", "0") and EngineC is not None
Engine = EngineC if USE_EXT else EnginePy

ENGINES = {"py": EnginePy}
if EngineC is not None:
    ENGINES["c"] = EngineC


def engine_class(name: str | None = None):
    """The engine called ``name`` ("c" or "py"); None picks the default."""
    if name is None:
        return Engine
    if name not in ENGINES:
        from .errors import TollgateError

        why = f" (not built: {EXT_IMPORT_ERROR})" if name == "c" and EXT_IMPORT_ERROR else ""
        raise TollgateError(f"engine {name!r} is not available{why}")
    return ENGINES[name]


__all__ = ["Engine", "EngineC", "EnginePy", "PacketBatch", "Event", "ZoneRule", "CounterRow",
           "SubscriberState", "EngineStats", "engine_class", "USE_EXT"]
