"""Direct node-to-node paths (capability "direct"): the pair keys both nodes derive, the
hello's share, the server's peer entries, and what a node's PeerTable lets through: only
the introduced peer's authenticated, fresh datagrams, with that peer's overlay address as
source and this node's as destination; nothing of a peer once the server withdrew it."""

from __future__ import annotations

import datetime
import ipaddress
import time
import types
from collections.abc import Iterator

import pytest

import ncctl

A_IP, B_IP, C_IP = (int(ipaddress.IPv4Address(f"10.1.1.{n}")) for n in (2, 3, 4))


class Node:
    def __init__(self, ip: int) -> None:
        self.ip = ip
        self.private, self.share = ncctl.new_x25519()
        self.sock = ncctl.DatagramSocket()
        self.table = ncctl.PeerTable(self.sock, self.private, self.share, ip, ncctl.collections.Counter())

    def info(self) -> ncctl.PeerInfo:
        return ncctl.PeerInfo(self.ip, self.share, (("127.0.0.1", self.sock.sock.getsockname()[1]),), False)


@pytest.fixture
def pair() -> Iterator[tuple[Node, Node]]:
    a, b = Node(A_IP), Node(B_IP)
    a.table.add(b.info(), 0.0)
    b.table.add(a.info(), 0.0)
    yield a, b
    a.sock.close()
    b.sock.close()


def packet(src: int, dst: int, payload: bytes = b"x" * 20) -> bytes:
    header = bytearray(20)
    header[0], header[9] = 0x45, 17
    header[2:4] = (20 + len(payload)).to_bytes(2, "big")
    header[12:16], header[16:20] = src.to_bytes(4, "big"), dst.to_bytes(4, "big")
    return ncctl.encode_frame(ncctl.FRAME_PACKET, bytes(header) + payload)


def deliver(sender: Node, receiver: Node, frames: list[bytes], replay: bool = False) -> list[bytes]:
    """Seal frames as `sender`'s path to `receiver` does, and hand them to receiver's table."""
    peer = sender.table.peers[receiver.ip]
    sealed = peer.sealer.seal(frames)
    passed: list[bytes] = []
    for datagrams in [sealed, sealed] if replay else [sealed]:
        for keys, opened, size, newest in ncctl.open_newest(datagrams, receiver.table.opener, lambda _r: None):
            passed += receiver.table.accept(keys, opened, size, ("::ffff:127.0.0.1", 1, 0, 0), newest)
    return passed


def test_both_nodes_of_a_pair_derive_the_same_keys_and_other_pairs_other_ones() -> None:
    a, b, c = (ncctl.new_x25519() for _ in range(3))
    ab = ncctl.PairKeys(a[0], a[1], b[1], A_IP, B_IP).epoch(0)
    ba = ncctl.PairKeys(b[0], b[1], a[1], B_IP, A_IP).epoch(0)
    ac = ncctl.PairKeys(a[0], a[1], c[1], A_IP, C_IP).epoch(0)
    assert ab.session_id == ba.session_id != ac.session_id
    sealed = ab.seal([packet(A_IP, B_IP)])
    assert ba.open(sealed[0], 0) == packet(A_IP, B_IP)
    with pytest.raises(ncctl.BadDatagram):
        ac.open(sealed[0], 0)
    assert ncctl.PairKeys(a[0], a[1], b[1], A_IP, B_IP).epoch(1).session_id != ab.session_id


def test_a_peers_packets_pass_only_with_its_source_and_this_nodes_destination(pair: tuple[Node, Node]) -> None:
    a, b = pair
    good, spoofed, elsewhere = packet(A_IP, B_IP), packet(C_IP, B_IP), packet(A_IP, C_IP)
    assert deliver(a, b, [good, spoofed, elsewhere]) == [good]
    assert b.table.counters["dropped-direct-spoofed"] == 2


def test_a_replayed_datagram_is_refused(pair: tuple[Node, Node]) -> None:
    a, b = pair
    assert deliver(a, b, [packet(A_IP, B_IP)], replay=True) == [packet(A_IP, B_IP)]


def test_a_withdrawn_peer_finds_no_keys(pair: tuple[Node, Node]) -> None:
    a, b = pair
    b.table.update({"remove": [str(ipaddress.IPv4Address(A_IP))]}, 1.0)
    assert b.table.peers == {} and b.table.by_id == {}
    assert deliver(a, b, [packet(A_IP, B_IP)]) == []


def test_a_pong_proves_both_ways_and_names_the_endpoint(pair: tuple[Node, Node]) -> None:
    a, b = pair
    assert b.table.path_for(A_IP.to_bytes(4, "big")) is None  # probing: data still goes to the server
    assert b.table.status()[0]["lastHandshake"] is None  # no handshake yet: null, as every time never reached
    pong = ncctl.encode_frame(ncctl.FRAME_DIRECT_PROBE, bytes((ncctl.DIRECT_PONG,)))
    assert deliver(a, b, [pong]) == []
    peer = b.table.path_for(A_IP.to_bytes(4, "big"))
    assert peer is not None and peer.endpoint == ("::ffff:127.0.0.1", 1, 0, 0)
    shown = b.table.status()[0]
    assert shown["path"] == "direct" and shown["endpoint"] == "127.0.0.1:1", shown
    handshake = datetime.datetime.fromisoformat(shown["lastHandshake"])
    assert handshake.tzinfo is not None and abs(time.time() - handshake.timestamp()) < 60, shown  # RFC 3339, zoned
    peer.tick(peer.last_pong + ncctl.DIRECT_SILENT_S + 0.1)  # no pong since: back to the server
    assert b.table.path_for(A_IP.to_bytes(4, "big")) is None


def test_worn_keys_move_to_the_next_epoch_which_the_peer_opens(pair: tuple[Node, Node]) -> None:
    a, b = pair
    for _ in range(3):
        peer = a.table.peers[B_IP]
        peer.sealer.sent = ncctl.REKEY_AFTER_DATAGRAMS
        a.table.tick(1.0)
        assert deliver(a, b, [packet(A_IP, B_IP)]) == [packet(A_IP, B_IP)]
    assert a.table.peers[B_IP].send_epoch == 3 and b.table.peers[A_IP].receive_epoch == 3
    assert len(b.table.peers[A_IP].epochs) <= 4  # the old epochs went


def test_the_hello_carries_the_direct_share_and_drops_the_cap_without_it() -> None:
    _, share = ncctl.new_x25519()
    hello = ncctl.Hello("a" * ncctl.NODE_TOKEN_LEN, udp_key=share, direct_key=share)
    decoded = ncctl.Hello.decode(hello.encode()[4:])
    assert decoded.direct_key == share and ncctl.CAP_DIRECT in decoded.caps
    bare = ncctl.Hello("a" * ncctl.NODE_TOKEN_LEN, udp_key=share)
    assert ncctl.CAP_DIRECT not in ncctl.Hello.decode(bare.encode()[4:]).caps


def test_endpoints_and_peer_entries_keep_only_what_is_well_formed() -> None:
    endpoints = ncctl.decode_endpoints(
        [["198.18.0.2", 4000], ["127.0.0.1", 1], ["0.0.0.0", 2], ["x", 3], ["198.18.0.3", 0], "junk", ["2001:2::3", 9]]
    )
    assert endpoints == (("198.18.0.2", 4000), ("2001:2::3", 9))
    assert len(ncctl.decode_endpoints([["198.18.0.9", p] for p in range(1, 20)])) == ncctl.MAX_PEER_ENDPOINTS
    _, share = ncctl.new_x25519()
    info = ncctl.PeerInfo(A_IP, share, endpoints, True)
    assert ncctl.PeerInfo.decode(info.encode()) == info
    assert ncctl.PeerInfo.decode({"ip": "10.1.1.2", "key": "short"}) is None
    assert ncctl.PeerInfo.decode({"ip": "not an ip", "key": info.encode()["key"]}) is None


def test_frame_addresses_reads_every_data_frame_kind() -> None:
    frame = packet(A_IP, B_IP)
    assert ncctl.frame_addresses(frame) == (A_IP.to_bytes(4, "big"), B_IP.to_bytes(4, "big"))
    gso = ncctl.encode_frame(ncctl.FRAME_GSO_PACKET, ncctl.ZERO_VNET_HDR + frame[4:])
    assert ncctl.frame_addresses(gso) == ncctl.frame_addresses(frame)
    assert ncctl.frame_addresses(ncctl.encode_frame(ncctl.FRAME_KEEPALIVE)) is None


def tcp_piece(src: int, dst: int, burst: int, index: int) -> bytes:
    segment = bytearray(packet(src, dst, b"p" * 600)[4:])
    segment[9], segment[32] = 6, 0x50  # TCP, a 20-byte header
    return ncctl.encode_frame(ncctl.FRAME_TSO_PIECE, ncctl.PIECE_TAG.pack(burst, index) + bytes(segment))


def test_a_peers_pieces_never_join_a_run_of_the_servers() -> None:
    """A read holding the server's TSO pieces and a peer's keeps them apart: a run is joined
    under its first piece's headers, so a peer's piece continuing the server's burst would
    otherwise pass its payload off as sent by the server's sender."""
    send, receive = ncctl.secrets.token_bytes(32), ncctl.secrets.token_bytes(32)
    server_keys = ncctl.DatagramKeys.for_server(99, send, receive)
    path = ncctl.DatagramPath("127.0.0.1", 9, ncctl.DatagramKeys.for_node(99, send, receive), "auto", "t")
    server, a = ncctl.DatagramSocket(), Node(A_IP)
    try:
        port = path.sock.sock.getsockname()[1]
        b_private, b_share = ncctl.new_x25519()
        path.peers = ncctl.PeerTable(path.sock, b_private, b_share, B_IP, ncctl.collections.Counter())
        path.peers.add(a.info(), 0.0)
        a.table.add(ncctl.PeerInfo(B_IP, b_share, (("127.0.0.1", port),), False), 0.0)
        to_path = ncctl.udp_address(server.sock, "127.0.0.1", port)
        server.send(server_keys.seal([tcp_piece(C_IP, B_IP, 0, 0)]), to_path)
        a.table.peers[B_IP].send_to([tcp_piece(A_IP, B_IP, 0, 1)], ncctl.udp_address(a.sock.sock, "127.0.0.1", port))
        frames: list[bytes] = []
        deadline = ncctl.time.monotonic() + 2
        while len(frames) < 3 and ncctl.time.monotonic() < deadline:
            frames += path.receive(8)
        assert ncctl.RUN_BREAK in frames
        assert len([f for f in ncctl.coalesce_pieces(frames) if f[0] == ncctl.FRAME_GSO_PACKET]) == 2
    finally:
        path.close()
        server.close()
        a.sock.close()


class FakeSession:
    """What PeerIntroductions reads and writes of a ServerSession."""

    def __init__(self, ip: int, plane: object) -> None:
        self.ip, self.plane, self.detached, self.direct_peers, self.sent = ip, plane, False, (), []

    def queue(self, frame: bytes) -> None:
        self.sent.append(frame)


def test_the_server_keeps_of_a_direct_peers_report_only_peers_it_introduced() -> None:
    """The node list shows what a node reports, but only addresses of peers the server
    introduced to that node: a foreign, malformed or repeated entry is left out, and a
    report that is not a list, or longer than a node ever sends, changes nothing."""
    plane = types.SimpleNamespace(by_ip={})
    a, b, c, stranger = (FakeSession(ip, plane) for ip in (A_IP, B_IP, C_IP, C_IP + 1))
    plane.by_ip.update({s.ip: s for s in (a, b, c, stranger)})
    introductions = ncctl.PeerIntroductions(set())
    for peer in (b, c):
        introductions.told.setdefault(a, set()).add(peer)
        introductions.told.setdefault(peer, set()).add(a)
    known = ncctl.functools.partial(introductions.introduced, a)
    reported = ["10.1.1.3", "10.1.1.3", "10.1.1.5", "10.1.1.2", "10.1.1.9", "010.1.1.4", " 10.1.1.4", "::1"]
    reported += [7, None, ["10.1.1.4"], {}, "x" * 100]
    assert ncctl.reported_direct_peers(reported, known) == ("10.1.1.3",)  # 10.1.1.5: on the network, not introduced
    assert ncctl.reported_direct_peers(["10.1.1.4", "10.1.1.3"], known) == ("10.1.1.4", "10.1.1.3")
    assert ncctl.reported_direct_peers([], known) == ()
    for junk in ("10.1.1.3", {"10.1.1.3": 1}, 3, None, ["10.1.1.3"] * (ncctl.MAX_DIRECT_PEERS_REPORTED + 1)):
        assert ncctl.reported_direct_peers(junk, known) is None
    assert ncctl.reported_direct_peers(["10.1.1.3"], ncctl.functools.partial(introductions.introduced, stranger)) == ()
    a.direct_peers, b.direct_peers = ("10.1.1.3", "10.1.1.4"), ("10.1.1.2",)
    introductions.withdraw(c)  # c's session ended: no one shows a direct path to it
    assert a.direct_peers == ("10.1.1.3",) and ncctl.reported_direct_peers(["10.1.1.4"], known) == ()
    introductions.withdraw(a)
    assert a.direct_peers == () and b.direct_peers == ()


def test_a_node_reports_its_direct_peers_when_they_change_at_most_every_second(pair: tuple[Node, Node]) -> None:
    a, b = pair
    assert b.table.direct_report(0.0) is None  # nothing sent, nothing direct: nothing to say
    pong = ncctl.encode_frame(ncctl.FRAME_DIRECT_PROBE, bytes((ncctl.DIRECT_PONG,)))
    deliver(a, b, [pong])
    report = b.table.direct_report(0.5)
    assert report is not None
    assert ncctl.decode_control(report[4:]) == {"directBytes": 0, "directPeers": ["10.1.1.2"]}
    assert b.table.direct_report(0.6) is None  # unchanged
    b.table.peers[A_IP].state = ncctl.DirectPeer.DOWN
    assert b.table.direct_report(1.0) is None  # changed, but within DIRECT_PEERS_REPORT_S of the last
    report = b.table.direct_report(0.5 + ncctl.DIRECT_PEERS_REPORT_S)
    assert report is not None and ncctl.decode_control(report[4:])["directPeers"] == []


def test_a_flood_of_direct_peers_reports_costs_one_check_a_second() -> None:
    """Reports are kept as said and checked at the next tick (once a second): the last one
    counts, and a node that sends thousands costs the loop no more than one."""
    plane = types.SimpleNamespace(by_ip={})
    a, b = FakeSession(A_IP, plane), FakeSession(B_IP, plane)
    plane.by_ip.update({s.ip: s for s in (a, b)})
    introductions = ncctl.PeerIntroductions(set())
    introductions.told.setdefault(a, set()).add(b)
    introductions.told.setdefault(b, set()).add(a)
    checks = []
    real = introductions.introduced
    introductions.introduced = lambda session, address: checks.append(address) or real(session, address)  # type: ignore[method-assign]
    for _ in range(5000):
        introductions.said_direct(a, ["10.1.1.9"] * ncctl.MAX_DIRECT_PEERS_REPORTED)
    introductions.said_direct(a, ["10.1.1.3"])
    introductions.said_direct(a, "not a list")  # ignored: the report before it stands
    assert checks == [] and a.direct_peers == ()
    introductions.tick(0.0)
    assert checks == ["10.1.1.3"] and a.direct_peers == ("10.1.1.3",)
