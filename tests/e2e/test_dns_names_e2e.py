"""DNS names instead of addresses: server.ip, the join string's host and the node's
serverAddr, resolved through each namespace's own /etc/netns/<ns>/hosts (which
`ip netns exec` mounts over /etc/hosts), and again at each connect."""

from __future__ import annotations

from pathlib import Path

import yaml
from control_helpers import one_error_line
from dns_helpers import NAME, name_server
from netlab import Lab, start_client, start_server
from overlay_helpers import assert_reaches, change_underlay, wait_connected


def test_a_node_joins_and_follows_a_server_known_by_name(lab: Lab, hosts_files: dict[str, Path]) -> None:
    server_host = lab.add_host("server")
    node = lab.add_host("node")
    for host in (server_host, node):
        name_server(host, server_host.ip, hosts_files)
    server = start_server(server_host, ip=NAME)
    join = server.join_string()
    assert join.split("@")[1].startswith(f"{NAME}:6439#"), join
    client = start_client(node, join)
    wait_connected(server, client)
    assert_reaches(node, "10.1.1.1")
    assert yaml.safe_load(client.config.read_text())["client"]["serverAddr"] == NAME

    # The server restarts on another address; the name follows it, and the running node,
    # resolving again at each connect, finds it there.
    server.process.stop()
    change_underlay(server_host, "198.18.0.77")
    for host in (server_host, node):
        name_server(host, "198.18.0.77", hosts_files)
    server.start()
    wait_connected(server, client, timeout=60)
    assert_reaches(node, "10.1.1.1")
    assert client.process.alive()


def test_an_unknown_name_is_one_line(lab: Lab, hosts_files: dict[str, Path]) -> None:
    node = lab.add_host("node")
    name_server(node, "198.18.0.1", hosts_files)
    join = f"abcdef.0123456789abcdef@no-such-host.lab.test:6439#sha256:{'0' * 64}"
    done = node.nc("adm", "join", join, "--work-dir", str(lab.dir / "w"), check=False)
    assert "no-such-host.lab.test" in one_error_line(done)
