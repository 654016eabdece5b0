"""The UDP data path's datagram layer (wire protocol section of ncctl.py): key agreement,
sealing, the replay window and the handshake fields, checked with hypothesis. Every way a
datagram can be wrong ends in BadDatagram with a reason the server counts."""

from __future__ import annotations

import base64
import contextlib
import json
import random
import socket
import struct
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ncctl

TOKEN = "a" * ncctl.NODE_TOKEN_LEN
SESSION_ID = 0x1234ABCD


def session_pair(session_id: int = SESSION_ID, token: str = TOKEN) -> tuple[ncctl.DatagramKeys, ncctl.DatagramKeys]:
    """(node side, server side) of one session, agreed the way HELLO and WELCOME agree them."""
    node_private, node_share = ncctl.new_x25519()
    server_private, server_share = ncctl.new_x25519()
    transcript = ncctl.datagram_transcript(node_share, server_share, session_id, token)
    node_keys = ncctl.datagram_keys(node_private, server_share, transcript)
    server_keys = ncctl.datagram_keys(server_private, node_share, transcript)
    assert node_keys == server_keys
    return ncctl.DatagramKeys.for_node(session_id, *node_keys), ncctl.DatagramKeys.for_server(session_id, *server_keys)


def frame(payload: bytes) -> bytes:
    return ncctl.encode_frame(ncctl.FRAME_PACKET, payload)


def seal(keys: ncctl.DatagramKeys, frame: bytes) -> bytes:
    return keys.seal([frame])[0]


def open_datagram(keys: ncctl.DatagramKeys, datagram: bytes) -> bytes:
    """What the server does with one datagram: its header read, then one tag check."""
    header = ncctl.datagram_header(datagram)
    if header is None:
        raise ncctl.BadDatagram("malformed")
    return keys.open(datagram, header[1])


def reason(keys: ncctl.DatagramKeys, datagram: bytes) -> str:
    with pytest.raises(ncctl.BadDatagram) as caught:
        open_datagram(keys, datagram)
    return caught.value.reason


@given(st.lists(st.binary(max_size=1500), min_size=1, max_size=20))
@settings(max_examples=50, deadline=None)
def test_sealed_frames_open_on_the_other_side_in_both_directions(payloads: list[bytes]) -> None:
    node, server = session_pair()
    for payload in payloads:
        assert open_datagram(server, seal(node, frame(payload))) == frame(payload)
        assert open_datagram(node, seal(server, frame(payload))) == frame(payload)


def test_each_direction_has_its_own_key() -> None:
    node, _server = session_pair()
    sealed = seal(node, frame(b"up"))
    assert reason(node, sealed) == "forged"  # the node cannot open what it sealed: a reflected datagram is refused


def test_counters_grow_and_are_the_nonce() -> None:
    node, _server = session_pair()
    counters = [ncctl.DATAGRAM_HEADER.unpack_from(seal(node, frame(b"x")))[2] for _ in range(5)]
    assert counters == [0, 1, 2, 3, 4]


def test_a_replayed_datagram_is_dropped() -> None:
    node, server = session_pair()
    sealed = seal(node, frame(b"once"))
    open_datagram(server, sealed)
    assert reason(server, sealed) == "replayed"


@given(st.permutations(range(64)))
@settings(max_examples=50, deadline=None)
def test_reordered_datagrams_within_the_window_are_all_taken_once(order: list[int]) -> None:
    node, server = session_pair()
    sealed = [seal(node, frame(bytes([i]))) for i in range(64)]
    for i in order:
        assert open_datagram(server, sealed[i]) == frame(bytes([i]))
    for i in order[:8]:
        assert reason(server, sealed[i]) == "replayed"


def test_a_datagram_older_than_the_window_is_dropped() -> None:
    node, server = session_pair()
    old = seal(node, frame(b"old"))
    node.sent = ncctl.REPLAY_WINDOW + 10
    open_datagram(server, seal(node, frame(b"new")))
    assert reason(server, old) == "replayed"


@given(st.binary(max_size=200), st.data())
@settings(max_examples=100, deadline=None)
def test_any_flipped_bit_is_a_forgery(payload: bytes, data: st.DataObject) -> None:
    node, server = session_pair()
    sealed = bytearray(seal(node, frame(payload)))
    bit = data.draw(st.integers(8 * 8, 8 * len(sealed) - 1))  # past type and session: those pick the session
    sealed[bit // 8] ^= 1 << (bit % 8)
    assert reason(server, bytes(sealed)) in ("forged", "replayed")  # a flipped counter may also look old
    assert open_datagram(server, seal(node, frame(b"after"))) == frame(b"after")  # a forgery moved no window


@given(st.integers(0, 60))
def test_a_truncated_datagram_is_dropped(length: int) -> None:
    node, server = session_pair()
    sealed = seal(node, frame(b"p" * 40))
    cut = sealed[:length]
    if ncctl.datagram_header(cut) is None:
        return  # too short to name a session: dropped before any lookup
    assert reason(server, cut) == "forged"


def test_a_datagram_of_another_session_fails_its_tag() -> None:
    node_a, _server_a = session_pair(1)
    _node_b, server_b = session_pair(2)
    sealed = bytearray(seal(node_a, frame(b"cross")))
    sealed[4:8] = (2).to_bytes(4, "big")  # relabelled for session 2
    assert reason(server_b, bytes(sealed)) == "forged"
    assert reason(server_b, seal(node_a, frame(b"as is"))) == "forged"


def test_a_different_transcript_gives_different_keys() -> None:
    node_private, node_share = ncctl.new_x25519()
    _server_private, server_share = ncctl.new_x25519()
    one = ncctl.datagram_keys(node_private, server_share, ncctl.datagram_transcript(node_share, server_share, 1, TOKEN))
    two = ncctl.datagram_keys(node_private, server_share, ncctl.datagram_transcript(node_share, server_share, 2, TOKEN))
    assert one != two and one[0] != one[1]


def test_a_low_order_share_is_refused() -> None:
    private, _share = ncctl.new_x25519()
    with pytest.raises(ncctl.BadDatagram):
        ncctl.datagram_keys(private, bytes(32), b"t")


def test_the_counter_never_wraps() -> None:
    node, _server = session_pair()
    node.sent = ncctl.COUNTER_LIMIT
    with pytest.raises(ncctl.BadDatagram):
        seal(node, frame(b"x"))


def test_keys_wear_out_long_before_the_counter_limit() -> None:
    node, _server = session_pair()
    assert not node.worn(node.born)
    assert node.worn(node.born + ncctl.REKEY_AFTER_S)
    node.sent = ncctl.REKEY_AFTER_DATAGRAMS
    assert node.worn(node.born) and ncctl.REKEY_AFTER_DATAGRAMS < ncctl.COUNTER_LIMIT >> 16


@given(st.binary(max_size=120))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_open(datagram: bytes) -> None:
    _node, server = session_pair()
    if ncctl.datagram_header(datagram) is None:
        return
    with pytest.raises(ncctl.BadDatagram):
        open_datagram(server, datagram)


@given(st.integers(0, 2**64 - 1), st.lists(st.integers(0, 2**64 - 1), max_size=50))
@settings(max_examples=200, deadline=None)
def test_the_window_takes_each_counter_at_most_once(first: int, counters: list[int]) -> None:
    window = ncctl.ReplayWindow(64)
    taken: set[int] = set()
    for counter in [first, *counters]:
        if window.fresh(counter):
            assert counter not in taken
            window.accept(counter)
            taken.add(counter)
    assert window.top == max(taken)


@given(st.sampled_from([64, 100, 4096]), st.integers(0, 2**63), st.lists(st.integers(0, 9000), max_size=300))
@settings(max_examples=200, deadline=None)
def test_the_window_remembers_exactly_the_last_size_counters(size: int, base: int, offsets: list[int]) -> None:
    """Against a model that keeps every counter: fresh means newer than all, or within
    `size` of the newest and never seen; the ring of words forgets nothing sooner."""
    window, seen, top = ncctl.ReplayWindow(size), set(), -1
    for counter in (base + offset for offset in offsets):
        expected = counter > top or (top - counter < size and counter not in seen)
        assert window.fresh(counter) == expected
        if expected:
            window.accept(counter)
            seen.add(counter)
            top = max(top, counter)


@given(
    st.sampled_from([64, 100, 4096]),
    st.integers(0, 2**63),
    st.lists(st.tuples(st.integers(0, 9000), st.integers(1, 300)), max_size=40),
    st.lists(st.integers(0, 9500), max_size=60),
)
@settings(max_examples=200, deadline=None)
def test_a_run_accepted_at_once_is_the_same_as_accepted_one_by_one(
    size: int, base: int, runs: list[tuple[int, int]], probes: list[int]
) -> None:
    together, one_by_one = ncctl.ReplayWindow(size), ncctl.ReplayWindow(size)
    for offset, count in runs:
        first = base + offset
        if first <= together.top:
            continue  # accept_run is only asked for counters newer than all seen
        together.accept_run(first, count)
        for counter in range(first, first + count):
            one_by_one.accept(counter)
        assert together.top == one_by_one.top
    for probe in probes:
        assert together.fresh(base + probe) == one_by_one.fresh(base + probe)


def open_read(keys: dict[int, ncctl.DatagramKeys], datagrams: list[bytes]) -> tuple[list[bytes], list[str]]:
    """What the server does with one read: (the frames that authenticated, drop reasons)."""
    dropped: list[str] = []
    views = [memoryview(datagram) for datagram in datagrams]
    frames = [f for _keys, opened, _size in ncctl.open_datagrams(views, keys.get, dropped.append) for f in opened]
    return frames, dropped


def test_a_read_of_consecutive_datagrams_opens_together_and_counts_every_byte() -> None:
    node, server = session_pair()
    frames = [frame(bytes([i]) * 1300) for i in range(40)]
    datagrams = node.seal(frames)
    runs = list(ncctl.open_datagrams([memoryview(d) for d in datagrams], {SESSION_ID: server}.get, print))
    assert [(keys, opened, size) for keys, opened, size in runs] == [(server, frames, sum(map(len, datagrams)))]
    assert open_read({SESSION_ID: server}, datagrams) == ([], ["replayed"] * 40)  # the window moved for all


@given(st.integers(2, 30), st.data())
@settings(max_examples=100, deadline=None)
def test_a_forged_datagram_in_a_read_costs_one_tag_check_and_nothing_else(count: int, data: st.DataObject) -> None:
    node, server = session_pair()
    frames = [frame(bytes([i]) * 100) for i in range(count)]
    datagrams = node.seal(frames)
    bad = data.draw(st.integers(0, count - 1))
    forged = bytearray(datagrams[bad])
    forged[-1] ^= 1
    datagrams[bad] = bytes(forged)
    checks = []
    real_decrypt = server.opener.decrypt

    class Counting:
        def decrypt(self, *args: object) -> bytes:
            checks.append(1)
            return real_decrypt(*args)

    server.opener = Counting()
    opened, dropped = open_read({SESSION_ID: server}, datagrams)
    assert opened == frames[:bad] + frames[bad + 1 :]
    assert dropped == ["forged"]
    assert len(checks) == count  # one tag check per datagram, the forged one's included


@given(st.permutations(list(range(12))), st.integers(0, 12))
@settings(max_examples=100, deadline=None)
def test_a_read_of_any_order_mix_and_junk_opens_each_authentic_datagram_once(order: list[int], junk_at: int) -> None:
    node, server = session_pair()
    other_node, other_server = session_pair(SESSION_ID + 1)
    frames = [frame(bytes([i]) * 200) for i in range(12)]
    mine, theirs = node.seal(frames[:6]), other_node.seal(frames[6:])
    datagrams = [(mine + theirs)[i] for i in order]
    datagrams.insert(junk_at, b"\x01" + bytes(40))
    keys = {SESSION_ID: server, SESSION_ID + 1: other_server}
    opened, dropped = open_read(keys, datagrams + datagrams)  # and the same again: replays
    assert sorted(opened) == sorted(frames)
    assert sorted(dropped) == sorted(["unknown-session"] * 2 + ["replayed"] * 12)


def test_an_authentic_datagram_holding_a_broken_frame_is_counted_and_the_rest_arrive() -> None:
    node, server = session_pair()
    frames = [frame(b"a" * 100), frame(b"b" * 100)[:-1], frame(b"c" * 100)]
    opened, dropped = open_read({SESSION_ID: server}, node.seal(frames))
    assert opened == [frames[0], frames[2]]
    assert dropped == ["not-one-frame"]


def test_hello_and_welcome_carry_the_shares() -> None:
    _private, share = ncctl.new_x25519()
    hello = ncctl.Hello(TOKEN, udp_key=share)
    assert ncctl.Hello.decode(hello.encode()[4:]).udp_key == share
    welcome = ncctl.Welcome(
        "10.1.0.2", 16, "10.1.0.1", 1400, 10, caps=("udp",), udp_key=share, udp_session=7, udp_port=6441
    )
    back = ncctl.Welcome.decode(welcome.encode()[4:])
    assert (back.udp_key, back.udp_session, back.udp_port) == (share, 7, 6441)


def test_a_hello_offering_udp_without_a_share_gets_no_udp() -> None:
    message = {"proto": 1, "nodeToken": TOKEN, "caps": ["gso", "udp"], "udpKey": "not base64!"}
    assert ncctl.Hello.decode(json.dumps(message).encode()).caps == ("gso",)


@pytest.mark.parametrize(
    "fields",
    [{}, {"udpKey": base64.b64encode(bytes(31)).decode(), "udpSession": 1, "udpPort": 1}, {"udpSession": 0}],
)
def test_a_welcome_agreeing_on_udp_without_valid_fields_is_refused(fields: dict) -> None:
    message = {"ip": "10.1.0.2", "prefix": 16, "serverIp": "10.1.0.1", "mtu": 1400, "caps": ["udp"]}
    message.update({"udpKey": base64.b64encode(bytes(range(32))).decode(), "udpSession": 5, "udpPort": 6441})
    message.update(fields)
    if not fields:
        assert ncctl.Welcome.decode(json.dumps(message).encode()).udp_session == 5
        return
    with pytest.raises(ncctl.ProtocolError):
        ncctl.Welcome.decode(json.dumps(message).encode())


def test_old_peers_never_see_the_udp_fields() -> None:
    welcome = ncctl.Welcome("10.1.0.2", 16, "10.1.0.1", 1400, 10, caps=("gso",))
    assert "udpKey" not in json.loads(welcome.encode()[4:])
    assert "udpKey" not in json.loads(ncctl.Hello(TOKEN, caps=("gso",)).encode()[4:])


# -- userspace GRO ------------------------------------------------------------------------


def tcp_super_packet(payload: bytes, flags: int, options: bytes, seq: int, ip_id: int) -> bytes:
    """A well-formed IPv4/TCP packet (checksums right) from 198.18.0.2:40000 to 10.1.1.1:5201."""
    thl = 20 + len(options)
    tcp = bytearray(
        struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, (thl // 4) << 4, flags, 512, 0, 0) + options + payload
    )
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ip_id, 0x4000, 64, 6, 0,
                               bytes([198, 18, 0, 2]), bytes([10, 1, 1, 1])))  # fmt: skip
    ip[10:12] = ncctl.checksum(ip).to_bytes(2, "big")
    pseudo = bytes(ip[12:20]) + bytes((0, 6)) + len(tcp).to_bytes(2, "big")
    tcp[16:18] = ncctl.checksum(pseudo + tcp).to_bytes(2, "big")
    return bytes(ip + tcp)


SUPER_PACKETS = st.builds(
    tcp_super_packet,
    st.binary(min_size=1, max_size=20000),
    st.sampled_from([0x10, 0x18]),
    st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(range(8))]),
    st.integers(0, 2**32 - 1),
    st.integers(0, 0xFFFF),
)


def plain(packets: list[bytes]) -> list[bytes]:
    return [ncctl.ZERO_VNET_HDR + p for p in packets]


@given(SUPER_PACKETS, st.integers(ncctl.GSO_MIN_SIZE, 1400))
@settings(max_examples=100, deadline=None)
def test_gro_rebuilds_the_super_packet_that_segmentation_cut(packet: bytes, mss: int) -> None:
    """Segments cut from one super-packet coalesce back into one, which the server's own
    GSO check accepts and which segments into exactly the same packets again."""
    segments = ncctl.segment_tcp4(packet, mss)
    (merged,) = ncctl.coalesce_tcp4(plain(segments))
    ncctl.gso_header(merged, 1400 + 40)
    assert ncctl.plain_packets(merged) == segments


def pieces_of(packet: bytes, mss: int, burst: int = 7) -> list[bytes]:
    vnet = ncctl.VNET_HDR.pack(ncctl.VNET_F_NEEDS_CSUM, ncctl.GSO_TCPV4, 40, mss, 20, 16)
    return ncctl.datagram_frames(vnet + packet, 1400, True, burst)


def completed(frames: list) -> list[bytes]:
    """What a receiver's kernel makes of GSO frames: each checked, segmented, checksummed."""
    return [p for f in frames for p in ncctl.plain_packets(ncctl.gso_header(f[4:], 1400 + 40) + f[14:])]


@given(SUPER_PACKETS, st.integers(ncctl.GSO_MIN_SIZE, 1400))
@settings(max_examples=100, deadline=None)
def test_pieces_are_the_segments_a_full_segmentation_makes(packet: bytes, mss: int) -> None:
    """A super-packet leaves as tagged pieces, one per segment, whose checksums the
    receiver completes (the sender sums no payload): alone, each completes to exactly
    the segment full segmentation gives; together they join into one super-packet."""
    pieces = pieces_of(packet, mss)
    full = ncctl.segment_tcp4(packet, mss)
    assert all(ncctl.checksum(p[:20]) == 0xFFFF for p in full)  # IP headers sum to all ones: valid
    assert [ncctl.PIECE_TAG.unpack_from(p, 4) for p in pieces] == [(7, i) for i in range(len(full))]
    assert all(p[0] == ncctl.FRAME_TSO_PIECE and len(p) <= ncctl.PIECE_START + 40 + mss for p in pieces)
    assert completed([ncctl.lone_piece(p) for p in pieces]) == full
    (joined,) = ncctl.coalesce_pieces(pieces)
    assert completed([joined]) == full
    vnet = ncctl.VNET_HDR.pack(ncctl.VNET_F_NEEDS_CSUM, ncctl.GSO_TCPV4, 40, mss, 20, 16)
    assert [f[4:] for f in ncctl.datagram_frames(vnet + packet, 1400, False, 0)] == full


@given(st.lists(st.tuples(SUPER_PACKETS, st.integers(ncctl.GSO_MIN_SIZE, 1400)), min_size=1, max_size=3), st.data())
@settings(max_examples=100, deadline=None)
def test_lost_and_foreign_pieces_split_runs_but_lose_and_reorder_nothing(cases: list, data: st.DataObject) -> None:
    """Pieces of several bursts with some lost, some frames of other kinds between them:
    every piece that arrived completes to its segment, in arrival order, and only
    consecutive pieces of one burst are joined."""
    arrived, expected = [], []
    for burst, (packet, mss) in enumerate(cases):
        pieces, segments = list(pieces_of(packet, mss, burst)), list(ncctl.segment_tcp4(packet, mss))
        assert len(pieces) == len(segments)  # zip(strict=True) is 3.10's
        for piece, segment in zip(pieces, segments):
            if data.draw(st.booleans(), "lost"):
                continue
            arrived.append(piece)
            expected.append(segment)
        if data.draw(st.booleans(), "a keepalive between"):
            arrived.append(ncctl.encode_frame(ncctl.FRAME_KEEPALIVE))
    out = ncctl.coalesce_pieces(arrived)
    assert completed([f for f in out if f[0] == ncctl.FRAME_GSO_PACKET]) == expected
    assert [f for f in out if f[0] != ncctl.FRAME_GSO_PACKET] == [f for f in arrived if f[0] != ncctl.FRAME_TSO_PIECE]
    assert len(out) <= len(arrived)


PIECE_TAGS = st.tuples(st.integers(0, 2), st.integers(0, 3))
HOSTILE_PIECES = st.lists(
    st.one_of(
        st.builds(lambda tag, body: ncctl.encode_frame(ncctl.FRAME_TSO_PIECE, ncctl.PIECE_TAG.pack(*tag) + body),
                  PIECE_TAGS, st.binary(max_size=200)),
        st.builds(lambda tag, header, n: ncctl.encode_frame(ncctl.FRAME_TSO_PIECE, ncctl.PIECE_TAG.pack(*tag) + header + bytes(n)),
                  PIECE_TAGS, st.binary(min_size=40, max_size=80).map(lambda h: b"\x45" + h[1:9] + b"\x06" + h[10:]),
                  st.sampled_from([0, 1, 600, 1400])),
        st.just(ncctl.encode_frame(ncctl.FRAME_KEEPALIVE)),
    ),
    max_size=30,
)  # fmt: skip


@given(HOSTILE_PIECES)
@settings(max_examples=300, deadline=None)
def test_pieces_a_peer_made_up_never_break_the_receiver(frames: list[bytes]) -> None:
    """Whatever an authenticated peer puts in its pieces and tags, joining raises nothing
    and yields only frames the GSO check then accepts or refuses with BadFrame."""
    for frame in ncctl.coalesce_pieces(frames):
        assert frame[0] in (ncctl.FRAME_GSO_PACKET, ncctl.FRAME_KEEPALIVE)
        if frame[0] == ncctl.FRAME_GSO_PACKET:
            with contextlib.suppress(ncctl.BadFrame):
                ncctl.gso_header(frame[4:], 1400)


def test_a_run_of_pieces_never_joins_past_64_kib() -> None:
    """A peer that numbers 200 full pieces as one burst gets several super-packets, each
    within an IPv4 packet's length, instead of an overflow."""
    segment = bytearray(40 + 1000)
    segment[0], segment[9], segment[32] = 0x45, 6, 0x50
    pieces = [ncctl.encode_frame(ncctl.FRAME_TSO_PIECE, ncctl.PIECE_TAG.pack(9, i) + segment) for i in range(200)]
    joined = ncctl.coalesce_pieces(pieces)
    assert len(joined) > 1 and all(len(f) - 4 - ncctl.VNET_HDR_LEN <= 65535 for f in joined)
    assert sum(len(f) - 4 - ncctl.VNET_HDR_LEN - 40 for f in joined) == 200 * 1000


def test_a_piece_that_is_not_tcp_is_passed_on_for_the_gso_check_to_refuse() -> None:
    odd = ncctl.encode_frame(ncctl.FRAME_TSO_PIECE, ncctl.PIECE_TAG.pack(1, 0) + b"\x45" + bytes(59))
    (frame,) = ncctl.coalesce_pieces([odd])
    with pytest.raises(ncctl.BadFrame):
        ncctl.gso_header(frame[4:], 1400)


@given(st.lists(st.tuples(SUPER_PACKETS, st.integers(ncctl.GSO_MIN_SIZE, 1400)), max_size=4), st.randoms())
@settings(max_examples=100, deadline=None)
def test_gro_keeps_every_packet_and_the_order_within_each_flow(cases: list, rng: random.Random) -> None:
    """Shuffled segments of several packets, plus one that is not TCP: nothing is lost or reordered."""
    packets = [s for packet, mss in cases for s in ncctl.segment_tcp4(packet, mss)]
    packets.append(b"\x45" + bytes(27))  # not TCP: passed on as it is
    rng.shuffle(packets)
    merged = ncctl.coalesce_tcp4(plain(packets))
    assert [p for m in merged for p in ncctl.plain_packets(m)] == packets  # only neighbours merge
    assert len(merged) <= len(packets)


def test_a_node_seals_with_rekeyed_keys_and_still_opens_late_old_datagrams() -> None:
    """The node's side of a rekey: the server's answer installs new keys for sealing, and
    the old ones keep opening datagrams already on their way for a while."""
    node_keys, server_keys = session_pair()
    path = ncctl.DatagramPath("198.18.0.1", 6441, node_keys, "auto", TOKEN)
    try:
        path.keys.born -= ncctl.REKEY_AFTER_S
        request = path.rekey_request(path.keys.born + ncctl.REKEY_AFTER_S)
        assert request is not None and request[0] == ncctl.FRAME_REKEY
        node_share = base64.b64decode(json.loads(request[4:])["udpKey"])
        assert path.rekey_request(0.0) is None  # one at a time
        server_private, server_share = ncctl.new_x25519()
        transcript = ncctl.datagram_transcript(node_share, server_share, 99, TOKEN)
        server_new = ncctl.DatagramKeys.for_server(99, *ncctl.datagram_keys(server_private, node_share, transcript))
        answer = {"udpKey": base64.b64encode(server_share).decode(), "udpSession": 99}
        path.on_rekey(answer, 100.0)
        assert path.keys.session_id == 99
        assert open_datagram(server_new, seal(path.keys, frame(b"new"))) == frame(b"new")
        late = seal(server_keys, frame(b"late"))
        assert open_datagram(path.openers[SESSION_ID], late) == frame(b"late")
        path.tick(100.0 + ncctl.UDP_OLD_KEYS_S)
        assert set(path.openers) == {99}
    finally:
        path.close()


def test_a_node_that_only_sends_still_asks_for_an_answer_each_second() -> None:
    """A one-way flow (data only leaves the node) must not look like a silent path: while
    nothing came back for a second the node adds a keepalive, which the server answers."""
    node_keys, _server_keys = session_pair()
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(2)
    path = ncctl.DatagramPath("127.0.0.1", receiver.getsockname()[1], node_keys, "auto", TOKEN)
    try:
        now = time.monotonic()
        path.state, path.last_tx, path.last_rx = path.UP, now, now - ncctl.UDP_PING_S
        assert path.tick(now) is None
        datagram = receiver.recv(2048)
        assert open_datagram(_server_keys, datagram) == ncctl.encode_frame(ncctl.FRAME_KEEPALIVE)
        path.last_rx = path.last_tx = now
        path.tick(now)  # traffic both ways: nothing extra
        receiver.settimeout(0.2)
        with pytest.raises(socket.timeout):  # a TimeoutError from 3.10 on, an OSError on 3.9
            receiver.recv(2048)
    finally:
        path.close()
        receiver.close()


def test_a_batch_ending_in_a_shorter_datagram_arrives_as_the_same_datagrams() -> None:
    """A super-packet's pieces and the ping after them leave in one UDP_SEGMENT send (the
    last datagram shorter) and come back from one read: each exactly as sent, the short
    one not padded with what the read buffer held before."""
    receiver, sender = ncctl.DatagramSocket(), ncctl.DatagramSocket()
    try:
        sent = [bytes([i]) * 1446 for i in range(44)] + [b"\xee" * 130, b"\x01" * 1446, b"\x02" * 99]
        for _ in range(2):  # the second read finds the first one's bytes in the buffer
            address = ncctl.udp_address(sender.sock, "127.0.0.1", receiver.sock.getsockname()[1])
            assert sender.send(sent, address) == len(sent)
            got: list[bytes] = []
            deadline = time.monotonic() + 5
            while len(got) < len(sent) and time.monotonic() < deadline:
                got += [bytes(d) for datagrams, _source, _local in receiver.receive(64) for d in datagrams]
                time.sleep(0.01)
            assert got == sent
    finally:
        receiver.close()
        sender.close()


def newest_runs(server: ncctl.DatagramKeys, datagrams: list[bytes]) -> list[tuple[int, bool]]:
    """(frames, newer than any before) of each run of one read, as the server opens it."""
    views = [memoryview(d) for d in datagrams]
    return [(len(f), newest) for _k, f, _s, newest in ncctl.open_newest(views, {SESSION_ID: server}.get, print)]


def test_only_a_datagram_newer_than_any_seen_is_the_sessions_newest() -> None:
    """A datagram captured on its way (never seen by the server) and replayed after newer
    ones arrived still opens, but is not the newest: it may not move the session's address."""
    node, server = session_pair()
    held, *later = node.seal([frame(bytes([i]) * 100) for i in range(3)])
    assert newest_runs(server, later) == [(2, True)]
    assert newest_runs(server, [held]) == [(1, False)]  # authentic, unseen, older: opened, not newest
    assert newest_runs(server, node.seal([frame(b"next")])) == [(1, True)]
    assert newest_runs(server, [held]) == []  # and once seen, a replay


def test_an_empty_datagram_is_read_past_and_the_next_one_arrives() -> None:
    """A zero-length datagram (anyone may send one to the data port) carries nothing: the
    read goes on to the next datagram instead of failing the loop's receive."""
    receiver, sender = ncctl.DatagramSocket(), ncctl.DatagramSocket()
    try:
        address = ncctl.udp_address(sender.sock, "127.0.0.1", receiver.sock.getsockname()[1])
        sender.sock.sendto(b"", address)
        sender.sock.sendto(b"after", address)
        got: list[bytes] = []
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            got += [bytes(d) for datagrams, _source, _local in receiver.receive(64) for d in datagrams]
            time.sleep(0.01)
        assert got == [b"after"]
    finally:
        receiver.close()
        sender.close()


@given(st.sets(st.integers(1, 62), max_size=6))
@settings(max_examples=40, deadline=None)
def test_a_read_with_lost_datagrams_opens_run_by_run_in_order(lost: set[int]) -> None:
    """A GRO read whose counters jump where datagrams were lost on the way opens as its
    runs of consecutive counters, each together, in order (not one datagram at a time)."""
    node, server = session_pair()
    frames = [frame(bytes([i]) * 1300) for i in range(64)]
    arrived = [d for i, d in enumerate(node.seal(frames)) if i not in lost]
    runs = list(ncctl.open_datagrams([memoryview(d) for d in arrived], {SESSION_ID: server}.get, print))
    breaks = len([i for i in lost if i - 1 not in lost])  # each stretch of lost datagrams starts a new run
    assert len(runs) == 1 + breaks
    assert [f for _keys, opened, _size in runs for f in opened] == [f for i, f in enumerate(frames) if i not in lost]
    assert sum(size for _keys, _opened, size in runs) == sum(map(len, arrived))
    assert (server.received, server.gaps) == (64 - len(lost), breaks)


@pytest.mark.parametrize("batched", [True, False])
def test_reads_from_one_source_come_as_one_batch_and_each_source_apart(batched: bool) -> None:
    """Datagrams the host's GRO did not join (one per read) come from receive() together
    while one source sent them, each exactly as sent and in order; another source's
    datagrams start a batch of their own, and more than the buffer holds still arrive
    (through recvmmsg, and one recvmsg a read)."""
    receiver, first, second = ncctl.DatagramSocket(), ncctl.DatagramSocket(), ncctl.DatagramSocket()
    receiver = receiver if batched else one_by_one(receiver)
    try:
        address = ncctl.udp_address(first.sock, "127.0.0.1", receiver.sock.getsockname()[1])
        plan = [(first, b"a1"), (first, b"a2" * 700), (first, b"a3"), (second, b"b1"), (second, b"b2"), (first, b"a4")]
        for sender, payload in plan:
            sender.sock.sendto(payload, address)
        time.sleep(0.05)
        batches = [[bytes(d) for d in datagrams] for datagrams, _source, _local in receiver.receive(64)]
        assert batches == [[b"a1", b"a2" * 700, b"a3"], [b"b1", b"b2"], [b"a4"]]
        big = [bytes([i % 256]) * 60000 for i in range(9)]  # past the buffer: it is used again
        for payload in big:
            first.sock.sendto(payload, address)
        time.sleep(0.05)
        assert [bytes(d) for datagrams, _s, _l in receiver.receive(64) for d in datagrams] == big
    finally:
        for sock in (receiver, first, second):
            sock.close()


def one_by_one(sock: ncctl.DatagramSocket) -> ncctl.DatagramSocket:
    """The socket reading a datagram per recvmsg, as where recvmmsg cannot be used."""
    sock.many = None
    sock.view = memoryview(bytearray(ncctl.UDP_RECEIVE_BUFFER))
    return sock


def received(receiver: ncctl.DatagramSocket, expected: int) -> list[tuple[list[bytes], Any, Any]]:
    batches: list[tuple[list[bytes], Any, Any]] = []
    deadline = time.monotonic() + 5
    while sum(len(b) for b, _s, _l in batches) < expected and time.monotonic() < deadline:
        batches += [([bytes(d) for d in ds], source, local) for ds, source, local in receiver.receive(256)]
        time.sleep(0.01)
    return batches


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_recvmmsg_reads_what_recvmsg_reads_addresses_local_addresses_and_gro_runs_included(host: str) -> None:
    """The same traffic read both ways: a GRO run ending in a shorter datagram, two
    sources interleaved, on the server's socket that also names each read's local address."""
    results = []
    for batched in (True, False):
        receiver = ncctl.DatagramSocket(local_source=True)
        assert receiver.many is not None, "recvmmsg is not used on this host"
        receiver = receiver if batched else one_by_one(receiver)
        senders = [ncctl.DatagramSocket(), ncctl.DatagramSocket()]
        try:
            address = ncctl.udp_address(senders[0].sock, host, receiver.sock.getsockname()[1])
            run = [bytes([i]) * 1446 for i in range(20)] + [b"\xee" * 130]
            assert senders[0].send(run, address) == len(run)
            for n in range(30):
                senders[n % 3 == 2].sock.sendto(b"%d" % n, address)
            time.sleep(0.05)
            got = received(receiver, len(run) + 30)
            ports = {s.sock.getsockname()[1]: f"sender{i}" for i, s in enumerate(senders)}
            results.append([(datagrams, source[0], ports[source[1]], local) for datagrams, source, local in got])
        finally:
            for sock in (receiver, *senders):
                sock.close()
    batched_reads, one_by_one_reads = results
    flat = [(d, h, p, loc) for datagrams, h, p, loc in batched_reads for d in datagrams]
    assert flat == [(d, h, p, loc) for datagrams, h, p, loc in one_by_one_reads for d in datagrams]
    assert flat[0][1] in ("::ffff:127.0.0.1", "::1", "127.0.0.1") and flat[0][3] is not None
    assert [d for d, _h, p, _l in flat if p == "sender1"] == [b"%d" % n for n in range(30) if n % 3 == 2]


def test_more_reads_than_one_recvmmsg_takes_arrive_in_order_in_batches_no_larger() -> None:
    """A batch holds the reads of one system call (the next one reuses the buffers)."""
    receiver, sender = ncctl.DatagramSocket(), ncctl.DatagramSocket()
    try:
        address = ncctl.udp_address(sender.sock, "127.0.0.1", receiver.sock.getsockname()[1])
        sent = [b"%d" % n * 300 for n in range(3 * ncctl.UDP_RECEIVE_SLOTS + 5)]
        for payload in sent:
            sender.sock.sendto(payload, address)
        time.sleep(0.05)
        batches = received(receiver, len(sent))
        assert [d for datagrams, _s, _l in batches for d in datagrams] == sent
        assert max(len(datagrams) for datagrams, _s, _l in batches) <= ncctl.UDP_RECEIVE_SLOTS
    finally:
        receiver.close()
        sender.close()


def test_an_ipv4_socket_reads_its_sources_as_python_names_them() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.bind(("127.0.0.1", 0))
        sender.bind(("127.0.0.1", 0))
        many = ncctl.ManyMessages(receiver.fileno(), 0, lambda cmsgs: cmsgs)
        sender.sendto(b"one", receiver.getsockname())
        time.sleep(0.05)
        [(data, source, ancillary)] = many.read(8)
        assert (bytes(data), source, ancillary) == (b"one", sender.getsockname(), [])
        assert many.read(8) == []
    finally:
        receiver.close()
        sender.close()
