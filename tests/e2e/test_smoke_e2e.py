"""The walk-through of the README, end to end with the real ./nc in namespaces."""

from __future__ import annotations

from netlab import Lab, start_client, start_server, wait_for


def test_server_token_join_ping(lab: Lab) -> None:
    server_host = lab.add_host("server")
    node_hosts = [lab.add_host(f"node{i}") for i in (1, 2)]
    server = start_server(server_host, keepalive=2)
    join = server.join_string()
    clients = [start_client(host, join) for host in node_hosts]
    ips = [c.overlay_ip() for c in clients]
    assert len(set(ips)) == 2 and all(ip.startswith("10.1.1.") for ip in ips)
    assert node_hosts[0].ping("10.1.1.1")
    assert node_hosts[0].ping(ips[1])
    assert server_host.ping(ips[0])
    for client in clients:
        node = wait_for(
            lambda c=client: server.node(c.token()).get("connState") == 3 and server.node(c.token()), what="state 3"
        )
        assert node["bindIp"] == client.overlay_ip()
