"""The compiled engine is the one in use, and its constants are the twin's."""

from __future__ import annotations

import os

import pytest

import ext
import ext.errors
from ext import constants


def test_compiled_engine_is_loaded_unless_asked_not_to():
    # the guard: CI must not pass by silently running only the fallback
    if os.environ.get("TOLLGATE_NO_EXT", "") not in ("", "0"):
        assert ext.Engine is ext.EnginePy
        return
    assert ext.EngineC is not None, f"ext.engine is not built: {ext.EXT_IMPORT_ERROR}"
    assert ext.Engine is ext.EngineC
    assert ext.Engine.implementation == "c"


def test_constants_agree():
    from ext import engine

    for name, value in engine.CONSTANTS.items():
        if name == "MAX_EVENTS_PER_PACKET":
            # two subscribers per packet, each one block or every warning level
            assert value >= 2 * max(1, constants.MAX_WARN_LEVELS)
            continue
        assert getattr(constants, name) == value, name


@pytest.mark.parametrize("name", ["c", "py"])
def test_engine_class_by_name(name):
    assert ext.engine_class(name).implementation == name


def test_unknown_engine_name_is_a_clear_error():
    with pytest.raises(ext.errors.TollgateError, match="not available"):
        ext.engine_class("rust")
