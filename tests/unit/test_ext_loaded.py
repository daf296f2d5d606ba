"""The guard: a test run must not pass by silently using only the fallback.

Unless ``TOLLGATE_NO_EXT=1`` asks for the pure-Python twin, the compiled
engine must be importable and be the one ``ext.Engine`` names. A CI job that
forgot to build the extension fails here, loudly, with the import error.
"""

from __future__ import annotations

import os

import ext


def test_compiled_engine_is_loaded_unless_asked_not_to():
    if os.environ.get("TOLLGATE_NO_EXT", "") not in ("", "0"):
        assert ext.Engine is ext.EnginePy
        return
    assert ext.EngineC is not None, f"ext.engine is not built: {ext.EXT_IMPORT_ERROR}"
    assert ext.Engine is ext.EngineC
    assert ext.Engine.implementation == "c"
    assert ext.engine_class() is ext.EngineC


def test_compiled_engine_comes_from_a_compiled_module():
    if os.environ.get("TOLLGATE_NO_EXT", "") not in ("", "0"):
        return
    from ext import engine

    # a stray engine.py shadowing the extension would pass the test above
    assert engine.__file__.endswith(".so"), engine.__file__
