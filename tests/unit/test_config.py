"""Config: server.yml / client.yml loading, validation messages, embedded defaults. (The CLI's
one-line exit 2 for a bad config runs ./nc: e2e/test_startup_errors_e2e.py.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import ncctl

ROOT = Path(ncctl.__file__).resolve().parent


def write(tmp_path: Path, text: str, name: str = "nc.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- valid documents -----------------------------------------------------------


def test_no_path_gives_resolved_embedded_defaults() -> None:
    """load_config(None) is the dataclass defaults with derived paths filled from workDir."""
    server = ncctl.load_config(None, "server")
    assert server == ncctl.ServerConfig().resolve()
    assert (server.grpc_port, server.bootstrap_port, server.port) == (6440, 6439, 6441)
    assert server.network_addr == "10.1.1.1/24" and server.mtu == 1400
    assert server.db_path == "/var/lib/nc/nc.db"
    assert server.grpc_cert_dir == "/var/lib/nc/tls/grpc"
    assert server.log_dir == "/var/lib/nc/logs"
    client = ncctl.load_config(None, "client")
    assert client == ncctl.ClientConfig().resolve()
    assert client.network_cert_dir == "/var/lib/nc-client/tls/network"


@pytest.mark.parametrize("text", ["", "mode: server\n", "mode: server\nserver:\n", "server: {}\n"])
def test_empty_or_partial_documents_take_defaults(tmp_path: Path, text: str) -> None:
    """Every field is optional: an empty file or an empty map is the embedded defaults."""
    assert ncctl.load_config(str(write(tmp_path, text)), "server") == ncctl.ServerConfig().resolve()


def test_camel_case_fields_land_in_the_config(tmp_path: Path) -> None:
    """The original camelCase names set the matching attributes; null means default."""
    path = write(
        tmp_path,
        "mode: server\nserver:\n  grpcPort: 7440\n  bootstrapPort: 7439\n  port: 7441\n"
        "  networkAddr: 10.9.0.1/16\n  workDir: /srv/nc\n  debug: true\n  mtu: 1300\n  ip: 198.18.0.9\n"
        "  interconnection: false\n  keepalive: null\n  sourcePrefix6: 56\n",
    )
    config = ncctl.load_config(str(path), "server")
    assert (config.grpc_port, config.bootstrap_port, config.port) == (7440, 7439, 7441)
    assert config.network_addr == "10.9.0.1/16" and config.mtu == 1300 and config.debug is True
    assert config.ip == "198.18.0.9" and config.interconnection is False
    assert config.keepalive == ncctl.ServerConfig().keepalive and config.source_prefix6 == 56
    assert config.db_path == "/srv/nc/nc.db" and config.tls_dir == "/srv/nc/tls"
    assert str(config.server_overlay_ip) == "10.9.0.1"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    """config_from_doc resolves a relative workDir against the file's directory (base)."""
    doc = {"mode": "client", "client": {"workDir": "node-a", "token": "reserverd"}}
    config = ncctl.config_from_doc(doc, str(tmp_path / "client.yml"), "client", tmp_path)
    assert config.work_dir == str(tmp_path / "node-a")
    assert config.network_cert_dir == str(tmp_path / "node-a" / "tls" / "network")


@pytest.mark.parametrize("server_addr", ["198.18.0.1", "2001:2::1"])
def test_client_yaml_round_trips(tmp_path: Path, server_addr: str) -> None:
    """The client.yml a join writes loads back to the same config, for either address family."""
    config = ncctl.ClientConfig(
        server_addr=server_addr, token="abcdefghij012345", work_dir=str(tmp_path / "n")
    ).resolve()
    path = write(tmp_path, ncctl.client_yaml(config), "client.yml")
    assert ncctl.load_config(str(path), "client") == config


# -- shipped files --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "mode", "cls"), [("server.yml", "server", "ServerConfig"), ("client.yml", "client", "ClientConfig")]
)
def test_shipped_files_equal_embedded_defaults(name: str, mode: str, cls: str) -> None:
    """server.yml / client.yml at the repo top exist, load, list every field, and equal the defaults."""
    path = ROOT / name
    assert path.is_file(), f"{path} is missing: the repository must ship {name}"
    defaults = getattr(ncctl, cls)()
    assert ncctl.load_config(str(path), mode) == defaults.resolve()
    doc = yaml.safe_load(path.read_text())
    assert doc["mode"] == mode
    assert set(doc[mode]) == {ncctl.camel(f.name) for f in dataclasses.fields(defaults)}


# -- invalid documents ------------------------------------------------------------

BAD_SERVER = [
    ("unknown field", {"server": {"grpcport": 6440}}, "server.grpcport"),
    ("unknown top-level", {"mode": "server", "servr": {}}, "servr"),
    ("port type", {"server": {"grpcPort": "6440x"}}, "server.grpcPort"),
    ("port float", {"server": {"port": 6441.5}}, "server.port"),
    ("bool as port", {"server": {"bootstrapPort": True}}, "server.bootstrapPort"),
    ("bool type", {"server": {"debug": "yes"}}, "server.debug"),
    ("string type", {"server": {"workDir": ["/a"]}}, "server.workDir"),
    ("port too big", {"server": {"grpcPort": 70000}}, "server.grpcPort"),
    ("port zero", {"server": {"bootstrapPort": 0}}, "server.bootstrapPort"),
    ("port negative", {"server": {"port": -1}}, "server.port"),
    ("cidr garbage", {"server": {"networkAddr": "ten.one/24"}}, "server.networkAddr"),
    ("cidr prefix", {"server": {"networkAddr": "10.1.1.1/33"}}, "server.networkAddr"),
    ("cidr ipv6", {"server": {"networkAddr": "fd00::1/64"}}, "server.networkAddr"),
    ("cidr tiny", {"server": {"networkAddr": "10.1.1.1/31"}}, "server.networkAddr"),
    ("cidr loopback", {"server": {"networkAddr": "127.1.0.1/16"}}, "server.networkAddr"),
    ("cidr link-local", {"server": {"networkAddr": "169.254.0.1/16"}}, "server.networkAddr"),
    ("network multicast", {"server": {"networks": [{"name": "m", "cidr": "239.1.0.1/16"}]}}, "networks[0].cidr"),
    ("bad ip", {"server": {"ip": "198.18.0.300"}}, "server.ip"),
    ("mtu", {"server": {"mtu": 100}}, "server.mtu"),
    ("bad mode", {"mode": "client", "server": {}}, "mode"),
    ("mode typo", {"mode": "sever"}, "mode"),
    ("section not a map", {"server": ["a"]}, "server"),
    ("same ports", {"server": {"grpcPort": 6441}}, "grpcPort"),
    ("metrics address", {"server": {"metricsAddr": "9441"}}, "server.metricsAddr"),
    ("source prefix too short", {"server": {"sourcePrefix6": 16}}, "server.sourcePrefix6"),
    ("source prefix too long", {"server": {"sourcePrefix6": 129}}, "server.sourcePrefix6"),
    ("source prefix text", {"server": {"sourcePrefix6": "/64"}}, "server.sourcePrefix6"),
]

BAD_CLIENT = [
    ("unknown field", {"client": {"serverIp": "198.18.0.1"}}, "client.serverIp"),
    ("port type", {"client": {"port": "x"}}, "client.port"),
    ("port range", {"client": {"port": 65536}}, "client.port"),
    ("bool type", {"client": {"redirectGateway": 1}}, "client.redirectGateway"),
    ("token", {"client": {"token": "not-a-token"}}, "client.token"),
    ("server neither ip nor name", {"client": {"serverAddr": "nc example!"}}, "client.serverAddr"),
    ("bad mode", {"mode": "server", "client": {}}, "mode"),
]


BAD_DOCS = [("server", *case) for case in BAD_SERVER] + [("client", *case) for case in BAD_CLIENT]


@pytest.mark.parametrize(("mode", "label", "doc", "field"), BAD_DOCS, ids=[f"{c[0]}-{c[1]}" for c in BAD_DOCS])
def test_bad_doc_names_file_and_field(tmp_path: Path, mode: str, label: str, doc: dict, field: str) -> None:
    """config_from_doc refuses the document with a one-line ConfigError (exit 2) naming the file and the field."""
    path = str(tmp_path / f"{mode}.yml")
    with pytest.raises(ncctl.ConfigError) as info:
        ncctl.config_from_doc(doc, path, mode, tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert field in message.removeprefix(f"{path}: "), message
    assert "\n" not in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("mode: server\nserver:\n  port: 99999\n", "server.port"),
        ("mode: server\nserver:\n  mtu: big\n", "server.mtu"),
        ("mode: server\nserver: [\n", "YAML"),
        ("- a list\n- not a map\n", "mapping"),
    ],
)
def test_load_config_file_errors(tmp_path: Path, text: str, needle: str) -> None:
    """load_config reports problems in a real file with its path."""
    path = write(tmp_path, text, "server.yml")
    with pytest.raises(ncctl.ConfigError) as info:
        ncctl.load_config(str(path), "server")
    assert str(path) in str(info.value) and needle in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A --config that does not exist is a ConfigError naming it, not an OSError."""
    path = tmp_path / "absent.yml"
    with pytest.raises(ncctl.ConfigError, match=r"absent\.yml"):
        ncctl.load_config(str(path), "server")


# -- the one duration parser ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1s", 1), ("90m", 5400), (" 12h ", 43200), ("30d", 2592000), ("7300d", ncctl.MAX_DURATION_S), (45, 45)],
)
def test_a_duration_is_text_with_a_unit_or_whole_seconds(value: object, seconds: int) -> None:
    assert ncctl.parse_duration(value, "x") == seconds
    assert ncctl.parse_duration(ncctl.format_duration(seconds), "x") == seconds


@pytest.mark.parametrize("error", [ncctl.ConfigError, ncctl.UsageError, ncctl.BadRequest])
@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("soon", "'soon' is not a duration; write it like 30s, 90m, 12h or 365d"),
        ("5", "'5' is not a duration"),  # text needs a unit; only a YAML or gRPC number is seconds
        ("-5s", "is not a duration"),
        ("1y", "is not a duration"),
        (True, "True is not a duration"),
        ("0s", "'0s' is out of range; use 1s to 7300d"),
        (0, "0 is out of range; use 1s to 7300d"),
        ("7301d", "'7301d' is out of range; use 1s to 7300d"),
        ("9" * 30 + "d", "is out of range"),  # refused here, not overflowing a store's date
    ],
)
def test_a_bad_duration_is_one_sentence_naming_where(error: type[ncctl.NcError], value: object, says: str) -> None:
    """Every caller (server.yml, --idle-for, the control plane) gets the same sentence, as
    its own error class, starting with the field or flag."""
    with pytest.raises(error) as raised:
        ncctl.parse_duration(value, "where", error=error)
    assert type(raised.value) is error
    assert str(raised.value).startswith("where: ") and says in str(raised.value)


def test_the_shortest_duration_is_the_callers() -> None:
    assert ncctl.parse_duration("10s", "nodeCertLife", shortest=10) == 10
    with pytest.raises(ncctl.ConfigError, match="'9s' is out of range; use 10s to 7300d"):
        ncctl.parse_duration("9s", "nodeCertLife", shortest=10)


def test_node_cert_life_in_server_yml_goes_through_it(tmp_path: Path) -> None:
    path = write(tmp_path, "mode: server\nserver:\n  nodeCertLife: 12h\n")
    assert ncctl.load_config(str(path), "server").node_cert_life == 43200
    path = write(tmp_path, "mode: server\nserver:\n  nodeCertLife: 3s\n")
    with pytest.raises(ncctl.ConfigError, match=r"server\.nodeCertLife: '3s' is out of range; use 10s to 7300d"):
        ncctl.load_config(str(path), "server")


@pytest.mark.parametrize(
    ("text", "minutes"), [("10", 10), ("-1", -1), ("0", 0), ("90m", 90), ("12h", 720), ("30d", 43200), ("120s", 2)]
)
def test_token_life_is_minutes_or_a_duration(text: str, minutes: int) -> None:
    """`--life` keeps the original's whole minutes (0 and negatives are the server's to
    judge) and takes a duration too."""
    assert ncctl.token_life_minutes(text) == minutes


@pytest.mark.parametrize(("text", "says"), [("soon", "is not a duration"), ("90s", "not whole minutes")])
def test_a_bad_token_life_is_a_usage_error_naming_the_flag(text: str, says: str) -> None:
    with pytest.raises(ncctl.UsageError, match=f"^--life: '{text}' .*{says}"):
        ncctl.token_life_minutes(text)


@pytest.mark.parametrize(
    ("field", "text", "kept"),
    [
        ("keepalive", "10", 10),  # seconds, as it always was
        ("keepalive", "1m", 60),
        ("nodeTokenMaxLife", "60", 60),  # minutes, as the original's token lives
        ("nodeTokenMaxLife", "2h", 120),
        ("nodeCertLife", "7d", 7 * 86400),
    ],
)
def test_every_duration_field_takes_one_syntax(tmp_path: Path, field: str, text: str, kept: int) -> None:
    """One duration syntax for every field; a bare number keeps the unit the field had."""
    path = write(tmp_path, f"mode: server\nserver:\n  {field}: {text}\n")
    config = ncctl.load_config(str(path), "server")
    assert (
        getattr(
            config, {"keepalive": "keepalive", "nodeTokenMaxLife": "node_token_max_life"}.get(field, "node_cert_life")
        )
        == kept
    )


def test_a_minutes_field_refuses_seconds_it_cannot_keep(tmp_path: Path) -> None:
    path = write(tmp_path, "mode: server\nserver:\n  nodeTokenMaxLife: 90s\n")
    with pytest.raises(ncctl.ConfigError, match=r"server\.nodeTokenMaxLife: '90s' is not whole minutes"):
        ncctl.load_config(str(path), "server")


@pytest.mark.parametrize(
    ("said", "name"),
    [
        ("edge-01", "edge-01"),
        ("Edge_01.example.com", "edge-01"),
        ("--x--", "x"),
        ("ünï", "n"),
        ("", ""),
        ("a" * 80, "a" * 63),
    ],
)
def test_a_node_name_comes_from_what_a_node_says(said: str, name: str) -> None:
    assert ncctl.node_name_from(said) == name


def test_a_clashing_name_gets_the_first_free_suffix() -> None:
    assert ncctl.free_node_name("edge", {"edge", "edge-2"}) == "edge-3"
    assert ncctl.free_node_name("a" * 16, set()) == "a" * 16 + "-2"  # not readable as a node-token
    assert len(ncctl.free_node_name("x" * 63, {"x" * 63})) <= 63


@pytest.mark.parametrize(
    ("mode", "key", "hint"),
    [
        ("server", "grpcport", "did you mean grpcPort?"),
        ("server", "netwrokAddr", "did you mean networkAddr?"),
        ("client", "serverIp", "did you mean serverAddr?"),
        ("client", "transprot", "did you mean transport?"),
    ],
)
def test_an_unknown_field_names_the_closest_known_one(tmp_path: Path, mode: str, key: str, hint: str) -> None:
    with pytest.raises(ncctl.ConfigError) as info:
        ncctl.config_from_doc({mode: {key: 1}}, "f.yml", mode, tmp_path)
    assert str(info.value) == f"f.yml: {mode}.{key}: unknown field; {hint}"


def test_a_field_like_none_still_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ncctl.ConfigError) as info:
        ncctl.config_from_doc({"client": {"zzz": 1}}, "f.yml", "client", tmp_path)
    assert "known fields are debug, directPaths, grpcPort" in str(info.value)
