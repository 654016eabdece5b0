"""Replica pieces without a network: join strings and client.yml with several
replicas, the optional WELCOME and ERROR keys, the sealed PKI, and how a node
picks the next replica to try."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import yaml

import ncctl

PIN = "sha256:" + "ab" * 32
TOKEN = "abc123.0123456789abcdef"


def test_join_string_lists_replicas_and_old_ones_still_parse() -> None:
    target = ncctl.parse_join_string(f"{TOKEN}@198.18.0.1:6439,198.18.0.2:6439,[2001:2::3]:7000#{PIN}")
    assert (target.host, target.port) == ("198.18.0.1", 6439)
    assert target.others == (("198.18.0.2", 6439), ("2001:2::3", 7000))
    assert [t.address for t in target.alternatives()] == ["198.18.0.1:6439", "198.18.0.2:6439", "[2001:2::3]:7000"]
    assert target.hosts == ["198.18.0.1", "198.18.0.2", "2001:2::3"]
    old = ncctl.parse_join_string(f"{TOKEN}@198.18.0.1:6439#{PIN}")
    assert old.others == () and old.alternatives() == [old]


@pytest.mark.parametrize("addresses", ["198.18.0.1:6439,", "198.18.0.1:6439,no_host!:1", "198.18.0.1:6439,1.2.3.4:0"])
def test_join_string_with_a_bad_replica_address_is_refused(addresses: str) -> None:
    with pytest.raises(ncctl.UsageError, match="is not <ip or name>:<port>"):
        ncctl.parse_join_string(f"{TOKEN}@{addresses}#{PIN}")


def test_a_join_string_lists_at_most_sixteen_replicas() -> None:
    sixteen = ",".join(f"198.18.0.{n}:6439" for n in range(1, 17))
    assert len(ncctl.parse_join_string(f"{TOKEN}@{sixteen}#{PIN}").alternatives()) == 16
    crowd = ",".join(f"198.18.{n // 250}.{n % 250 + 1}:6439" for n in range(10_000))
    with pytest.raises(ncctl.UsageError) as info:
        ncctl.parse_join_string(f"{TOKEN}@{crowd}#{PIN}")
    message = str(info.value)
    assert "10000" in message and "16" in message and "\n" not in message and len(message) < 200, message


def write(path: Path, body: dict) -> str:
    path.write_text(yaml.safe_dump(body))
    return str(path)


def test_client_yml_server_addr_may_be_a_list(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yml", {"mode": "client", "client": {"serverAddr": ["198.18.0.1", "198.18.0.2"]}})
    config = ncctl.load_config(path, "client")
    assert ncctl.server_addresses(config.server_addr) == ["198.18.0.1", "198.18.0.2"]
    written = yaml.safe_load(ncctl.client_yaml(config))["client"]["serverAddr"]
    assert written == ["198.18.0.1", "198.18.0.2"]
    single = ncctl.ClientConfig(server_addr="198.18.0.1")
    assert yaml.safe_load(ncctl.client_yaml(single))["client"]["serverAddr"] == "198.18.0.1"
    bad = write(tmp_path / "b.yml", {"mode": "client", "client": {"serverAddr": ["198.18.0.1", "not a name!"]}})
    with pytest.raises(ncctl.ConfigError, match="serverAddr"):
        ncctl.load_config(bad, "client")


def test_replicas_need_a_cluster_token(tmp_path: Path) -> None:
    body = {"mode": "server", "server": {"datastoreEndpoint": "http://198.18.0.1:2379", "datastoreCAFile": "ca.pem"}}
    with pytest.raises(ncctl.ConfigError, match="clusterToken"):
        ncctl.load_config(write(tmp_path / "s.yml", body), "server")
    body["server"]["clusterToken"] = "x" * 16
    config = ncctl.load_config(write(tmp_path / "s.yml", body), "server")
    assert config.datastore_ca_file == str(tmp_path / "ca.pem")


def test_welcome_carries_replicas_optionally() -> None:
    base = ncctl.Welcome("10.1.1.2", 24, "10.1.1.1", 1400, 10, ("10.1.1.0/24",), ())
    assert b"replicas" not in base.encode()  # a single server's welcome is unchanged
    assert ncctl.Welcome.decode(base.encode()[4:]).replicas == ()
    with_replicas = ncctl.Welcome("10.1.1.2", 24, "10.1.1.1", 1400, 10, (), (), ("198.18.0.1", "198.18.0.2"))
    assert ncctl.Welcome.decode(with_replicas.encode()[4:]).replicas == ("198.18.0.1", "198.18.0.2")
    for junk in (["not-an-ip"], "198.18.0.1", [1, 2], ["198.18.0.1"] * 40):
        message = {"ip": "10.1.1.2", "prefix": 24, "serverIp": "10.1.1.1", "mtu": 1400, "replicas": junk}
        payload = ncctl.encode_control(ncctl.FRAME_WELCOME, message)[4:]
        assert ncctl.Welcome.decode(payload).replicas in ((), ("198.18.0.1",))


def test_refusal_names_the_leader_optionally() -> None:
    plain = ncctl.Refusal("overlay-full", "full", True)
    assert b"leader" not in plain.encode()
    standby = ncctl.Refusal("standby", "the leader is 198.18.0.2", True, "198.18.0.2")
    assert ncctl.Refusal.decode(standby.encode()[4:]) == standby
    bogus = ncctl.encode_control(ncctl.FRAME_ERROR, {"code": "standby", "reason": "r", "leader": "evil; rm"})
    assert ncctl.Refusal.decode(bogus[4:]).leader == ""


def test_sealed_pki_opens_only_with_the_cluster_token() -> None:
    blob = ncctl.seal("the-right-cluster-token", "gRPC", b"ca key")
    assert ncctl.unseal("the-right-cluster-token", "gRPC", blob) == b"ca key"
    with pytest.raises(ncctl.ConfigError, match="clusterToken"):
        ncctl.unseal("another-cluster-token!", "gRPC", blob)
    with pytest.raises(ncctl.ConfigError):
        ncctl.unseal("the-right-cluster-token", "network", blob)  # bound to its name


def follower(servers: list[str]) -> ncctl.ServerFollower:
    """The client's replica choice, without sockets or threads."""
    return ncctl.ServerFollower(",".join(servers), 6441, collections.Counter())


def test_a_node_tries_the_named_leader_first_then_the_others() -> None:
    client = follower(["198.18.0.1", "198.18.0.2", "198.18.0.3"])
    client.leader_hint = "198.18.0.3"
    assert client.follow() and client.server == "198.18.0.3"
    assert client.follow() and client.server == "198.18.0.1"  # no hint: the next one
    client.leader_hint = "198.18.0.9"  # a leader added after the join
    assert client.follow() and client.server == "198.18.0.9" and "198.18.0.9" in client.servers
    single = follower(["198.18.0.1"])
    assert not single.follow() and single.server == "198.18.0.1"  # one server: the old backoff
