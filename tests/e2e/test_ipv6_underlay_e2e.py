"""An IPv6 underlay: the server advertises an IPv6 address (server.ip), nodes that have
no IPv4 underlay at all join, connect and carry IPv4 overlay traffic over it, and a
full-tunnel node keeps its tunnel up."""

from __future__ import annotations

from netlab import Lab, start_client, start_server
from overlay_helpers import SERVER_OVERLAY_IP, assert_reaches, network_peers, ping_counts, wait_connected


def test_nodes_without_ipv4_join_and_talk_over_an_ipv6_underlay(lab: Lab) -> None:
    """Join (bootstrap gRPC), control and data plane all run over IPv6; the overlay is
    reachable both ways, and the server sees its peers by their IPv6 addresses."""
    server_host = lab.add_host("server")
    server_ip6 = server_host.use_ipv6_underlay(keep_ipv4=True)
    nodes = [lab.add_host("node1"), lab.add_host("node2")]
    node_ips = {node.use_ipv6_underlay() for node in nodes}
    server = start_server(server_host, ip=server_ip6, keepalive=2)
    join = server.join_string()
    assert f"@[{server_ip6}]:" in join, join

    clients = [start_client(node, join) for node in nodes]
    for client in clients:
        wait_connected(server, client)
    assert network_peers(server_host) == node_ips
    first, second = clients
    assert ping_counts(first.host, second.overlay_ip(), count=5) == (5, 5)
    assert ping_counts(second.host, SERVER_OVERLAY_IP, count=5) == (5, 5)
    assert_reaches(server_host, first.overlay_ip())
    for client in clients:
        assert "Traceback" not in client.process.log(), client.process.log()
        assert client.process.stop() == 0
    assert "Traceback" not in server.process.log()


def test_full_tunnel_over_an_ipv6_underlay_needs_no_host_route(lab: Lab) -> None:
    """With redirectGateway and an IPv6 server address the client adds only the two IPv4
    halves (no /32 exception: IPv4 routes cannot capture the IPv6 tunnel), the tunnel
    stays up, and stopping puts the IPv4 routes back exactly."""
    server_host, node = lab.add_host("server"), lab.add_host("node")
    server_ip6 = server_host.use_ipv6_underlay()
    node.use_ipv6_underlay()
    server = start_server(server_host, ip=server_ip6, keepalive=2)
    routes_before = node.ipv4_routes()
    client = start_client(node, server.join_string())
    client.restart_with_full_tunnel()

    added = [r for r in node.ipv4_routes() if r not in routes_before]
    assert {r["dst"] for r in added} >= {"0.0.0.0/1", "128.0.0.0/1"}
    assert all(r.get("dev") == "nc0" for r in added), added
    assert ping_counts(node, SERVER_OVERLAY_IP, count=5) == (5, 5), client.process.log()
    assert client.process.stop() == 0
    assert node.ipv4_routes() == routes_before, "the client must remove exactly the routes it added"
    assert not node.has_link("nc0")
