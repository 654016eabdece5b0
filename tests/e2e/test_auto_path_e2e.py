"""auto picks the data path by what the link shows, end to end with the real ./nc in
namespaces and random loss on the lab's bridge (nftables `numgen random mod 1000 < N drop`,
netlab's shape_underlay): under loss a node keeps its data on datagrams, on a clean link
it moves it to the TLS stream while a bulk flow runs, and back to datagrams when loss
appears; every flow that crosses a switch arrives whole. No timed assertions: waits are
generous bounds (tests/bench.sh wan measures)."""

from __future__ import annotations

import json

from netlab import Host, Lab, wait_for
from overlay_helpers import SERVER_OVERLAY_IP, build_overlay, ping_counts, tcp_transfer

BULK = 48 * 1024 * 1024  # more than one judgement needs (AUTO_MIN_BYTES, AUTO_MIN_DATAGRAMS)


def test_auto_keeps_datagrams_under_loss_takes_the_stream_when_clean_and_leaves_it_on_loss(lab: Lab) -> None:
    overlay = build_overlay(lab, 1, keepalive=5)
    client, node, server = overlay.clients[0], overlay.hosts[0], overlay.server
    wait_for(lambda: "data path: UDP" in client.process.log(), timeout=15, what="the UDP data path")

    def transport() -> str:
        return server.node(client.token())["transport"]

    # 2 % of the packets on the wire dropped: a bulk flow each way stays on datagrams. On
    # a wire (as NICs do, netlab's `wire`), not as a veth hands over a GSO batch: one
    # dropped frame of 64 datagrams leaves most batches whole, a loss too rare to judge by.
    lab.shape_underlay(loss_pct=2, wire=True)
    tcp_transfer(node, overlay.server_host, SERVER_OVERLAY_IP, BULK)
    tcp_transfer(overlay.server_host, node, client.overlay_ip(), BULK)
    assert "auto: the link is clean" not in client.process.log()
    assert transport() == "udp"

    # A clean link: the download that proves it (every datagram of it counted) moves to the
    # stream while it runs, and arrives whole; an upload then runs on the stream.
    # Downloads until it did: on a loaded host a full receive socket can still lose a burst
    # of datagrams in one (a CI run timed out waiting after a single download).
    lab.clear_underlay()
    download = lambda: tcp_transfer(overlay.server_host, node, client.overlay_ip(), BULK)  # noqa: E731
    wait_for(
        lambda: download() or "auto: the link is clean" in client.process.log(),
        timeout=90,
        interval=0,
        what="auto to choose the stream",
    )
    wait_for(lambda: transport() == "tcp", timeout=15, what="the server to send on the stream")
    assert "data path: TLS/TCP" in client.process.log()
    tcp_transfer(node, overlay.server_host, SERVER_OVERLAY_IP, BULK)
    assert transport() == "tcp"
    sent, answered = ping_counts(node, SERVER_OVERLAY_IP, 10, 0.05)
    assert answered == sent

    # Loss again: an upload on the stream shows it (bytes sent again), data goes back to
    # datagrams mid-flow, and the flow still arrives whole.
    lab.shape_underlay(loss_pct=3)
    tcp_transfer(node, overlay.server_host, SERVER_OVERLAY_IP, 2 * BULK)  # twice what one judgement needs
    wait_for(
        lambda: "auto: the link loses packets" in client.process.log(), timeout=30, what="auto to leave the stream"
    )
    wait_for(lambda: transport() == "udp", timeout=15, what="the server to send datagrams again")
    lab.clear_underlay()
    tcp_transfer(node, overlay.server_host, SERVER_OVERLAY_IP, 4 * 1024 * 1024)  # too soon to try the stream again
    assert transport() == "udp"
    assert client.process.log().count("auto: the link is clean") == 1


SWITCH_ROUNDS = 10  # per direction: before the settle, 8 of 30 switches (a quarter) resent segments


def udp_receive_drops(host: Host) -> int:
    """Datagrams the host's UDP sockets had no room for (IPv4 and IPv6, this namespace)."""
    snmp = host.run("cat", "/proc/net/snmp").stdout.splitlines()
    names, values = (line.split() for line in snmp if line.startswith("Udp:"))
    snmp6 = dict(line.split()[:2] for line in host.run("cat", "/proc/net/snmp6").stdout.splitlines() if line.strip())
    return int(values[names.index("RcvbufErrors")]) + int(snmp6.get("Udp6RcvbufErrors", 0))


def test_a_flow_that_crosses_the_move_to_the_stream_keeps_its_order(lab: Lab) -> None:
    """Each round restarts the node on auto, so a bulk flow (iperf3, 2 s) starts on datagrams
    and moves to the stream while it runs. The receiver delivers the datagrams sent before
    the move ahead of the stream's first packets: the flow sees no reorder, so its TCP sends
    nothing again. A round where the receiving UDP socket dropped datagrams (a loss of the
    datagram path's own on a busy host, counted by the kernel) proves nothing and is not
    judged; most rounds have none."""
    overlay = build_overlay(lab, 1, keepalive=5)
    client, node, server_host = overlay.clients[0], overlay.hosts[0], overlay.server_host
    server_host.spawn("iperf3", "-s", "-B", SERVER_OVERLAY_IP, name="iperf3-server")
    judged: list[tuple[str, int]] = []
    for direction in ["upload", "download"] * SWITCH_ROUNDS:
        client.process.stop()
        client.restart()
        client.process.wait_for_output("data path: UDP", what="the UDP data path")
        receiver = server_host if direction == "upload" else node
        drops = udp_receive_drops(receiver)
        reverse = ["-R"] if direction == "download" else []
        done = node.run("iperf3", "-c", SERVER_OVERLAY_IP, "-t", "2", "-J", *reverse, timeout=30)
        assert "auto: the link is clean" in client.process.log(), "the flow did not move to the stream"
        if udp_receive_drops(receiver) == drops:
            judged.append((direction, json.loads(done.stdout)["end"]["sum_sent"]["retransmits"]))
    assert len(judged) >= SWITCH_ROUNDS, f"too few rounds without drops in the UDP socket: {judged}"
    assert all(resent == 0 for _, resent in judged), f"segments sent again across the move: {judged}"
