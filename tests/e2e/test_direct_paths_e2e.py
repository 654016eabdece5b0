"""Direct node-to-node paths (capability "direct"), end to end with the real ./nc in
namespaces: two nodes on one LAN segment talk directly; two sites behind NATs with
endpoint-independent mapping (nftables masquerade in router namespaces) punch through
both; symmetric NATs (masquerade random) stay relayed and work; a direct path cut mid-
transfer falls back to the server with no reconnect; an unregistered node is withdrawn
from its peers within a second; networks without interconnection get no peers; a node
that does not offer "direct" is reached through the server. Waits are generous bounds on
a shared machine, not measurements (tests/bench.sh measures)."""

from __future__ import annotations

import datetime
import json
import threading
import time

from direct_helpers import add_site, cut_between
from netlab import Host, Lab, NcClient, NcServer, start_client, start_server, wait_for
from overlay_helpers import (
    assert_all_lost,
    assert_reaches,
    build_overlay,
    create_network,
    nodes,
    ping_counts,
    scrape,
    start_clients,
    tcp_transfer,
    value,
    wait_connected,
)


def status(client: NcClient) -> dict:
    done = client.host.nc("status", "--work-dir", str(client.work_dir), "-o", "json", check=False)
    return json.loads(done.stdout) if done.stdout.strip() else {}


def peers(client: NcClient) -> dict[str, dict]:
    return {peer["ip"]: peer for peer in status(client).get("peers", [])}


def wait_path(client: NcClient, peer_ip: str, path: str, timeout: float = 30) -> dict:
    return wait_for(
        lambda: (found := peers(client).get(peer_ip, {})).get("path") == path and found,
        timeout=timeout,
        interval=0.2,
        what=f"{client.host.name}'s path to {peer_ip} to be {path}",
    )


def listed_direct(server: NcServer, client: NcClient) -> list[str]:
    """The peers `nc adm node list -o json` shows the client reaching directly."""
    return nodes(server)[client.token()]["directPeers"]


def wait_listed_direct(server: NcServer, client: NcClient, expected: list[str], timeout: float = 10) -> None:
    wait_for(
        lambda: listed_direct(server, client) == expected,
        timeout=timeout,
        interval=0.2,
        what=f"the node list to show {client.host.name} direct to {expected}",
    )


def udp_bytes_to(host: Host, address: str) -> int:
    """Bytes of UDP the host's counting rule saw leave for `address`."""
    listing = host.run("iptables", "-w", "-L", "OUTPUT", "-v", "-x", "-n").stdout
    total = 0
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) > 7 and {"udp", "17"} & set(fields[2:4]) and address in fields[-1:] + fields[-2:]:
            total += int(fields[1])
    return total


def count_udp_to(host: Host, address: str) -> None:
    host.run("iptables", "-w", "-A", "OUTPUT", "-p", "udp", "-d", address)


# -- tests ----------------------------------------------------------------------------------


def test_two_nodes_on_one_segment_talk_directly(lab: Lab) -> None:
    """(a) Both nodes and the server on one bridge: once pongs flow both ways the nodes'
    traffic to each other leaves straight for the peer, not for the server; `nc status`
    lists the peer as direct with its endpoint, a handshake and traffic; `nc adm node list`
    shows each one's direct peer, and no longer once that peer is gone."""
    overlay = build_overlay(lab, 2, keepalive=5)
    first, second = overlay.clients
    ips = [c.overlay_ip() for c in overlay.clients]
    found = wait_path(first, ips[1], "direct")
    wait_path(second, ips[0], "direct")
    wait_listed_direct(overlay.server, first, [ips[1]])
    wait_listed_direct(overlay.server, second, [ips[0]])
    wide = overlay.server.adm("node", "list", "-o", "wide").stdout.splitlines()
    assert "DIRECT" in wide[0].split(), wide
    row = next(line for line in wide if first.token() in line.split())
    assert nodes(overlay.server)[second.token()]["name"] in row.split(), wide
    assert found["endpoint"].startswith(second.host.ip + ":"), found
    assert datetime.datetime.fromisoformat(found["lastHandshake"]).tzinfo is not None, found  # RFC 3339, zoned
    count_udp_to(first.host, second.host.ip)
    count_udp_to(first.host, overlay.server_host.ip)
    size = 8 * 1024 * 1024
    tcp_transfer(first.host, second.host, ips[1], size)
    assert udp_bytes_to(first.host, second.host.ip) > size
    assert udp_bytes_to(first.host, overlay.server_host.ip) < size // 20  # probes and keepalives only
    after = peers(first)[ips[1]]
    assert after["txBytes"] > size, after
    text = first.host.nc("status", "--work-dir", str(first.work_dir)).stdout
    assert "peers:" in text and ips[1] in text and "direct" in text, text
    metric = lambda path: value(scrape(overlay.server_host), "nc_node_to_node_bytes_total", path=path)  # noqa: E731
    wait_for(lambda: metric("direct") > size, timeout=20, what="the nodes' direct bytes in the server's metrics")
    assert metric("relayed") < size // 20
    second.process.stop()
    wait_listed_direct(overlay.server, first, [], timeout=5)  # withdrawn with the peer's session


def test_through_two_endpoint_independent_nats_and_back_to_the_server_when_cut(lab: Lab) -> None:
    """(b) Each node behind its own masquerading router: the server's introduction makes
    both probe at once and the path goes direct through both NATs, to the peer's NAT
    mapping. (d) Then nftables drops everything between the routers in the middle of a
    transfer: it completes through the server, the nodes keep their sessions and IPs, and
    within seconds `nc adm node list` no longer shows the pair direct."""
    server_host = lab.add_host("server")
    server = start_server(server_host, keepalive=5)
    join = server.join_string()
    site1, site2 = add_site(lab, 1), add_site(lab, 2)
    router1, router2 = lab.hosts["router1"], lab.hosts["router2"]
    first, second = start_client(site1, join), start_client(site2, join)
    ips = [wait_connected(server, first), wait_connected(server, second)]
    found = wait_path(first, ips[1], "direct")
    wait_path(second, ips[0], "direct")
    assert found["endpoint"].startswith(router2.ip + ":"), found  # the peer's NAT mapping
    wait_listed_direct(server, first, [ips[1]])
    wait_listed_direct(server, second, [ips[0]])
    count_udp_to(site1, router2.ip)
    size = 8 * 1024 * 1024
    tcp_transfer(site1, site2, ips[1], size)
    assert udp_bytes_to(site1, router2.ip) > size
    cut = threading.Timer(1.0, cut_between, (router1, router2))
    pings: list[tuple[int, int]] = []
    pinger = threading.Thread(target=lambda: pings.append(ping_counts(site1, ips[1], 60, 0.1)))
    cut.start()
    pinger.start()
    tcp_transfer(site1, site2, ips[1], 32 * 1024 * 1024)
    cut.join()
    pinger.join()
    sent, answered = pings[0]
    assert sent - answered <= 30, pings  # pings every 0.1 s: at most 3 s without an answer
    wait_path(first, ips[1], "relayed", timeout=10)
    for client in (first, second):  # the nodes report the path down: the node list shows it relayed within seconds
        wait_listed_direct(server, client, [], timeout=5)
    assert first.overlay_ip() == ips[0] and second.overlay_ip() == ips[1]
    for client in (first, second):
        assert client.process.log().count("connected to ") == 1, client.process.log()[-3000:]
    sent, answered = ping_counts(site1, ips[1], 10, 0.1)
    assert answered == sent


def test_symmetric_nats_stay_relayed_and_work(lab: Lab) -> None:
    """(c) Both routers map each destination to a random port: probes to the mapping the
    server saw never arrive, the peers stay relayed, and traffic flows through the server."""
    server_host = lab.add_host("server")
    server = start_server(server_host, keepalive=5)
    join = server.join_string()
    site1, site2 = add_site(lab, 1, symmetric=True), add_site(lab, 2, symmetric=True)
    first, second = start_client(site1, join), start_client(site2, join)
    ips = [wait_connected(server, first), wait_connected(server, second)]
    wait_for(lambda: ips[1] in peers(first), timeout=15, what="the peer's introduction")
    time.sleep(4)  # a full round of probes
    assert peers(first)[ips[1]]["path"] == "relayed"
    assert peers(second)[ips[0]]["path"] == "relayed"
    tcp_transfer(site1, site2, ips[1], 4 * 1024 * 1024)
    sent, answered = ping_counts(site1, ips[1], 10, 0.1)
    assert answered == sent


def test_an_unregistered_node_is_withdrawn_from_its_peers_within_a_second(lab: Lab) -> None:
    """(e) `nc adm node unregister`: within a second of the command its peers no longer
    hold its keys (their status lists it no more, their log says its datagrams are refused)."""
    overlay = build_overlay(lab, 3, keepalive=5)
    clients = overlay.clients
    ips = [c.overlay_ip() for c in clients]
    for client, other in ((clients[0], ips[2]), (clients[1], ips[2])):
        wait_path(client, other, "direct")
    overlay.server.adm("node", "unregister", "--node-token", clients[2].token())
    done = time.monotonic()
    for client in clients[:2]:
        wait_for(lambda c=client: ips[2] not in peers(c), timeout=5, interval=0.05, what="the peer's removal")
    assert time.monotonic() - done < 1.5  # 1 s, and the status calls' own time
    for client in clients[:2]:
        assert f"peer {ips[2]} removed by the server" in client.process.log()
    assert ips[1] in peers(clients[0]) and peers(clients[0])[ips[1]]["path"] == "direct"


def test_no_peers_without_interconnection_or_across_networks(lab: Lab) -> None:
    """(f) Two nodes of a network without interconnection, and a node of another network,
    all on one segment: none is introduced to another, and none reaches another."""
    server_host = lab.add_host("server")
    server = start_server(server_host, keepalive=5)
    create_network(server, "solo", "10.4.0.1/24", "--no-interconnection")
    solo = server.join_string("--net", "solo")
    a, b, c = start_clients(lab, [("s1", solo), ("s2", solo), ("d1", server.join_string())])
    ips = [wait_connected(server, client) for client in (a, b, c)]
    for client in (a, b):
        assert_reaches(client.host, "10.4.0.1")
    time.sleep(2)
    for client in (a, b, c):
        assert peers(client) == {}, status(client)
    assert_all_lost([(a.host, ips[1]), (b.host, ips[0])])  # d1 has no route into 10.4.0.0/24 at all


def test_a_node_without_the_capability_is_reached_through_the_server(lab: Lab) -> None:
    """(g) A node that does not offer "direct" (directPaths: false, as a release before it):
    no peer is told of it, nor it of them; it reaches both others through the server,
    while those two run direct."""
    overlay = build_overlay(lab, 2, keepalive=5)
    first, second = overlay.clients
    ips = [c.overlay_ip() for c in overlay.clients]
    wait_path(first, ips[1], "direct")
    old_host = lab.add_host("old")
    old = start_client(old_host, overlay.join, wait=False)
    wait_for(lambda: old.config.exists() and old.overlay_ip(), timeout=30, what="the old node to connect")
    old.process.stop()
    old.config.write_text(old.config.read_text().replace("directPaths: true", "directPaths: false"))
    assert "directPaths: false" in old.config.read_text()
    old.restart()
    old_ip = wait_connected(overlay.server, old)
    for client in (first, second):
        assert_reaches(old_host, client.overlay_ip())
        assert_reaches(client.host, old_ip)
    assert status(old).get("peers") == []
    assert old_ip not in peers(first) and old_ip not in peers(second)
    assert peers(first)[ips[1]]["path"] == "direct"
