"""Groups (capability "groups", sections 9 and 10): a frame too big for one datagram is
sealed once and cut into datagrams; the receiver opens it once all of it came, in order,
however the reads split it. Every way a group can go wrong (a datagram lost, replayed,
forged, reordered, made up) loses at most that group, is counted, and never breaks the
session. GroupGate groups only while a path's received datagrams show a clean link."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_datagram import SESSION_ID, TOKEN, frame, open_read, session_pair

import ncctl

CHUNK = ncctl.group_chunk(1400)


def big_frame(size: int = 64000, fill: int | None = None) -> bytes:
    payload = os.urandom(size) if fill is None else bytes([fill]) * size
    return ncctl.encode_frame(ncctl.FRAME_GSO_PACKET, payload)


def open_reads(server: ncctl.DatagramKeys, reads: list[list[bytes]]) -> tuple[list[bytes], list[str]]:
    frames: list[bytes] = []
    dropped: list[str] = []
    for read in reads:
        opened, lost = open_read({SESSION_ID: server}, read)
        frames += opened
        dropped += lost
    return frames, dropped


def test_a_big_frame_leaves_as_datagrams_of_the_chunk_under_consecutive_counters() -> None:
    node, _server = session_pair()
    big = big_frame()
    datagrams = node.seal([big], CHUNK)
    count = -(-(len(big) + ncctl.DATAGRAM_TAG_LEN) // CHUNK)
    assert len(datagrams) == count == node.sent
    assert {len(d) for d in datagrams[:-1]} == {ncctl.GROUP_HEADER.size + CHUNK}
    assert len(datagrams[-1]) <= ncctl.GROUP_HEADER.size + CHUNK
    headers = [ncctl.GROUP_HEADER.unpack_from(d) for d in datagrams]
    assert headers == [(ncctl.DATAGRAM_GROUPED, i, count, SESSION_ID, i) for i in range(count)]
    assert node.seal([frame(b"small")], CHUNK)[0][0] == ncctl.DATAGRAM_SEALED  # what fits one datagram stays one


@given(st.lists(st.integers(1, 60), max_size=8), st.integers(1000, 65000))
@settings(max_examples=60, deadline=None)
def test_a_group_opens_whole_however_the_reads_split_it(cuts: list[int], size: int) -> None:
    node, server = session_pair()
    big = big_frame(size)
    datagrams = node.seal([big], CHUNK)
    points = sorted({c for c in cuts if c < len(datagrams)})
    reads = [datagrams[a:b] for a, b in zip([0, *points], [*points, len(datagrams)])]
    assert open_reads(server, reads) == ([big], [])
    assert (server.window.top, server.received) == (len(datagrams) - 1, len(datagrams))


def test_singles_and_groups_in_one_read_arrive_in_order_and_count_every_byte() -> None:
    node, server = session_pair()
    frames = [frame(b"a" * 100), big_frame(20000, 1), frame(b"b" * 100), big_frame(30000, 2), frame(b"c")]
    datagrams = node.seal(frames, CHUNK)
    runs = list(ncctl.open_datagrams([memoryview(d) for d in datagrams], {SESSION_ID: server}.get, print))
    assert [f for _keys, opened, _size in runs for f in opened] == frames
    assert sum(size for _keys, _opened, size in runs) == sum(map(len, datagrams))


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_a_lost_datagram_loses_its_group_only_and_the_loss_is_seen(data: st.DataObject) -> None:
    node, server = session_pair()
    first, second = big_frame(40000, 1), big_frame(40000, 2)
    lost_group = node.seal([first], CHUNK)
    kept = node.seal([second], CHUNK)
    gone = data.draw(st.integers(0, len(lost_group) - 1))
    arriving = lost_group[:gone] + lost_group[gone + 1 :]
    one_by_one = data.draw(st.booleans())
    reads = [[d] for d in arriving] if one_by_one else [arriving]
    meter = ncctl.LossMeter()
    opened, dropped = open_reads(server, [*reads, kept])
    assert opened == [second]
    assert set(dropped) <= {"group-incomplete"} and (dropped or gone == len(lost_group) - 1)
    sent, received, _gaps = meter.sample([server])
    # The link lost one datagram, and that is what the loss counters say (not the group's size).
    assert (sent, received) == (len(lost_group) + len(kept), len(lost_group) - 1 + len(kept))


def test_a_replayed_or_forged_group_delivers_nothing_and_the_session_goes_on() -> None:
    node, server = session_pair()
    big = big_frame(30000)
    datagrams = node.seal([big], CHUNK)
    assert open_reads(server, [datagrams]) == ([big], [])
    assert open_reads(server, [datagrams]) == ([], ["replayed"])
    forged = node.seal([big], CHUNK)
    forged[3] = forged[3][:-1] + bytes([forged[3][-1] ^ 1])
    assert open_reads(server, [forged]) == ([], ["forged"])
    again = node.seal([big], CHUNK)
    assert open_reads(server, [again]) == ([big], [])


def test_reordered_datagrams_of_a_group_lose_it_and_the_next_one_opens() -> None:
    node, server = session_pair()
    datagrams = node.seal([big_frame(30000)], CHUNK)
    datagrams[4], datagrams[5] = datagrams[5], datagrams[4]
    opened, dropped = open_reads(server, [[d] for d in datagrams])
    assert opened == [] and "group-incomplete" in dropped
    later = big_frame(30000)
    assert open_reads(server, [node.seal([later], CHUNK)]) == ([later], [])


@given(st.lists(st.binary(min_size=1, max_size=1600), min_size=1, max_size=60), st.integers(0, 255))
@settings(max_examples=100, deadline=None)
def test_made_up_group_datagrams_never_open_and_never_hold_more_than_a_group(bodies: list[bytes], count: int) -> None:
    _node, server = session_pair()
    made_up = [ncctl.GROUP_HEADER.pack(ncctl.DATAGRAM_GROUPED, i % 256, count, SESSION_ID, 7 + i) + b for i, b in
               enumerate(bodies)]  # fmt: skip
    opened, dropped = open_reads(server, [made_up[i : i + 5] for i in range(0, len(made_up), 5)])
    assert opened == []
    assert set(dropped) <= {"forged", "replayed", "malformed", "group-incomplete"}
    held = sum(map(len, server.group_parts))
    assert held <= ncctl.GROUP_MAX_SEALED + ncctl.GROUP_HEADER.size * ncctl.GROUP_MAX_COUNT


def test_a_group_far_longer_than_any_frame_is_given_up_before_it_is_whole() -> None:
    _node, server = session_pair()
    body = bytes(60000)
    made_up = [ncctl.GROUP_HEADER.pack(ncctl.DATAGRAM_GROUPED, i, 200, SESSION_ID, i) + body for i in range(3)]
    assert open_reads(server, [made_up]) == ([], ["malformed"])
    assert server.group_parts == []


class Counted:
    """Keys whose counters say `sent` datagrams came and `lost` of them never opened, in
    `events` gaps (each lost on its own, unless told)."""

    def __init__(self) -> None:
        self.session_id, self.received, self.gaps = 1, 0, 0
        self.window = ncctl.ReplayWindow()

    def arrive(self, sent: int, lost: int, events: int | None = None) -> None:
        self.window.top += sent
        self.received += sent - lost
        self.gaps += lost if events is None else events


def test_loss_events_are_gaps_in_the_counters_a_burst_being_one() -> None:
    node, server = session_pair()
    singles = node.seal([frame(bytes([i]) * 100) for i in range(20)])
    group = node.seal([big_frame(40000)], CHUNK)
    after = node.seal([frame(b"z" * 100)] * 3)
    arriving = singles[:5] + singles[6:9] + singles[15:]  # 1 lost, then a burst of 6
    opened, _dropped = open_reads(server, [[d] for d in arriving] + [group[:7] + group[8:]] + [after])
    assert server.gaps == 3  # the single, the burst, the group's datagram
    assert len(opened) == len(arriving) + 3


def verdict(gate: ncctl.GroupGate) -> int | None:
    """The FRAME_LINK_REPORT byte the gate has for the peer now, if any."""
    report = gate.report()
    if report is None:
        return None
    assert report[0] == ncctl.FRAME_LINK_REPORT and ncctl.one_frame(report)
    return report[4]


def test_the_gate_lets_the_peer_group_after_a_clean_judgement_and_stops_it_at_the_first_loss() -> None:
    keys, now = Counted(), 100.0
    gate = ncctl.GroupGate(now)
    gate.observe(now, [keys])
    keys.arrive(ncctl.AUTO_MIN_DATAGRAMS - 10, 0)
    assert gate.observe(now + 1, [keys]) is None and not gate.on  # too little to judge
    assert verdict(gate) is None
    keys.arrive(20, 0)
    assert "whole enough to group" in (gate.observe(now + 2, [keys]) or "") and gate.on
    assert verdict(gate) == 1 and verdict(gate) is None  # once per judgement
    keys.arrive(ncctl.AUTO_MIN_DATAGRAMS, 5)
    assert "not whole enough" in (gate.observe(now + 3, [keys]) or "") and not gate.on
    assert verdict(gate) == 0
    keys.arrive(ncctl.AUTO_MIN_DATAGRAMS, 0)
    assert gate.observe(now + 4, [keys]) is None and not gate.on  # not again before GROUP_AGAIN_S
    assert verdict(gate) == 0  # a judgement all the same: the peer hears it again
    keys.arrive(ncctl.AUTO_MIN_DATAGRAMS, 0)
    assert gate.observe(now + 3 + ncctl.GROUP_AGAIN_S, [keys]) is not None and gate.on
    keys.arrive(ncctl.AUTO_MIN_DATAGRAMS, 50)
    gate.observe(now + 10 + ncctl.GROUP_AGAIN_S, [keys])
    assert not gate.on and gate.after == pytest.approx(now + 10 + 3 * ncctl.GROUP_AGAIN_S)  # the wait doubled


def test_the_gate_never_lets_the_peer_group_under_steady_loss_and_keeps_saying_so() -> None:
    keys, now = Counted(), 0.0
    gate = ncctl.GroupGate(now)
    reports = []
    for quarter in range(1, 1200):
        keys.arrive(ncctl.AUTO_MIN_DATAGRAMS // 4, 3)  # 1.2 %
        gate.observe(now + quarter / 4, [keys])
        assert not gate.on
        reports.append(verdict(gate))
    assert set(reports) <= {0, None} and reports.count(0) > 100  # a lost report is soon replaced


def test_bursts_lost_at_once_are_one_event_each_and_leave_the_link_clean() -> None:
    """A GRO read the receiving socket had no room for loses up to 64 datagrams at once:
    one loss to the inner TCP, grouped or not."""
    keys, now = Counted(), 0.0
    gate = ncctl.GroupGate(now)
    gate.observe(now, [keys])
    keys.arrive(4 * ncctl.AUTO_MIN_DATAGRAMS, 90, events=2)
    assert gate.observe(now + 1, [keys]) is not None and gate.on


def test_the_gate_stops_grouping_on_a_few_losses_before_a_whole_judgement() -> None:
    """Under loss a grouped flow slows down and its datagrams may never add up to a judgement."""
    keys, now = Counted(), 0.0
    gate = ncctl.GroupGate(now)
    gate.observe(now, [keys])
    keys.arrive(ncctl.AUTO_MIN_DATAGRAMS, 0)
    gate.observe(now + 1, [keys])
    assert gate.on and verdict(gate) == 1
    keys.arrive(40, ncctl.GROUP_LOSS_SEEN - 1)
    assert gate.observe(now + 2, [keys]) is None and gate.on  # one or two: not yet
    assert verdict(gate) is None
    keys.arrive(40, 1)
    assert gate.observe(now + 3, [keys]) is not None and not gate.on
    assert verdict(gate) == 0


def test_a_sender_groups_only_on_its_peers_word() -> None:
    """The verdict travels in FRAME_LINK_REPORT; a path groups (chunk) only after a 1 came,
    and only if the peer agreed on groups."""
    node, _server = session_pair()
    path = ncctl.DatagramPath("127.0.0.1", 9, node, "udp", TOKEN)
    try:
        path.on_report(ncctl.encode_frame(ncctl.FRAME_LINK_REPORT, b"\x01"))
        assert path.chunk == 0  # the server never agreed on groups
        path.grouping.size = CHUNK
        assert path.chunk == 0
        path.on_report(ncctl.encode_frame(ncctl.FRAME_LINK_REPORT, b"\x01"))
        assert path.chunk == CHUNK
        path.on_report(ncctl.encode_frame(ncctl.FRAME_LINK_REPORT, b"\x00"))
        assert path.chunk == 0
    finally:
        path.close()


def test_groups_are_agreed_only_with_udp_and_gso_and_peers_learn_it() -> None:
    info = ncctl.PeerInfo(0x0A010102, bytes(range(32)), (("198.18.0.2", 6441),), gso=True, groups=True)
    assert ncctl.PeerInfo.decode(info.encode()) == info
    old_entry = {k: v for k, v in info.encode().items() if k != "groups"}  # what a server without groups sends
    assert ncctl.PeerInfo.decode(old_entry).groups is False
    no_gso = dict(info.encode(), gso=False)
    assert ncctl.PeerInfo.decode(no_gso).groups is False  # a group's frame is a GSO frame


def test_whole_super_packets_go_out_a_few_at_a_time_not_a_socket_buffer_at_once() -> None:
    """A batch is sent once it holds UDP_SEND_BATCH frames or UDP_SEND_BYTES: two 64 KiB
    frames (92 datagrams as groups) are enough, 63 acks are not."""
    assert ncctl.batch_full([big_frame(), big_frame()])
    assert not ncctl.batch_full([frame(b"a" * 60)] * (ncctl.UDP_SEND_BATCH - 1))
    assert ncctl.batch_full([frame(b"a" * 60)] * ncctl.UDP_SEND_BATCH)


@given(st.lists(st.integers(0, 3), min_size=2, max_size=6))
@settings(max_examples=30, deadline=None)
def test_a_batch_of_several_groups_and_singles_opens_each_group_whole_in_order(smalls: list[int]) -> None:
    """Reads from one source come as one batch: several groups, each with singles before
    it, open in order, each group together (one yield), not one datagram at a time."""
    node, server = session_pair()
    sent: list[bytes] = []
    batch: list[bytes] = []
    for count in smalls:
        small = [frame(bytes([count])) for _ in range(count)]
        big = big_frame(20000)
        batch += (node.seal(small, CHUNK) if small else []) + node.seal([big], CHUNK)
        sent += [*small, big]
    runs = list(ncctl.open_datagrams([memoryview(d) for d in batch], {SESSION_ID: server}.get, print))
    assert [f for _keys, opened, _size in runs for f in opened] == sent
    assert sum(len(opened) == 1 and len(opened[0]) > 20000 for _k, opened, _s in runs) == len(smalls)
    assert len(runs) == len(smalls) + sum(1 for count in smalls if count)
