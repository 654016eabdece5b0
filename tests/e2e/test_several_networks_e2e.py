"""Several networks, end to end with the real ./nc in namespaces: several isolated overlay
networks on one server, chosen by net-token. Pings stay inside a network (also
with gateway mode's ip_forward on), each network has its own pool and LRU, wrong
net-tokens and bad network definitions are refused in one clear line, deleting a
network cuts its nodes off, and a schema-version-1 database upgrades in place."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from control_helpers import one_error_line
from cryptography import x509
from netlab import Host, Lab, NcClient, NcServer, start_client, start_server, wait_for
from overlay_helpers import (
    DEFAULT_CIDR,
    DEFAULT_SERVER_IP,
    NET_TOKEN_RE,
    assert_all_lost,
    assert_reaches,
    create_network,
    icmp_sources,
    in_cidr,
    links,
    networks,
    nodes,
    route_into_tunnel,
    saved_net_token,
    server_tun_with,
    set_net_token,
    spawn_tcpdump,
    start_clients,
    wait_connected,
    wait_exit,
    wait_state,
)
from server_db import db_execute, db_script, write_v1_database

import ncctl

BOOTSTRAP = "198.18.0.1:6439"


@dataclass
class TwoNetworks:
    """A server with the default network and one more, two connected nodes in each."""

    server_host: Host
    server: NcServer
    other: dict  # the second network as `nc adm network list -o json` shows it
    default_clients: list[NcClient]
    other_clients: list[NcClient]


def two_networks(lab: Lab, name: str, cidr: str, runtime: bool, **server_fields: object) -> TwoNetworks:
    """The second network comes from `nc adm network create` (runtime) or from server.yml."""
    server_host = lab.add_host("server")
    if runtime:
        server = start_server(server_host, **server_fields)
        create_network(server, name, cidr)
    else:
        server = start_server(server_host, networks=[{"name": name, "cidr": cidr}], **server_fields)
    other = networks(server)[name]
    default_join = server.join_string()
    other_join = server.join_string("--net", name)
    assert ",net=" not in default_join and ",net=" not in server.join_string("--net", "default"), default_join
    assert other_join.endswith(f",net={other['netToken']}"), other_join
    clients = start_clients(lab, [("d1", default_join), ("d2", default_join), ("o1", other_join), ("o2", other_join)])
    for client in clients:
        wait_connected(server, client)
    return TwoNetworks(server_host, server, other, clients[:2], clients[2:])


def assert_isolated(nets: TwoNetworks) -> None:
    """Inside each network every node reaches every other node and its server address (and the
    server reaches each node); a node sending into its tunnel toward the other network's nodes
    or server address gets no answer, and the target's nc0 never sees those packets."""
    other_cidr, other_server_ip = nets.other["cidr"], nets.other["serverIp"]
    groups = [(nets.default_clients, DEFAULT_SERVER_IP), (nets.other_clients, other_server_ip)]
    for client in nets.default_clients:
        route_into_tunnel(client.host, other_cidr)
    for client in nets.other_clients:
        route_into_tunnel(client.host, DEFAULT_CIDR)
    everyone = nets.default_clients + nets.other_clients
    ips = {client.host.name: client.overlay_ip() for client in everyone}
    captures = {c.host.name: spawn_tcpdump(c.host, "nc0", f"tcpdump-{c.host.name}") for c in everyone}
    for clients, server_ip in groups:
        for client in clients:
            assert_reaches(client.host, server_ip)
            assert_reaches(nets.server_host, ips[client.host.name])
        for a, b in itertools.permutations(clients, 2):
            assert_reaches(a.host, ips[b.host.name])
    probes = []
    for (mine, _), (theirs, their_server_ip) in itertools.permutations(groups, 2):
        for client in mine:
            probes.append((client.host, their_server_ip))
            probes += [(client.host, ips[target.host.name]) for target in theirs]
    assert_all_lost(probes)
    time.sleep(0.5)  # let tcpdump print what it saw last
    for clients, _ in groups:
        for client in clients:
            seen = icmp_sources(captures[client.host.name])
            peers = {ips[c.host.name] for c in clients if c is not client}
            strangers = {ip for ip in ips.values() if ip not in peers and ip != ips[client.host.name]}
            assert peers <= seen, f"{client.host.name}'s capture missed its own network's pings: {seen}"
            assert not seen & strangers, f"{client.host.name} received pings from another network: {seen & strangers}"


# -- isolation -----------------------------------------------------------------------------------


def test_two_networks_talk_inside_and_never_across(lab: Lab) -> None:
    """Default network plus one made by `network create`, two nodes each: pings inside each network work,
    pings into the other network's nodes and server address are lost; list/JSON views agree."""
    nets = two_networks(lab, "blue", "10.2.0.1/24", runtime=True)
    listed = networks(nets.server)
    assert set(listed) == {"default", "blue"}
    assert listed["default"]["cidr"] == DEFAULT_CIDR and listed["default"]["serverIp"] == DEFAULT_SERVER_IP
    assert listed["default"]["fromConfig"] is True and listed["blue"]["fromConfig"] is False
    assert (listed["blue"]["cidr"], listed["blue"]["serverIp"]) == ("10.2.0.0/24", "10.2.0.1")
    assert listed["default"]["nodes"] == 2 and listed["blue"]["nodes"] == 2
    assert listed["default"]["netToken"] != listed["blue"]["netToken"]
    for client in nets.default_clients:
        assert saved_net_token(client) == "" and in_cidr(client.overlay_ip(), DEFAULT_CIDR)
    for client in nets.other_clients:
        assert saved_net_token(client) == listed["blue"]["netToken"] and in_cidr(client.overlay_ip(), "10.2.0.0/24")
    by_token = nodes(nets.server)
    assert {by_token[c.token()]["network"] for c in nets.default_clients} == {"default"}
    assert {by_token[c.token()]["network"] for c in nets.other_clients} == {"blue"}
    assert server_tun_with(nets.server_host, DEFAULT_SERVER_IP) == "ncsrv0"
    blue_tun = server_tun_with(nets.server_host, "10.2.0.1")
    assert blue_tun and blue_tun.startswith("ncsrv") and blue_tun != "ncsrv0", blue_tun
    assert_isolated(nets)


def test_gateway_mode_forwards_out_but_never_between_networks(lab: Lab) -> None:
    """gateway=true (ip_forward on) with a network from server.yml: a node reaches a non-overlay address
    behind the server, yet nodes still cannot reach the other network's nodes or server address."""
    nets = two_networks(lab, "red", "10.3.0.1/24", runtime=False, gateway=True)
    assert nets.server_host.run("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    assert nets.other["fromConfig"] is True and nets.other["cidr"] == "10.3.0.0/24"
    # A host outside every overlay, reached through the tunnel only: the server must forward it (NAT).
    outside = lab.add_host("outside")
    capture = spawn_tcpdump(outside, "eth0", "tcpdump-outside")
    for client in nets.default_clients + nets.other_clients:
        route_into_tunnel(client.host, f"{outside.ip}/32")
        assert_reaches(client.host, outside.ip)
    time.sleep(0.5)
    assert icmp_sources(capture) == {nets.server_host.ip}, "gateway traffic did not leave NATed to the server"
    assert_isolated(nets)


def test_network_without_interconnection_reaches_only_the_server(lab: Lab) -> None:
    """`network create --no-interconnection`: its nodes ping their server address and the server pings
    them, but the nodes do not reach each other."""
    server_host = lab.add_host("server")
    server = start_server(server_host)
    created = create_network(server, "solo", "10.4.0.1/24", "--no-interconnection")
    assert created["interconnection"] is False and networks(server)["solo"]["interconnection"] is False
    join = server.join_string("--net", "solo")
    a, b = start_clients(lab, [("s1", join), ("s2", join)])
    ips = [wait_connected(server, a), wait_connected(server, b)]
    for client, ip in zip((a, b), ips):
        assert_reaches(client.host, "10.4.0.1")
        assert_reaches(server_host, ip)
    assert_all_lost([(a.host, ips[1]), (b.host, ips[0])])


# -- pools ------------------------------------------------------------------------------------------


def test_full_29_network_reclaims_its_own_longest_idle_address(lab: Lab) -> None:
    """A /29 network filled with 5 idle nodes: a 6th node takes the longest-idle one's address (that node
    is unregistered), while the default network's nodes, idle even longer, keep theirs and stay registered."""
    server_host = lab.add_host("server")
    server = start_server(server_host)
    create_network(server, "small", "10.9.0.1/29")
    default_join, small_join = server.join_string(), server.join_string("--net", "small")
    clients = start_clients(
        lab, [("d1", default_join), ("d2", default_join)] + [(f"s{i}", small_join) for i in range(1, 6)]
    )
    defaults, small = clients[:2], clients[2:]
    ips = {client.token(): wait_connected(server, client) for client in clients}
    assert sorted(ips[c.token()] for c in small) == [f"10.9.0.{i}" for i in range(2, 7)]
    assert networks(server)["small"]["nodes"] == 5
    # Idle order: the default nodes first (globally the oldest), then s1, then the other four.
    for group in (defaults, small[:1], small[1:]):
        for client in group:
            assert client.process.stop() == 0, client.process.log()
        for client in group:
            wait_state(server, client.token(), -1)
        time.sleep(1.2)  # update_time has one-second resolution
    newcomer = start_client(lab.add_host("s6"), small_join)
    assert wait_connected(server, newcomer) == ips[small[0].token()]
    after = nodes(server)
    assert small[0].token() not in after, "the node that lost its address is still registered"
    for client in defaults + small[1:]:
        row = after.get(client.token())
        assert row is not None, f"{client.host.name} was unregistered"
        assert row["bindIp"] == ips[client.token()], (client.host.name, row)
    assert {after[c.token()]["network"] for c in defaults} == {"default"}
    assert networks(server)["small"]["nodes"] == 5 and networks(server)["default"]["nodes"] == 2
    small[0].restart()
    assert wait_exit(small[0].process) != 0
    assert "no registered node" in small[0].process.log()
    defaults[0].restart()
    assert wait_connected(server, defaults[0]) == ips[defaults[0].token()]


# -- net-tokens -------------------------------------------------------------------------------------


def test_wrong_net_tokens_are_refused_naming_the_net_token(lab: Lab) -> None:
    """A node presenting another network's net-token, an unknown one or none (outside the default network)
    is refused: the client exits non-zero saying net-token. The right net-token still works afterwards."""
    server_host = lab.add_host("server")
    server = start_server(server_host)
    blue = create_network(server, "blue", "10.2.0.1/24")
    default_token = networks(server)["default"]["netToken"]
    node_b, node_d = start_clients(lab, [("b1", server.join_string("--net", "blue")), ("d1", server.join_string())])
    ip_b, ip_d = wait_connected(server, node_b), wait_connected(server, node_d)
    for client in (node_b, node_d):
        assert client.process.stop() == 0
    unknown = "zz" + blue["netToken"][2:] if not blue["netToken"].startswith("zz") else "aa" + blue["netToken"][2:]
    cases = [(node_b, default_token), (node_b, unknown), (node_b, ""), (node_d, blue["netToken"])]
    for client, wrong in cases:
        set_net_token(client, wrong)
        client.restart()
        code = wait_exit(client.process)
        log = client.process.log()
        assert code != 0, f"{client.host.name} with netToken {wrong!r} was admitted:\n{log}"
        assert "net-token" in log and "Traceback" not in log, log
        assert not client.host.has_link("nc0")
    set_net_token(node_b, "NOT-A-TOKEN")
    node_b.restart()
    assert wait_exit(node_b.process) == 2
    assert "netToken" in node_b.process.log()
    set_net_token(node_b, blue["netToken"])
    set_net_token(node_d, "")
    node_b.restart()
    node_d.restart()
    assert wait_connected(server, node_b) == ip_b
    assert wait_connected(server, node_d) == ip_d
    assert_reaches(node_b.host, "10.2.0.1")


def test_join_string_with_an_unknown_net_token_does_not_connect(lab: Lab) -> None:
    """A blue join string whose ,net= part names no network: the client ends non-zero saying net-token
    and the server never binds an address to it."""
    server = start_server(lab.add_host("server"))
    blue = create_network(server, "blue", "10.2.0.1/24")
    join = server.join_string("--net", "blue")
    forged = join.replace(f",net={blue['netToken']}", ",net=0000000000000000")
    assert forged != join
    client = start_client(lab.add_host("b1"), forged, wait=False)
    assert wait_exit(client.process) != 0
    assert "net-token" in client.process.log()
    assert not client.host.has_link("nc0")
    blue_rows = [n for n in nodes(server).values() if n["network"] == "blue"]
    assert all(n["bindIp"] == "" and n["connState"] == -1 for n in blue_rows), blue_rows


# -- refusals -----------------------------------------------------------------------------------------


def test_admin_network_errors_are_one_clear_line(lab: Lab) -> None:
    """Overlapping CIDRs name the other network; duplicate and bad names, bad CIDRs, `token create --net`
    of an unknown network and deleting a busy, the default or a config network fail in one line, changing nothing."""
    server_host = lab.add_host("server")
    server = start_server(server_host, networks=[{"name": "red", "cidr": "10.3.0.1/24"}])
    create_network(server, "blue", "10.2.0.1/24")
    node = lab.add_host("node")
    joined = node.nc("adm", "join", server.join_string("--net", "blue"), "--work-dir", str(lab.dir / "b1"))
    before = networks(server)
    tuns = {name for name in links(server_host) if name.startswith("ncsrv")}
    assert len(tuns) == 3, tuns
    cases = [
        (("network", "create", "--name", "x", "--cidr", "10.1.0.1/16"), ["'default'", "overlaps"]),
        (("network", "create", "--name", "x", "--cidr", "10.3.0.129/25"), ["'red'", "overlaps"]),
        (("network", "create", "--name", "x", "--cidr", "10.2.0.0/23"), ["'blue'", "overlaps"]),
        (("network", "create", "--name", "blue", "--cidr", "10.5.0.1/24"), ["'blue'", "already exists"]),
        (("network", "create", "--name", "Bad_Name", "--cidr", "10.5.0.1/24"), ["Bad_Name", "name"]),
        (("network", "create", "--name", "default", "--cidr", "10.5.0.1/24"), ["default"]),
        (("network", "create", "--name", "x", "--cidr", "10.5.0.1/31"), ["/31"]),
        (("network", "create", "--name", "x", "--cidr", "banana"), ["banana", "CIDR"]),
        (("token", "create", "--net", "unknown"), ["'unknown'", "network"]),
        (("network", "delete", "--name", "blue"), ["blue", "1 node", "--force"]),
        (("network", "delete", "--name", "default"), ["default", "cannot be deleted"]),
        (("network", "delete", "--name", "red"), ["red", "config"]),
        (("network", "delete", "--name", "nosuch"), ["'nosuch'"]),
    ]
    for args, words in cases:
        line = one_error_line(server.adm(*args, check=False))
        for word in words:
            assert word in line, f"{args}: {word!r} missing from {line!r}"
    assert networks(server) == before
    assert nodes(server)[joined.stdout.strip()]["network"] == "blue"
    assert {name for name in links(server_host) if name.startswith("ncsrv")} == tuns
    assert server.adm("token", "list", "-o", "json").stdout.count('"network": "blue"') == 1


def test_overlapping_networks_in_server_yml_stop_the_server_in_one_line(lab: Lab) -> None:
    """server.yml networks overlapping the default network or each other, or listed twice: `nc server`
    exits 2 with one line naming the other network, and creates no TUN."""
    host = lab.add_host("server")
    cases = [
        ({"networks": [{"name": "a", "cidr": "10.1.0.1/16"}]}, ["networks", "'default'"]),
        ({"networkAddr": "10.7.0.1/16", "networks": [{"name": "a", "cidr": "10.7.3.1/24"}]}, ["'default'"]),
        (
            {"networks": [{"name": "a", "cidr": "10.5.0.1/24"}, {"name": "b", "cidr": "10.5.0.129/25"}]},
            ["networks", "b", "'a'"],
        ),
        (
            {"networks": [{"name": "a", "cidr": "10.5.0.1/24"}, {"name": "a", "cidr": "10.6.0.1/24"}]},
            ["'a'", "twice"],
        ),
        ({"networks": [{"name": "a", "cidr": "10.5.0.1/33"}]}, ["networks[0].cidr"]),
    ]
    for n, (fields, words) in enumerate(cases):
        config = lab.dir / f"bad-{n}.yml"
        config.write_text(json.dumps({"mode": "server", "server": {"workDir": str(lab.dir / f"w{n}"), **fields}}))
        done = host.nc("server", "--config", str(config), check=False, timeout=30)
        assert done.returncode == 2, (fields, done.returncode, done.stderr)
        line = one_error_line(done)
        assert str(config) in line, line
        for word in words:
            assert word in line, f"{fields}: {word!r} missing from {line!r}"
        assert not [name for name in links(host) if name.startswith("ncsrv")]


def test_runtime_network_survives_restart_and_blocks_an_overlapping_config(lab: Lab) -> None:
    """A network made at run time outlives a server restart with its net-token, and its node gets its
    address back; a server.yml network overlapping it stops the server (exit 2, one line naming it)."""
    server_host = lab.add_host("server")
    server = start_server(server_host, keepalive=1)
    blue = create_network(server, "blue", "10.2.0.1/24")
    (node,) = start_clients(lab, [("b1", server.join_string("--net", "blue"))])
    ip = wait_connected(server, node)
    assert server.process.stop() == 0
    body = json.loads(server.config.read_text())
    body["server"]["networks"] = [{"name": "red", "cidr": "10.2.0.1/16"}]
    server.config.write_text(json.dumps(body))
    done = server_host.nc("server", "--config", str(server.config), check=False, timeout=30)
    assert done.returncode == 2, done.stderr
    line = one_error_line(done)
    assert "'blue'" in line and "red" in line, line
    body["server"]["networks"] = [{"name": "red", "cidr": "10.3.0.1/24"}]
    server.config.write_text(json.dumps(body))
    server.start()
    listed = networks(server)
    assert listed["blue"]["netToken"] == blue["netToken"] and listed["blue"]["fromConfig"] is False
    assert listed["red"]["fromConfig"] is True and listed["red"]["cidr"] == "10.3.0.0/24"
    assert wait_connected(server, node, timeout=40) == ip
    assert_reaches(node.host, "10.2.0.1")
    assert server_tun_with(server_host, "10.3.0.1") is not None


def test_delete_force_cuts_the_nodes_off_and_removes_the_tun(lab: Lab) -> None:
    """`network delete --force` unregisters the network's nodes (their clients exit non-zero), removes its TUN,
    tokens and listing, leaves the default network's node connected, and the name can be made again."""
    server_host = lab.add_host("server")
    server = start_server(server_host)
    blue = create_network(server, "blue", "10.2.0.1/24")
    blue_join = server.join_string("--net", "blue")
    clients = start_clients(lab, [("b1", blue_join), ("b2", blue_join), ("d1", server.join_string())])
    for client in clients:
        wait_connected(server, client)
    b1, b2, d1 = clients
    tun = server_tun_with(server_host, "10.2.0.1")
    assert tun and tun != "ncsrv0"
    assert networks(server)["blue"]["nodes"] == 2
    deleted = json.loads(server.adm("network", "delete", "--name", "blue", "--force", "-o", "json").stdout)
    assert deleted["name"] == "blue" and deleted["deleted"] is True
    assert set(deleted["unregistered"]) == {b1.token(), b2.token()}
    for client in (b1, b2):
        assert wait_exit(client.process) != 0, client.process.log()
        assert "deleted" in client.process.log()
    wait_for(lambda: tun not in links(server_host), timeout=10, what=f"{tun} to leave the server namespace")
    assert server_tun_with(server_host, "10.2.0.1") is None
    assert set(networks(server)) == {"default"}
    listed = nodes(server)
    assert b1.token() not in listed and b2.token() not in listed
    assert listed[d1.token()]["connState"] == 3
    assert_reaches(d1.host, DEFAULT_SERVER_IP)
    late = lab.add_host("late")
    one_error_line(late.nc("adm", "join", blue_join, "--work-dir", str(lab.dir / "late"), check=False))
    b1.restart()
    assert wait_exit(b1.process) != 0
    again = server.adm("network", "create", "--name", "blue", "--cidr", "10.2.0.1/24").stdout.strip()
    assert NET_TOKEN_RE.match(again) and again != blue["netToken"] and networks(server)["blue"]["netToken"] == again
    assert server_tun_with(server_host, "10.2.0.1") is not None
    fresh = start_client(lab.add_host("b3"), server.join_string("--net", "blue"))
    assert in_cidr(wait_connected(server, fresh), "10.2.0.0/24") and saved_net_token(fresh) == again
    assert_reaches(fresh.host, "10.2.0.1")
    assert server.process.alive()


# -- the store --------------------------------------------------------------------------------------------


def test_schema_version_1_database_upgrades_in_place(lab: Lab) -> None:
    """A database as nc left it at schema version 1: the server migrates it to the latest version, every node
    keeps its token and address in network 'default', and its old bootstrap token still admits a node."""
    legacy = {
        "aaaa1111bbbb2222": (-1, "10.1.1.2"),
        "cccc3333dddd4444": (-1, "10.1.1.3"),
        "eeee5555ffff6666": (3, "10.1.1.5"),
        "gggg7777hhhh8888": (-1, ""),
    }
    bootstrap_token = "abc123.0123456789abcdef"
    path = lab.dir / "legacy" / "nc.db"
    write_v1_database(path, legacy, bootstrap_token)
    assert db_execute(path, "PRAGMA user_version") == [(1,)]
    server_host = lab.add_host("server")
    server = start_server(server_host, dbPath=str(path))
    assert db_execute(path, "PRAGMA user_version") == [(len(ncctl.MIGRATIONS),)]
    assert [r[2] for r in db_execute(path, "PRAGMA index_info(network_mgr_bind_ip)")] == ["network", "bind_ip"]
    listed = nodes(server)
    assert set(listed) == {*legacy, "reserverd"}
    for token, (_, ip) in legacy.items():
        assert listed[token]["bindIp"] == ip and listed[token]["network"] == "default", listed[token]
        assert listed[token]["connState"] == -1  # nothing is connected after a start
    assert listed["reserverd"]["bindIp"] == DEFAULT_SERVER_IP and listed["reserverd"]["network"] == "default"
    default = networks(server)["default"]
    assert default["nodes"] == len(legacy) and NET_TOKEN_RE.match(default["netToken"])
    assert (server.work_dir / "tls" / "grpc" / "ca.crt").is_file()
    pin = ncctl.spki_pin(x509.load_pem_x509_certificate((server.work_dir / "tls" / "grpc" / "ca.crt").read_bytes()))
    client = start_client(lab.add_host("node"), f"{bootstrap_token}@{BOOTSTRAP}#{pin}")
    ip = wait_connected(server, client)
    assert in_cidr(ip, DEFAULT_CIDR) and ip not in {DEFAULT_SERVER_IP, *(v[1] for v in legacy.values())}
    assert_reaches(client.host, DEFAULT_SERVER_IP)
    assert nodes(server)[client.token()]["network"] == "default"


def _schema_shape(path: Path) -> dict[str, object]:
    """Columns of both design tables and the indexes on network_mgr, as sqlite reports them."""
    shape: dict[str, object] = {}
    for table in ("network_mgr", "token_mgr"):
        shape[table] = [(r[1], r[2], r[3], r[4]) for r in db_execute(path, f"PRAGMA table_info({table})")]
    indexes = db_execute(path, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'network_mgr'")
    shape["indexes"] = {
        name: [r[2] for r in db_execute(path, f"PRAGMA index_info({name})")]
        for (name,) in indexes
        if not name.startswith("sqlite_")
    }
    shape["tables"] = sorted(r[0] for r in db_execute(path, "SELECT name FROM sqlite_master WHERE type = 'table'"))
    return shape


def test_real_nodes_keep_their_addresses_across_the_upgrade_from_version_1(lab: Lab) -> None:
    """Connected nodes; the server stops; its database is taken back to exactly the version-1 shape; the
    restarted server upgrades it and every node reconnects with its old address."""
    server_host = lab.add_host("server")
    server = start_server(server_host, keepalive=1)
    join = server.join_string()
    clients = start_clients(lab, [("n1", join), ("n2", join)])
    ips = {client.token(): wait_connected(server, client) for client in clients}
    assert server.process.stop() == 0
    path = server.work_dir / "nc.db"
    statements = [  # undo migration 6, 5, 4, 3, then migration 2
        "ALTER TABLE network_mgr DROP COLUMN join_token",
        "DROP INDEX network_mgr_name",
        "ALTER TABLE network_mgr DROP COLUMN name",
        *(f"ALTER TABLE network_mgr DROP COLUMN {c}" for c in ("host_name", "endpoint", "transport", "node_version")),
        "ALTER TABLE network_mgr DROP COLUMN last_seen",
        "DROP TABLE nc_cert",
        "DROP TABLE nc_legacy_node",
        "DROP TABLE nc_mint",
        "ALTER TABLE network_mgr DROP COLUMN minted_by",
        "ALTER TABLE token_mgr DROP COLUMN minted_by",
        "DROP INDEX network_mgr_bind_ip",
        "ALTER TABLE network_mgr DROP COLUMN network",
        "ALTER TABLE token_mgr DROP COLUMN network",
        "DROP TABLE nc_network",
        "CREATE UNIQUE INDEX IF NOT EXISTS network_mgr_bind_ip ON network_mgr(bind_ip) WHERE bind_ip != ''",
        "PRAGMA user_version = 1",
    ]
    db_script(path, statements)
    reference = lab.dir / "reference-v1.db"
    write_v1_database(reference, {}, "abc123.0123456789abcdef")
    assert _schema_shape(path) == _schema_shape(reference)
    assert db_execute(path, "PRAGMA user_version") == [(1,)]
    server.start()
    assert db_execute(path, "PRAGMA user_version") == [(len(ncctl.MIGRATIONS),)]
    for client in clients:
        assert wait_connected(server, client, timeout=40) == ips[client.token()]
        assert nodes(server)[client.token()]["network"] == "default"
    wait_for(lambda: all(nodes(server)[c.token()]["name"] for c in clients), what="the nodes named at their hello")
    assert_reaches(clients[0].host, ips[clients[1].token()])
