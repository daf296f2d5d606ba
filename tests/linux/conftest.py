"""Fixtures for tests that need root: a lab of network namespaces per test
module, under a prefix unique to the module and the run, torn down whatever
happens."""

from __future__ import annotations

import os
import shutil

import pytest

if os.geteuid() != 0:
    pytest.skip("tests/linux need root (network namespaces)", allow_module_level=True)
for tool in ("ip", "nft", "iptables-nft", "ip6tables-nft", "iperf3", "curl", "ping", "ss", "conntrack"):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: run `make system-deps`", pytrace=False)


def lab_prefix(module: str) -> str:
    """``t`` + 5 letters of the module + 3 digits of the pid: two runs at
    once (two helpers, CI and a developer) never share namespaces."""
    letters = "".join(c for c in module.split(".")[-1].removeprefix("test_") if c.isalnum())
    return f"t{letters[:5].lower()}{os.getpid() % 1000:03d}"


@pytest.fixture(scope="module")
def lab(request):
    from gateway.lab import lab_down, lab_up

    prefix = lab_prefix(request.module.__name__)
    lab_down(prefix)
    lab = lab_up(4, prefix)
    try:
        yield lab
    finally:
        lab_down(prefix)


@pytest.fixture(scope="module")
def cluster(request):
    """A cluster lab (gateway.lab.cluster_up: 3 gateways, 2 subscribers each, the shared subscriber x
    on g1 and g2) per test module, under the module's prefix; torn down whatever happens."""
    from gateway.lab import cluster_down, cluster_up

    prefix = lab_prefix(request.module.__name__)
    cluster_down(prefix)
    cluster = cluster_up(3, 2, prefix)
    try:
        yield cluster
    finally:
        cluster_down(prefix)


@pytest.fixture
def pg_gateways(cluster, tmp_path, pg_cluster):
    """``start(balances)``: one new database, and ``tollgate run`` on every gateway of the cluster
    (one after another: the first seeds the ledger from its config, the others find the subscribers
    there), each with its own config (all subscribers) and log. Stopped and their kernel state
    removed after the test."""
    import uuid

    from gateway.lab import cluster_config
    from lablib import Gateway, netns

    gws = []

    def start(balances=None, **config) -> list:
        db = pg_cluster.create_database(f"cluster_{uuid.uuid4().hex[:12]}")
        for g in cluster.gateways:
            work = tmp_path / f"g{g.k}"
            work.mkdir(exist_ok=True)
            gw = Gateway(g.ns, work, cluster_config(cluster, g.k, balances or {}, **config))
            gw.db = db
            gws.append(gw)
            gw.start()
        return gws

    yield start
    for gw in gws:
        gw.stop()
    for g in cluster.gateways:
        netns(g.ns, "sh", "-c", "nft delete table inet tollgate; iptables-nft -F FORWARD; ip6tables-nft -F FORWARD")
