"""The UDP data path, end to end with the real ./nc in namespaces: the encrypted UDP data path is
agreed after the welcome and carries the data; with UDP blocked (iptables in the node's own
namespace) before the join or mid-session, data moves to the TLS/TCP stream with the same
overlay IP, and back to UDP once datagrams flow again. No timed assertions: waits are
generous bounds, not measurements (tests/bench.sh measures)."""

from __future__ import annotations

import re

from netlab import Host, Lab, start_client, start_server, wait_for
from overlay_helpers import (
    SERVER_OVERLAY_IP,
    assert_reaches,
    build_overlay,
    ping_counts,
    scrape,
    stop_client,
    tcp_transfer,
    value,
    wait_exit,
)
from udp_helpers import spawn_udp_node, udp_node_result

UDP_PORT = "6441"


def udp_rule(host: Host, action: str, *target: str) -> None:
    """Add (-A) or delete (-D) a rule on the node's own UDP traffic to the server port."""
    host.run("iptables", "-w", action, "OUTPUT", "-p", "udp", "--dport", UDP_PORT, *target)


def output_counts(host: Host, proto: str) -> tuple[int, int]:
    """(packets, bytes) the node's counting rule saw leave for the server's data port over
    proto; a UDP GSO send counts as one packet of all its datagrams' bytes."""
    listing = host.run("iptables", "-w", "-L", "OUTPUT", "-v", "-x", "-n").stdout
    names = {proto, {"udp": "17", "tcp": "6"}[proto]}  # iptables-nft prints the number
    packets = octets = 0
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) > 3 and names & set(fields[2:4]) and f"dpt:{UDP_PORT}" in line:  # no target: one field less
            packets, octets = packets + int(fields[0]), octets + int(fields[1])
    return packets, octets


def output_packets(host: Host, proto: str) -> int:
    return output_counts(host, proto)[0]


def count_data_port(host: Host) -> None:
    for proto in ("udp", "tcp"):
        host.run("iptables", "-w", "-A", "OUTPUT", "-p", proto, "--dport", UDP_PORT)


def log_count(text: str, pattern: str) -> int:
    return len(re.findall(pattern, text))


def test_data_flows_as_datagrams_once_udp_is_up(lab: Lab) -> None:
    """After the welcome the node switches to UDP; pings then leave as UDP datagrams,
    not on the TLS stream, and the server logs the node's data path."""
    overlay = build_overlay(lab, 1, keepalive=5)
    client, node = overlay.clients[0], overlay.hosts[0]
    wait_for(lambda: "data path: UDP" in client.process.log(), timeout=15, what="the UDP data path")
    assert_reaches(node, SERVER_OVERLAY_IP)
    count_data_port(node)
    sent, answered = ping_counts(node, SERVER_OVERLAY_IP, 30, 0.05)
    assert answered == sent == 30
    assert output_packets(node, "udp") >= 30
    assert output_packets(node, "tcp") < 10  # TLS keepalives at most, no packets
    assert "data path UDP" in overlay.server.process.log()
    assert overlay.server.node(client.token())["transport"] == "udp"
    assert "udp" in overlay.server.adm("node", "list").stdout.split()


def test_tcp_streams_cross_the_udp_path_whole_under_loss_to_the_server_and_between_nodes(lab: Lab) -> None:
    """Bulk TCP leaves as tagged pieces of super-packets; with 2 % of the underlay's frames
    dropped, bursts arrive split, and every stream still arrives whole and unaltered, node
    to server, server to node and node to node through the server, all on UDP."""
    overlay = build_overlay(lab, 2, keepalive=5)
    for client in overlay.clients:
        wait_for(lambda c=client: "data path: UDP" in c.process.log(), timeout=15, what="the UDP data path")
    first, second = overlay.clients
    count_data_port(first.host)
    # Node to node through the server: the direct path between them never answers.
    first.host.run("iptables", "-w", "-A", "OUTPUT", "-p", "udp", "-d", second.host.ip, "-j", "DROP")
    # Loss per datagram as on a wire (netlab's `wire`): a veth hands a GSO batch over as one
    # frame, and a link that drops whole batches can look clean enough for auto to move the
    # data to the stream, which this test is not about.
    lab.shape_underlay(loss_pct=2, wire=True)
    size = 8 * 1024 * 1024
    tcp_transfer(first.host, overlay.server_host, SERVER_OVERLAY_IP, size)
    tcp_transfer(overlay.server_host, first.host, first.overlay_ip(), size)
    tcp_transfer(first.host, second.host, second.overlay_ip(), size)
    tcp_transfer(second.host, first.host, first.overlay_ip(), size)
    lab.clear_underlay()
    assert output_counts(first.host, "udp")[1] > 2 * size  # the node's two streams went as datagrams
    assert output_counts(first.host, "tcp")[1] < 64 * 1024  # TLS keepalives, no data
    for client in overlay.clients:
        assert overlay.server.node(client.token())["transport"] == "udp"


def test_a_multi_homed_server_answers_from_the_address_the_node_sent_to(lab: Lab) -> None:
    """The server's namespace has two addresses; nodes are told the second, while its
    routing default is the first. Behind a stateful firewall that, like a NAT, takes UDP
    only as a reply to what the node sent, datagrams answered from the routing default
    would be dropped and the node would fall back to TCP. It stays on UDP."""
    server_host = lab.add_host("server")
    advertised = "198.18.0.101"
    server_host.run("ip", "addr", "add", f"{advertised}/24", "dev", "eth0")  # secondary: never the default source
    server = start_server(server_host, ip=advertised)
    node = lab.add_host("node1")
    node.run("iptables", "-w", "-A", "INPUT", "-p", "udp", "--sport", UDP_PORT,
             "-m", "conntrack", "!", "--ctstate", "ESTABLISHED", "-j", "DROP")  # fmt: skip
    client = start_client(node, server.join_string())
    wait_for(lambda: "data path: UDP" in client.process.log(), timeout=15, what="the UDP data path")
    sent, answered = ping_counts(node, SERVER_OVERLAY_IP, 20, 0.05)
    assert answered == sent == 20
    assert "does not answer" not in client.process.log()
    assert server.node(client.token())["transport"] == "udp"


def test_udp_blocked_before_the_join_leaves_the_node_on_tcp(lab: Lab) -> None:
    """The node's UDP is dropped from the start: it stays on TLS/TCP and works."""
    server_host = lab.add_host("server")
    server = start_server(server_host, keepalive=5)
    node = lab.add_host("node1")
    udp_rule(node, "-A", "-j", "DROP")
    client = start_client(node, server.join_string())
    assert_reaches(node, SERVER_OVERLAY_IP)
    wait_for(lambda: "does not answer" in client.process.log(), timeout=15, what="the UDP probe to give up")
    sent, answered = ping_counts(node, SERVER_OVERLAY_IP, 10, 0.1)
    assert answered == sent
    assert "data path: UDP" not in client.process.log()
    assert server.node(client.token())["transport"] == "tcp"


def test_udp_blocked_mid_session_moves_to_tcp_and_back(lab: Lab) -> None:
    """UDP dropped mid-session: pings resume over TLS/TCP with the same overlay IP; once
    UDP is let through again the node returns to it (probed again within a minute)."""
    overlay = build_overlay(lab, 1, keepalive=5)
    client, node = overlay.clients[0], overlay.hosts[0]
    wait_for(lambda: "data path: UDP" in client.process.log(), timeout=15, what="the UDP data path")
    address = client.overlay_ip()
    udp_rule(node, "-A", "-j", "DROP")
    wait_for(lambda: "data moves to TLS/TCP" in client.process.log(), timeout=15, what="the switch to TCP")
    assert_reaches(node, SERVER_OVERLAY_IP)
    assert client.overlay_ip() == address
    udp_rule(node, "-D", "-j", "DROP")
    wait_for(lambda: log_count(client.process.log(), "data path: UDP") >= 2, timeout=90, what="the return to UDP")
    count_data_port(node)
    sent, answered = ping_counts(node, SERVER_OVERLAY_IP, 20, 0.05)
    assert answered == sent
    assert output_packets(node, "udp") >= 20
    assert client.overlay_ip() == address


def test_datagrams_that_do_not_authenticate_are_dropped_counted_and_never_answered(lab: Lab) -> None:
    """Two real sessions agreed with a real server. Replayed, truncated, forged and
    cross-session datagrams get no answer and are counted in the server's log; reordered
    ones are all answered; a stranger gets not one byte back, even for a captured
    datagram; one captured on its way and replayed from a third address after newer ones
    arrived is answered to the node, not the replayer; a node that changes port and then
    underlay address keeps its session, and answers go only to the newest authenticated
    address; after a rekey over TLS the new keys are answered and the old ones are not."""
    overlay = build_overlay(lab, 2, keepalive=5)
    a, b = overlay.clients
    for client in overlay.clients:
        assert stop_client(client) == 0  # their certificates now belong to the scripted node
    node = a.host
    new_ip, thief_ip = "198.18.0.200", "198.18.0.201"
    for ip in (new_ip, thief_ip):
        node.run("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
    process = spawn_udp_node(
        node,
        overlay.server_host.ip,
        cert_dirs=[str(c.work_dir / "tls" / "network") for c in (a, b)],
        tokens=[a.token(), b.token()],
        new_ip=new_ip,
        thief_ip=thief_ip,
    )
    wait_exit(process, timeout=60)
    result = udp_node_result(process)
    assert result["genuine"] and result["reordered"], result
    assert result["replayed"] == [] and result["truncated"] == [] and result["forged"] == [], result
    assert result["cross_session_a"] == [] and result["cross_session_b"] == [], result
    assert result["stranger_got"] == 0, result
    assert result["thief_got"] == 0 and result["held_answered_home"], result
    assert result["moved_port"] and result["moved_address"] and result["stays_moved"], result
    assert result["old_socket_got"] == 0, result
    assert result["rekeyed"] and result["old_keys_answered"] == 0, result
    server_log = overlay.server.process.log()
    samples = scrape(overlay.server_host)
    for reason in ("replayed", "forged", "malformed", "unknown-session"):  # counted, and logged with the count
        assert re.search(rf"UDP datagram from [\d.]+ dropped \({reason}\); \d+ so far", server_log), reason
        assert value(samples, "nc_drops_total", reason=f"udp-{reason}") > 0, reason


def test_transport_tcp_on_either_side_keeps_data_on_the_stream(lab: Lab) -> None:
    """`transport: tcp` in server.yml: no UDP socket, nodes are told nothing of UDP; in
    client.yml: the node never offers it. Either way the node works on TLS/TCP."""
    server_host = lab.add_host("server")
    server = start_server(server_host, keepalive=5, transport="tcp")
    node = lab.add_host("node1")
    client = start_client(node, server.join_string())
    assert_reaches(node, SERVER_OVERLAY_IP)
    assert server.node(client.token())["transport"] == "tcp"
    assert "6441" not in server_host.run("ss", "-uln").stdout
    assert "UDP" not in client.process.log()
    # Now the other way round: a server that offers UDP, a node configured for TCP only.
    client.process.stop()
    server.process.stop()
    server.config.write_text(server.config.read_text().replace('"transport": "tcp"', '"transport": "auto"'))
    server.start()
    client.config.write_text(client.config.read_text().replace("transport: auto", "transport: tcp"))
    client.restart()
    wait_for(lambda: node.ping(SERVER_OVERLAY_IP), timeout=30, what="the node to reconnect")
    assert "6441" in server_host.run("ss", "-uln").stdout
    assert server.node(client.token())["transport"] == "tcp"
    assert "UDP" not in client.process.log()


def test_an_empty_datagram_ends_neither_the_server_nor_a_node(lab: Lab) -> None:
    """Anyone may send a zero-length datagram to the data port or to a node's datagram
    socket: both read past it and the overlay keeps working (before, it ended the packet
    loop, and with it the process)."""
    overlay = build_overlay(lab, 1, keepalive=5)
    client, node = overlay.clients[0], overlay.hosts[0]
    wait_for(lambda: "data path: UDP" in client.process.log(), timeout=15, what="the UDP data path")
    node_ports = {line.split()[3].rsplit(":", 1)[1] for line in node.run("ss", "-Huan").stdout.splitlines()}
    stranger = lab.add_host("stranger")
    send_empty = "import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    send_empty += "for port in sys.argv[2:]:\n    s.sendto(b'', (sys.argv[1], int(port)))\n"
    stranger.run("python3", "-c", send_empty, overlay.server_host.ip, UDP_PORT)
    stranger.run("python3", "-c", send_empty, node.ip, *sorted(node_ports))
    assert_reaches(node, SERVER_OVERLAY_IP)
    sent, answered = ping_counts(node, SERVER_OVERLAY_IP, 10, 0.05)
    assert answered == sent == 10
    assert overlay.server.process.alive() and client.process.alive()
    assert "Traceback" not in overlay.server.process.log() + client.process.log()
