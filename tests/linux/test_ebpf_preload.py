"""The eBPF source's maps opened or loaded in a thread of their own, begun at the top of the daemon's start
before it reads the ledger (gateway/sources/ebpf.py ``MapsLoad``, ``EbpfSource.preload``;
gateway/daemon/gateway.py ``Gateway.start``), and its failure paths:

* a start that fails after that thread loaded and pinned the program (here: the ledger's load) unpins what it
  loaded and leaves no thread behind; maps an earlier run pinned (reopened) keep their pins;
* the load's own error reaches the operator as the start's ConfigError, the same text as a load made in
  ``begin`` itself, with nothing pinned.

In this process's network namespace, with nothing attached and no nft table: the start here fails before the
kernel's enforcer is made, and ``begin`` runs against a stand-in of the daemon (root: bpffs, BPF loads).
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import ext
from ext.bpfmaps import Maps
from ext.errors import ConfigError, TollgateError
from gateway.config import load_config
from gateway.daemon import Gateway, RunOptions
from gateway.lab import lab_config
from gateway.sources.ebpf import EbpfSource, MapsLoad

PIN = f"/sys/fs/bpf/tollgate-test-preload-{os.getpid()}"


@pytest.fixture
def pin():
    Maps.unpin(PIN)
    yield PIN
    Maps.unpin(PIN)


def load_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "tollgate-ebpf-load"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gateway(tmp_path) -> Gateway:
    config = tmp_path / "tollgate.toml"
    config.write_text(lab_config(3))
    return Gateway(RunOptions(str(config), str(tmp_path / "ledger.db"), listen="127.0.0.1", port=free_port(),
                              source="ebpf", source_options={"pin_dir": PIN, "interfaces": "lo",
                                                             "max_slots": "64"}))


@pytest.mark.parametrize("pinned_before", [False, True], ids=["loaded", "reopened"])
def test_a_start_that_fails_after_the_background_load_undoes_it(pin, tmp_path, monkeypatch, pinned_before):
    if pinned_before:  # an earlier run's pins: a restart reopens them, and a failed one keeps them
        Maps.load(PIN, max_slots=64, n_zones=3, default_zone=1).close()
    gw = gateway(tmp_path)
    seen = {}

    def failing_load(self):
        load = self.source_preload
        assert isinstance(load, MapsLoad)  # begun before the ledger is read
        load.wait()
        seen.update(loaded=load.loaded, pinned=Path(PIN).exists())
        raise TollgateError("the ledger went away")

    monkeypatch.setattr(Gateway, "load_from_ledger", failing_load)
    try:
        with pytest.raises(TollgateError, match="went away"):
            gw.start()
    finally:
        gw.http_socket.close()
        gw.ledger.close()
    assert seen == {"loaded": not pinned_before, "pinned": True}  # the thread had loaded (or reopened) them
    assert Path(PIN).exists() == pinned_before, "a failed start left what it loaded pinned"
    assert not load_threads(), "a failed start left the load's thread behind"


def stand_in(config, engine):
    return SimpleNamespace(config=config, acct=SimpleNamespace(engine=engine, subscribers={}),
                           engine_lock=threading.Lock())


def test_the_loads_error_reaches_the_operator_as_before(pin, tmp_path):
    garbage = tmp_path / "garbage.bpf.o"
    garbage.write_bytes(b"\x7fELF not a BPF object at all" + bytes(200))
    (tmp_path / "tollgate.toml").write_text(lab_config(3))
    config = load_config(str(tmp_path / "tollgate.toml"))
    engine = ext.EnginePy(len(config.zones), 1, default_zone=1)
    options = {"pin_dir": PIN, "interfaces": "lo", "object": str(garbage)}
    said = []
    for preload in (True, False):  # begun before the ledger (the daemon's start), or in begin itself
        load = EbpfSource.preload(engine, config, **options) if preload else None
        assert (load is not None) == preload
        src = EbpfSource(engine, lambda events: None, **options, preload=load)
        with pytest.raises(ConfigError) as err:
            src.begin(stand_in(config, engine))
        said.append(str(err.value))
        assert not Path(PIN).exists()
        assert not load_threads()
    assert said[0] == said[1]
    assert "--source ebpf" in said[0] and "cannot open" in said[0] and "--source nfqueue" in said[0], said[0]


def test_no_preload_where_the_start_stops_before_any_load(pin, tmp_path):
    """An interface that is not here, or a bad option: nothing is loaded early; begin (or the constructor)
    says why, as before."""
    (tmp_path / "tollgate.toml").write_text(lab_config(3))
    config = load_config(str(tmp_path / "tollgate.toml"))
    engine = ext.EnginePy(len(config.zones), 1, default_zone=1)
    assert EbpfSource.preload(engine, config, pin_dir=PIN, interfaces="tgnosuch0") is None
    assert EbpfSource.preload(engine, config, pin_dir=PIN, interfaces="lo", interval="99") is None
    assert not Path(PIN).exists() and not load_threads()


def test_pinned_program_ids_are_the_pinned_programs(pin):
    """What the attach and the heartbeat compare tc's filters with (policy/bpf.py), read from the programs'
    pins alone (a Maps.open there mapped the counters a second time: the start's peak at a million)."""
    from ext.bpfmaps import BpfError, pinned_program_ids

    with pytest.raises(BpfError, match="no program"):
        pinned_program_ids(PIN)
    Maps.load(PIN, max_slots=64, n_zones=3, default_zone=1).close()
    with Maps.open(PIN) as maps:
        ids = []
        for direction in (0, 1):
            with open(f"/proc/self/fdinfo/{maps.prog_fd(direction)}") as f:
                ids.append(next(int(line.split()[1]) for line in f if line.startswith("prog_id:")))
    assert pinned_program_ids(PIN) == tuple(ids) and ids[0] != ids[1]
