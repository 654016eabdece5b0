"""Full tunnel: a client with redirectGateway sends everything through the overlay,
and a server with `gateway: true` forwards it out of its uplink with NAT."""

from __future__ import annotations

from netlab import Host, Lab, sh, start_client, start_server, wait_for

UPLINK_SERVER = "198.19.0.1"
UPLINK_WEB = "198.19.0.2"


def link_hosts(lab: Lab, a: Host, b: Host, a_ip: str, b_ip: str) -> None:
    """A second underlay: a veth pair straight between two lab hosts (eth1 on each)."""
    sh("ip", "link", "add", "eth1", "netns", a.ns, "type", "veth", "peer", "name", "eth1", "netns", b.ns)
    for host, ip in ((a, a_ip), (b, b_ip)):
        sh("ip", "-n", host.ns, "addr", "add", f"{ip}/24", "dev", "eth1")
        sh("ip", "-n", host.ns, "link", "set", "eth1", "up")


def iptables_rules(host: Host) -> str:
    return host.run("iptables-save").stdout


def sysctl_forward(host: Host) -> str:
    return host.run("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()


def test_full_tunnel_through_gateway_server(lab: Lab) -> None:
    """With redirectGateway a node reaches a host only the server can reach, through the
    tunnel and NATed to the server's uplink address; stopping both puts back every route,
    rule and sysctl they changed."""
    server_host, node, web = lab.add_host("server"), lab.add_host("node"), lab.add_host("web")
    link_hosts(lab, server_host, web, UPLINK_SERVER, UPLINK_WEB)
    assert not node.ping(UPLINK_WEB), "the node must not reach the web host without the tunnel"
    routes_before, rules_before = node.ipv4_routes(), iptables_rules(server_host)
    forward_before = sysctl_forward(server_host)

    server = start_server(server_host, keepalive=2, gateway=True)
    assert sysctl_forward(server_host) == "1"
    assert "MASQUERADE" in iptables_rules(server_host)

    client = start_client(node, server.join_string(), wait=False)
    wait_for(client.overlay_ip, what="the node to connect")
    client.restart_with_full_tunnel()

    assert node.ping(UPLINK_WEB, count=3), client.process.log()
    capture = web.spawn("tcpdump", "-n", "-l", "-c", "1", "-i", "eth1", "icmp", name="web-tcpdump")
    capture.wait_for_output("listening", what="tcpdump to start")
    assert node.ping(UPLINK_WEB)
    wait_for(lambda: not capture.alive(), timeout=10, what="tcpdump to see the ping")
    assert f"{UPLINK_SERVER} > {UPLINK_WEB}" in capture.log(), "the web host must see the server's NATed address"
    assert node.ping(server_host.ip), "the host route keeps the tunnel itself on the underlay"

    assert client.process.stop() == 0
    assert node.ipv4_routes() == routes_before, "the client must remove exactly the routes it added"
    assert not node.has_link("nc0")
    assert server.process.stop() == 0
    assert iptables_rules(server_host).count("MASQUERADE") == rules_before.count("MASQUERADE") == 0
    assert sysctl_forward(server_host) == forward_before


def test_gateway_off_drops_traffic_for_the_world(lab: Lab) -> None:
    """Without gateway mode the server does not forward a full-tunnel node's traffic."""
    server_host, node, web = lab.add_host("server"), lab.add_host("node"), lab.add_host("web")
    link_hosts(lab, server_host, web, UPLINK_SERVER, UPLINK_WEB)
    server = start_server(server_host, keepalive=2)
    client = start_client(node, server.join_string())
    client.restart_with_full_tunnel()
    assert node.ping("10.1.1.1")
    assert not node.ping(UPLINK_WEB)
    assert sysctl_forward(server_host) == "0"
