"""Several overlay networks, unit level: the `networks` config field, join strings and
hellos carrying a net-token, migration 2 of the store, and per-network pools and overlap checks."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from server_db import db_execute, write_v1_database

import ncctl

NET_TOKEN = "abcdefgh01234567"
PIN = "sha256:" + "ab" * 32


def server_doc(networks: object, **fields: object) -> dict:
    return {"mode": "server", "server": {"networks": networks, **fields}}


def load_server(networks: object, **fields: object) -> ncctl.ServerConfig:
    return ncctl.config_from_doc(server_doc(networks, **fields), "server.yml", "server", Path("/etc/nc"))


def config_error(networks: object, **fields: object) -> str:
    with pytest.raises(ncctl.ConfigError) as caught:
        load_server(networks, **fields)
    message = str(caught.value)
    assert message.startswith("server.yml: ") and "\n" not in message, message
    return message


# -- the networks field ---------------------------------------------------------------------------


def test_networks_field_loads_specs_with_interconnection_on_by_default() -> None:
    """A valid list becomes NetworkSpecs in order; interconnection defaults to true and can be turned off."""
    config = load_server(
        [{"name": "blue", "cidr": "10.2.0.1/24"}, {"name": "red-2", "cidr": "10.3.0.1/29", "interconnection": False}]
    )
    assert config.networks == [
        ncctl.NetworkSpec("blue", "10.2.0.1/24", True),
        ncctl.NetworkSpec("red-2", "10.3.0.1/29", False),
    ]
    assert config.networks[0].network == ipaddress.IPv4Network("10.2.0.0/24")
    assert ncctl.load_config(None, "server").networks == []


def test_adjacent_networks_do_not_count_as_overlapping() -> None:
    """Networks that touch but share no address are accepted, also right next to networkAddr."""
    config = load_server(
        [
            {"name": "a", "cidr": "10.1.0.1/24"},
            {"name": "b", "cidr": "10.1.2.1/24"},
            {"name": "c", "cidr": "10.1.3.1/29"},
            {"name": "d", "cidr": "10.1.3.9/29"},
        ]
    )
    assert [spec.name for spec in config.networks] == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    "name", ["", "Blue", "under_score", "with space", "-lead", "a" * 33, "default", 7, None, "blué"]
)
def test_bad_network_names_are_refused_naming_the_field(name: object) -> None:
    """Names outside 1-32 of a-z, 0-9, '-' (and the reserved 'default') are refused at networks[i].name."""
    message = config_error([{"name": "ok", "cidr": "10.2.0.1/24"}, {"name": name, "cidr": "10.3.0.1/24"}])
    assert "server.networks[1].name" in message, message


@pytest.mark.parametrize(
    ("cidr", "word"),
    [
        ("banana", "not an IPv4 CIDR"),
        ("fd00::1/64", "not an IPv4 CIDR"),
        ("10.2.0.1/33", "not an IPv4 CIDR"),
        ("10.2.0.1/31", "/31"),
        ("10.2.0.1/32", "/32"),
        ("10.0.0.1/7", "/7"),
        (None, "CIDR"),
        (["10.2.0.1/24"], "CIDR"),
    ],
)
def test_bad_cidrs_are_refused_naming_the_field(cidr: object, word: str) -> None:
    """A CIDR that is not IPv4, or has a prefix outside /8 to /30, is refused at networks[i].cidr."""
    message = config_error([{"name": "blue", "cidr": cidr}])
    assert "server.networks[0].cidr" in message and word in message, message


@pytest.mark.parametrize(
    ("networks", "fields", "words"),
    [
        ([{"name": "a", "cidr": "10.1.1.128/25"}], {}, ["a (10.1.1.128/25)", "'default' (10.1.1.0/24)"]),
        ([{"name": "a", "cidr": "10.0.0.1/8"}], {}, ["a (10.0.0.0/8)", "'default'"]),
        ([{"name": "a", "cidr": "10.7.3.1/24"}], {"networkAddr": "10.7.0.1/16"}, ["'default' (10.7.0.0/16)"]),
        (
            [{"name": "a", "cidr": "10.5.0.1/24"}, {"name": "b", "cidr": "10.5.0.129/25"}],
            {},
            ["b (10.5.0.128/25)", "'a' (10.5.0.0/24)"],
        ),
        (
            [
                {"name": "a", "cidr": "10.5.0.1/24"},
                {"name": "b", "cidr": "10.6.0.1/24"},
                {"name": "c", "cidr": "10.4.0.1/14"},
            ],
            {},
            ["c (10.4.0.0/14)", "'a'"],
        ),
    ],
)
def test_overlapping_networks_name_the_other_network(networks: list, fields: dict, words: list[str]) -> None:
    """A network overlapping networkAddr or an earlier listed network is refused naming that network."""
    message = config_error(networks, **fields)
    assert "server.networks" in message and "overlaps" in message, message
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"


def test_duplicate_network_names_are_refused() -> None:
    """The same name twice (even with disjoint CIDRs) is refused, naming it."""
    message = config_error([{"name": "a", "cidr": "10.5.0.1/24"}, {"name": "a", "cidr": "10.6.0.1/24"}])
    assert "'a'" in message and "twice" in message, message


@pytest.mark.parametrize(
    ("networks", "where"),
    [
        ({"name": "a", "cidr": "10.5.0.1/24"}, "server.networks: expected a list"),
        ("a", "server.networks: expected a list"),
        (["a"], "server.networks[0]: expected a map"),
        ([{"name": "a", "cidr": "10.5.0.1/24", "mtu": 1400}], "server.networks[0].mtu: unknown field"),
        ([{"name": "a", "cidr": "10.5.0.1/24", "interconnection": "yes"}], "server.networks[0].interconnection"),
    ],
)
def test_malformed_networks_field_is_refused_where_it_is_wrong(networks: object, where: str) -> None:
    """Not a list, an item that is not a map, unknown keys and a non-boolean interconnection are refused."""
    assert where in config_error(networks)


def test_server_yml_on_disk_with_overlap_fails_to_load(tmp_path: Path) -> None:
    """load_config of a real YAML file: the overlap error names the file and the other network."""
    path = tmp_path / "server.yml"
    path.write_text("mode: server\nserver:\n  networks:\n    - name: blue\n      cidr: 10.1.1.200/29\n")
    with pytest.raises(ncctl.ConfigError) as caught:
        ncctl.load_config(str(path), "server")
    assert str(caught.value).startswith(f"{path}: ") and "'default'" in str(caught.value)


@pytest.mark.parametrize("bad", ["short", "ABCDEFGH01234567", "abcdefgh0123456!", "abcdefgh012345678"])
def test_client_net_token_must_be_well_formed(bad: str) -> None:
    """client.netToken is 16 of [a-z0-9] or empty; anything else is a ConfigError naming netToken."""
    good = ncctl.config_from_doc(
        {"mode": "client", "client": {"netToken": NET_TOKEN}}, "client.yml", "client", Path("/etc")
    )
    assert good.net_token == NET_TOKEN
    with pytest.raises(ncctl.ConfigError, match=r"client\.netToken"):
        ncctl.config_from_doc({"mode": "client", "client": {"netToken": bad}}, "client.yml", "client", Path("/etc"))


def test_client_yaml_keeps_the_net_token(tmp_path: Path) -> None:
    """The client.yml a join writes carries netToken, and loading it gives the same value back."""
    config = ncctl.ClientConfig(server_addr="198.18.0.1", token="node0000node0000", net_token=NET_TOKEN)
    doc = yaml.safe_load(ncctl.client_yaml(config.resolve()))
    assert doc["client"]["netToken"] == NET_TOKEN
    assert ncctl.config_from_doc(doc, "client.yml", "client", tmp_path).net_token == NET_TOKEN


# -- join strings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "pin", "net"),
    [
        (f"abc123.0123456789abcdef@198.18.0.1:6439#{PIN},net={NET_TOKEN}", "198.18.0.1", PIN, NET_TOKEN),
        (f"abc123.0123456789abcdef@198.18.0.1:6439#{PIN}", "198.18.0.1", PIN, ""),
        ("abc123.0123456789abcdef@198.18.0.1:6439", "198.18.0.1", None, ""),
        (f"abc123.0123456789abcdef@[fd00::1]:6439#{PIN},net={NET_TOKEN}\n", "fd00::1", PIN, NET_TOKEN),
    ],
)
def test_parse_join_string_reads_the_net_token(text: str, host: str, pin: str | None, net: str) -> None:
    """,net=<net-token> after the pin lands in JoinTarget.net_token; without it the default network ('')."""
    target = ncctl.parse_join_string(text)
    assert (target.token, target.host, target.port) == ("abc123.0123456789abcdef", host, 6439)
    assert target.pin == pin and target.net_token == net


@pytest.mark.parametrize(
    "suffix",
    [",net=SHORT", f",net={NET_TOKEN}x", f",net={NET_TOKEN.upper()}", ",net=", f",nett={NET_TOKEN}", ",x"],
)
def test_parse_join_string_refuses_malformed_extras(suffix: str) -> None:
    """A malformed net-token or an unknown extra part is a UsageError quoting that part."""
    with pytest.raises(ncctl.UsageError, match="malformed part"):
        ncctl.parse_join_string(f"abc123.0123456789abcdef@198.18.0.1:6439#{PIN}{suffix}")


# -- hello ------------------------------------------------------------------------------------------


def hello_payload(frame: bytes) -> bytes:
    found = ncctl.next_frame(frame, 0, len(frame))
    assert found is not None and found[0] == ncctl.FRAME_HELLO and found[2] == len(frame)
    return frame[found[1] : found[2]]


def test_hello_carries_the_net_token_both_ways() -> None:
    """Hello with a net-token encodes it as netToken and decodes to an equal Hello."""
    hello = ncctl.Hello("node0000node0000", caps=(ncctl.CAP_GSO,), net_token=NET_TOKEN)  # "udp" needs a key share
    payload = hello_payload(hello.encode())
    assert ncctl.decode_control(payload)["netToken"] == NET_TOKEN
    assert ncctl.Hello.decode(payload) == hello


def test_hello_without_net_token_is_the_old_message() -> None:
    """No net-token: no netToken key on the wire (as older peers send), decoded as ''."""
    payload = hello_payload(ncctl.Hello("node0000node0000").encode())
    assert "netToken" not in ncctl.decode_control(payload)
    assert ncctl.Hello.decode(payload).net_token == ""


@pytest.mark.parametrize("value", [7, None, ["x"], "short", "ABCDEFGH01234567", NET_TOKEN + "0"])
def test_hello_with_a_malformed_net_token_is_a_protocol_error(value: object) -> None:
    """A netToken that is not a 16-character [a-z0-9] string fails decoding with ProtocolError."""
    message = {"proto": 1, "nodeToken": "node0000node0000", "caps": [], "netToken": value}
    payload = hello_payload(ncctl.encode_control(ncctl.FRAME_HELLO, message))
    with pytest.raises(ncctl.ProtocolError, match="net-token"):
        ncctl.Hello.decode(payload)


# -- store and pools --------------------------------------------------------------------------------


def test_store_migrates_a_version_1_database_keeping_every_binding(tmp_path: Path) -> None:
    """Store() on a schema-1 database: user_version becomes the latest, rows keep token, state and
    address in network 'default', nc_network exists, and bind_ip is unique per network."""
    path = tmp_path / "nc.db"
    legacy = {"aaaa1111bbbb2222": (-1, "10.1.1.2"), "cccc3333dddd4444": (3, "10.1.1.7"), "eeee5555ffff6666": (-1, "")}
    write_v1_database(path, legacy, "abc123.0123456789abcdef")
    store = ncctl.Store(str(path))
    try:
        assert store.schema_version() == len(ncctl.MIGRATIONS)
        rows = {row.token: row for row in store.nodes()}
        assert set(rows) == {*legacy, "reserverd"}
        for token, (state, ip) in legacy.items():
            assert (rows[token].state, rows[token].bind_ip, rows[token].network) == (state, ip, "default")
            assert not rows[token].pending, "a node that joined under an older build counts as heard from"
        assert [t.network for t in store.list_bootstrap_tokens()] == ["default"]
        assert store.networks() == []
    finally:
        store.close()
    assert [r[2] for r in db_execute(path, "PRAGMA index_info(network_mgr_bind_ip)")] == ["network", "bind_ip"]
    again = ncctl.Store(str(path))  # a second open migrates nothing more
    try:
        assert again.schema_version() == len(ncctl.MIGRATIONS) and len(again.nodes()) == len(legacy) + 1
    finally:
        again.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ncctl.Store]:
    the_store = ncctl.Store(str(tmp_path / "nc.db"))
    yield the_store
    the_store.close()


def admit(store: ncctl.Store, network: str, count: int, prefix: str) -> list[str]:
    """count nodes admitted to network through one never-expiring bootstrap token."""
    token = f"{prefix[:6]:0<6}.{network[:16]:0<16}"
    store.add_bootstrap_token(token, -1, False, network)
    tokens = [f"{prefix}{n:0>{16 - len(prefix)}}" for n in range(count)]
    for node in tokens:
        assert store.admit_node(token, node) == network
    return tokens


def test_bootstrap_token_for_an_unknown_network_is_refused(store: ncctl.Store) -> None:
    """add_bootstrap_token names the missing network and stores nothing."""
    with pytest.raises(ncctl.BadRequest, match="'nosuch'"):
        store.add_bootstrap_token("abc123.0123456789abcdef", 10, False, "nosuch")
    assert store.list_bootstrap_tokens() == []


def test_each_network_reclaims_only_its_own_longest_idle_address(store: ncctl.Store) -> None:
    """Two Bindings on one store: a full /29 evicts its own longest-idle node for a newcomer, never a
    default-network node, even one idle for longer."""
    overlays = ncctl.Overlays(store, ncctl.ServerConfig(networks=[ncctl.NetworkSpec("small", "10.9.0.1/29")]))
    default, small = overlays.get("default"), overlays.get("small")
    assert default is not None and small is not None and default.bindings is not small.bindings
    old = admit(store, "default", 3, "dflt")
    full = admit(store, "small", 5, "smll")
    default_ips = {t: default.bindings.claim(t) for t in old}
    small_ips = {t: small.bindings.claim(t) for t in full}
    assert all(ip in ipaddress.IPv4Network("10.1.1.0/24") for ip in default_ips.values())
    assert sorted(map(str, small_ips.values())) == [f"10.9.0.{i}" for i in range(2, 7)]
    for token in old:
        default.bindings.idle(token)
    for token in full:
        small.bindings.idle(token)
    (newcomer,) = admit(store, "small", 1, "late")
    assert small.bindings.claim(newcomer) == small_ips[full[0]]
    assert store.node(full[0]) is None
    for token, ip in default_ips.items():
        assert store.node(token) is not None and store.node(token).bind_ip == str(ip)
        assert default.bindings.claim(token) == ip


def test_runtime_network_overlaps_are_refused_naming_the_other(store: ncctl.Store) -> None:
    """Overlays.create refuses a CIDR overlapping any network (default, config, run time) and a taken name."""
    overlays = ncctl.Overlays(store, ncctl.ServerConfig(networks=[ncctl.NetworkSpec("red", "10.3.0.1/24")]))
    overlays.create(ncctl.NetworkSpec("blue", "10.2.0.1/24"))
    for cidr, other in [("10.1.0.1/16", "default"), ("10.3.0.9/29", "red"), ("10.2.0.0/23", "blue")]:
        with pytest.raises(ncctl.BadRequest, match=f"overlaps network '{other}'"):
            overlays.create(ncctl.NetworkSpec("x", cidr))
    with pytest.raises(ncctl.BadRequest, match="already exists"):
        overlays.create(ncctl.NetworkSpec("blue", "10.4.0.1/24"))
    assert sorted(o.name for o in overlays.all()) == ["blue", "default", "red"]
    assert sorted(r.name for r in store.networks()) == ["blue", "default", "red"]


def test_config_network_overlapping_a_runtime_one_stops_the_start(store: ncctl.Store) -> None:
    """At start, a server.yml network overlapping one made at run time is a ConfigError naming it;
    without the overlap the run-time network and its net-token stay."""
    first = ncctl.Overlays(store, ncctl.ServerConfig())
    blue = first.create(ncctl.NetworkSpec("blue", "10.2.0.1/24"))
    with pytest.raises(ncctl.ConfigError, match="overlaps network 'blue'"):
        ncctl.Overlays(store, ncctl.ServerConfig(networks=[ncctl.NetworkSpec("red", "10.2.0.1/16")]))
    later = ncctl.Overlays(store, ncctl.ServerConfig(networks=[ncctl.NetworkSpec("red", "10.3.0.1/24")]))
    kept = later.get("blue")
    assert kept is not None and kept.net_token == blue.net_token and not kept.from_config
    assert later.get("red") is not None and later.get("red").from_config
    assert len({o.net_token for o in later.all()}) == 3
    assert len({o.tun_name for o in later.all()}) == 3 and later.get("default").tun_name == "ncsrv0"


def test_network_dropped_from_server_yml_stays_as_a_runtime_network(store: ncctl.Store) -> None:
    """A server.yml network removed from the file keeps its net-token and becomes deletable (run time)."""
    first = ncctl.Overlays(store, ncctl.ServerConfig(networks=[ncctl.NetworkSpec("red", "10.3.0.1/24")]))
    red = first.get("red")
    assert red is not None and red.from_config
    later = ncctl.Overlays(store, ncctl.ServerConfig())
    kept = later.get("red")
    assert kept is not None and not kept.from_config and kept.net_token == red.net_token


def test_network_addr_moved_onto_a_runtime_network_stops_the_start(store: ncctl.Store) -> None:
    """A new networkAddr overlapping a network made at run time is a ConfigError naming that network."""
    ncctl.Overlays(store, ncctl.ServerConfig()).create(ncctl.NetworkSpec("blue", "10.2.0.1/24"))
    with pytest.raises(ncctl.ConfigError, match=r"network default .* overlaps network 'blue'"):
        ncctl.Overlays(store, ncctl.ServerConfig(network_addr="10.2.0.1/16"))
