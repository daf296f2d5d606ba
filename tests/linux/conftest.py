"""Fixtures for tests that need root: a lab of network namespaces per test
module (unique prefix), torn down whatever happens."""

from __future__ import annotations

import os
import shutil

import pytest

if os.geteuid() != 0:
    pytest.skip("tests/linux need root (network namespaces)", allow_module_level=True)
for tool in ("ip", "nft", "iptables-nft", "iperf3", "curl", "ping"):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: run `make system-deps`", pytrace=False)


@pytest.fixture(scope="module")
def lab(request):
    from gateway.lab import lab_down, lab_up

    prefix = "t" + request.module.__name__.split(".")[-1][-6:].replace("_", "")
    lab_down(prefix)
    lab = lab_up(4, prefix)
    yield lab
    lab_down(prefix)
