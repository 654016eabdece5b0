"""Groups (capability "groups"), end to end with the real ./nc in namespaces: on a clean
link bulk TCP leaves as groups of datagrams, one seal per 64 KiB super-packet, on direct
paths and on the server path in both directions, and arrives whole; loss turns grouping
off; a node of the previous release (run from the repo's history) is never sent a group
and keeps working with new nodes and the new server. What leaves is counted on the wire:
an nftables rule per destination matching a datagram's first byte (0x02: grouped).
Waits are generous bounds, not measurements (tests/bench.sh direct and wan measure)."""

from __future__ import annotations

import json
from collections.abc import Callable

from netlab import Host, Lab, NcClient, start_client, wait_for
from overlay_helpers import SERVER_OVERLAY_IP, build_overlay, tcp_transfer, wait_connected
from releases import BEFORE_GROUPS_COMMIT, nc_of_commit

BULK = 16 * 1024 * 1024


def until_logged(client: NcClient, line: str, transfer: Callable[[], None], what: str) -> None:
    """Transfers until the client logs `line`: a judgement needs AUTO_MIN_DATAGRAMS of the
    peer's datagrams (its acks), however many a transfer of a given size brings."""
    wait_for(lambda: transfer() or line in client.process.log(), timeout=90, interval=0, what=what)


def count_grouped(host: Host, destinations: list[str]) -> None:
    """Count, per destination, UDP sends whose (first) datagram is grouped (first byte 0x02)."""
    rules = "".join(f"    ip daddr {d} @th,64,8 0x02 counter\n" for d in destinations)
    script = f"table ip ncgroups {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n{rules}  }}\n}}\n"
    host.run("nft", "-f", "-", input=script)


def grouped_sends(host: Host) -> dict[str, int]:
    """Grouped sends per destination so far (a UDP GSO send counts once)."""
    listing = json.loads(host.run("nft", "-j", "list", "table", "ip", "ncgroups").stdout)
    counts: dict[str, int] = {}
    for item in listing["nftables"]:
        rule = item.get("rule")
        if rule is None:
            continue
        address = next(e["match"]["right"] for e in rule["expr"] if "match" in e and e["match"]["right"] != 2)
        counts[address] = next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return counts


def peer_path(client: NcClient, peer_ip: str) -> str:
    done = client.host.nc("status", "--work-dir", str(client.work_dir), "-o", "json", check=False)
    found = [p for p in json.loads(done.stdout or "{}").get("peers", []) if p["ip"] == peer_ip]
    return found[0]["path"] if found else ""


def use_transport(client: NcClient, transport: str) -> None:
    client.process.stop()
    client.config.write_text(client.config.read_text().replace("transport: auto", f"transport: {transport}"))
    client.restart()


def test_a_clean_direct_path_seals_each_super_packet_once_and_loss_turns_it_off(lab: Lab) -> None:
    overlay = build_overlay(lab, 2, keepalive=5)
    first, second = overlay.clients
    ip2 = second.overlay_ip()
    wait_for(lambda: peer_path(first, ip2) == "direct", timeout=30, what="the direct path")
    count_grouped(first.host, [second.host.ip])
    send = lambda: tcp_transfer(first.host, second.host, ip2, BULK)  # noqa: E731
    until_logged(first, f"direct path to {ip2}: the link is clean", send, "grouping to start")
    send()
    assert grouped_sends(first.host)[second.host.ip] > 0

    # Loss: the acks coming back show it, grouping stops, and the flows still arrive whole.
    lab.shape_underlay(loss_pct=2, wire=True)
    until_logged(first, "one seal per segment again", send, "grouping to stop")
    before = grouped_sends(first.host)[second.host.ip]
    tcp_transfer(first.host, second.host, ip2, 8 * 1024 * 1024)
    assert grouped_sends(first.host)[second.host.ip] == before


def test_the_server_path_groups_both_ways_on_a_clean_link(lab: Lab) -> None:
    """A node on `transport: udp` (auto would take the TLS stream on a clean link)."""
    overlay = build_overlay(lab, 1, keepalive=5)
    client, node, server_host = overlay.clients[0], overlay.hosts[0], overlay.server_host
    use_transport(client, "udp")
    wait_connected(overlay.server, client)
    count_grouped(node, [server_host.ip])
    count_grouped(server_host, [node.ip])

    def both_ways() -> bool:
        """Transfers each way; True once each side has sent groups (after it judged the link clean)."""
        tcp_transfer(server_host, node, client.overlay_ip(), BULK)
        tcp_transfer(node, server_host, SERVER_OVERLAY_IP, BULK)
        return grouped_sends(node)[server_host.ip] > 0 and grouped_sends(server_host)[node.ip] > 0

    wait_for(both_ways, timeout=120, interval=0, what="groups both ways")
    assert f"UDP to {server_host.ip}: the link is clean" in client.process.log()
    assert overlay.server.node(client.token())["transport"] == "udp"


def test_a_node_of_the_previous_release_is_never_sent_a_group(lab: Lab) -> None:
    """The new server and a new node beside a node of the build before groups, all on one
    segment: the old node agrees on direct paths but not on groups; bulk flows between all
    three arrive whole, and nothing grouped ever leaves for the old node."""
    overlay = build_overlay(lab, 1, keepalive=5)
    new, server_host = overlay.clients[0], overlay.server_host
    old_host = lab.add_host("old")
    old_host.nc_path = nc_of_commit(lab, BEFORE_GROUPS_COMMIT, "a node of the release before groups")
    old = start_client(old_host, overlay.join)
    old_ip, new_ip = wait_connected(overlay.server, old), new.overlay_ip()
    use_transport(old, "udp")
    use_transport(new, "udp")
    wait_connected(overlay.server, old)
    wait_connected(overlay.server, new)
    wait_for(lambda: peer_path(new, old_ip) == "direct", timeout=30, what="the direct path to the old node")
    count_grouped(new.host, [old_host.ip, server_host.ip])
    count_grouped(server_host, [old_host.ip, new.host.ip])

    def all_four() -> bool:
        tcp_transfer(new.host, old_host, old_ip, BULK)
        tcp_transfer(old_host, new.host, new_ip, BULK)
        tcp_transfer(server_host, old_host, old_ip, BULK)
        tcp_transfer(server_host, new.host, new_ip, BULK)
        return grouped_sends(server_host)[new.host.ip] > 0

    # Until the server's judgement of the new node's link lets it group to it: the new node does take them.
    wait_for(all_four, timeout=120, interval=0, what="the server to send the new node groups")
    all_four()
    assert grouped_sends(new.host)[old_host.ip] == 0
    assert grouped_sends(server_host)[old_host.ip] == 0
    assert peer_path(new, old_ip) == "direct"
