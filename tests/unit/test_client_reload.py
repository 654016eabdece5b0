"""What SIGHUP does to a running client's configuration: debug, transport and the
replica list applied, everything else named as needing a restart, a bad file ignored."""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import ncctl


def client_file(path: Path, **fields: object) -> str:
    body = {"serverAddr": "198.18.0.1", "workDir": str(path.parent), **fields}
    path.write_text(yaml.safe_dump({"mode": "client", "client": body}))
    return str(path)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[ncctl.ClientConfig, ncctl.ServerFollower, str]]:
    """A client's configuration as loaded at start, its follower and its file; the level
    of nc's logger, which a reload of `debug` sets, is put back afterwards."""
    path = client_file(tmp_path / "client.yml")
    config = ncctl.load_config(path, "client")
    level = logging.getLogger("nc").level
    yield config, ncctl.ServerFollower(config.server_addr, config.port, collections.Counter()), path
    logging.getLogger("nc").setLevel(level)


def test_debug_transport_and_replicas_apply_the_rest_waits_for_a_restart(
    running: tuple[ncctl.ClientConfig, ncctl.ServerFollower, str], caplog: pytest.LogCaptureFixture
) -> None:
    config, follower, path = running
    client_file(Path(path), debug=True, transport="tcp", mtu=1300, serverAddr=["198.18.0.2", "198.18.0.3"])
    with caplog.at_level(logging.INFO, logger="nc"):
        assert ncctl.reload_client_config(config, path, follower, connected=True) is True
    assert (config.debug, config.transport, config.mtu) == (True, "tcp", ncctl.DEFAULT_MTU)
    assert follower.servers == ["198.18.0.2", "198.18.0.3"] and follower.server == "198.18.0.1"
    assert follower.follow() and follower.server == "198.18.0.2", "the next connect goes to a listed replica"
    lines = [r.getMessage() for r in caplog.records if "SIGHUP" in r.getMessage()]
    assert lines == [f"SIGHUP: re-read {path}; applied: serverAddr, debug, transport; needs a restart: mtu"]


def test_a_bad_or_empty_file_keeps_the_running_configuration(
    running: tuple[ncctl.ClientConfig, ncctl.ServerFollower, str], caplog: pytest.LogCaptureFixture
) -> None:
    config, follower, path = running
    before = ncctl.ClientConfig(**vars(config))
    Path(path).write_text("mode: client\nclient:\n  transport: [\n")
    assert ncctl.reload_client_config(config, path, follower, connected=False) is False
    client_file(Path(path), serverAddr="", transport="tcp")
    assert ncctl.reload_client_config(config, path, follower, connected=False) is False
    assert config == before and follower.servers == ["198.18.0.1"]
    assert sum("the running configuration stays" in r.getMessage() for r in caplog.records) == 2


def test_nothing_changed_says_so(
    running: tuple[ncctl.ClientConfig, ncctl.ServerFollower, str], caplog: pytest.LogCaptureFixture
) -> None:
    config, follower, path = running
    with caplog.at_level(logging.INFO, logger="nc"):
        assert ncctl.reload_client_config(config, path, follower, connected=True) is False
    assert "applied: nothing changed; needs a restart: nothing" in caplog.text
