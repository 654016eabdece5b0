"""Fixtures of the unit layer: what several sections' tests build the same way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_member import LocalEtcd

import ncctl


@pytest.fixture
def control(tmp_path: Path) -> Iterator[ncctl.ControlPlane]:
    """A control plane on a real sqlite store and real certificates: the default network
    and edge-b, nodes mint at most two tokens an hour."""
    config = ncctl.ServerConfig(
        work_dir=str(tmp_path), networks=[ncctl.NetworkSpec("edge-b", "10.2.0.1/24")], node_mint_rate=2
    ).resolve()
    store = ncctl.Store(config.db_path)
    pki = ncctl.Pki(config)
    admin = pki.ensure(("198.18.0.1",))
    ncctl.ensure_reserved(store, str(config.server_overlay_ip), admin)
    plane = ncctl.ControlPlane(config, store, pki, ncctl.Overlays(store, config), "198.18.0.1")
    try:
        yield plane
    finally:
        store.close()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """One real etcd member on loopback for the layer; each test keeps to its own key prefix."""
    member = LocalEtcd(tmp_path_factory.mktemp("etcd"))
    try:
        yield member
    finally:
        member.stop()
