"""auto's choice of data path (section 10, PathChooser): fed counters as the node's tick
feeds them, it moves to the TLS stream only once enough datagrams show a clean link, back
to datagrams at the first sign of loss on the stream, and tries the stream again only
after a wait that doubles. Also the two counter sources: the datagram counters' losses
(DatagramPath.loss_sample) and TCP_INFO (stream_counters)."""

from __future__ import annotations

import socket
import time

from test_datagram import TOKEN, frame, session_pair

import ncctl

ENOUGH = ncctl.AUTO_MIN_DATAGRAMS
BYTES = ncctl.AUTO_MIN_BYTES  # enough sent on the stream for a judgement
LOST_BYTES = round(BYTES * ncctl.AUTO_LOSSY_RESENT * 2)  # of them sent again: loss
SEGMENTS = ncctl.AUTO_MIN_SEGMENTS


def clean(count: int = ENOUGH) -> tuple[int, int]:
    return count, count


def lossy(share: float, count: int = ENOUGH) -> tuple[int, int]:
    return count, count - round(count * share)


def stream(sent: int = 0, resent: int = 0, segments_in: int = 0, out_of_order: int = 0) -> ncctl.StreamCounters:
    return ncctl.StreamCounters(
        segments_in=segments_in, bytes_sent=sent, bytes_resent=resent, out_of_order=out_of_order
    )


def on_stream(now: float = 0.0) -> ncctl.PathChooser:
    """A chooser that moved to the stream at `now` (a clean link)."""
    chooser = ncctl.PathChooser(now)
    assert chooser.observe(now, clean(), stream()) is not None
    assert not chooser.datagrams
    return chooser


def test_a_clean_link_moves_data_to_the_stream_once_enough_datagrams_prove_it() -> None:
    chooser = ncctl.PathChooser(0.0)
    assert chooser.datagrams  # a session starts on datagrams: safe under loss
    assert chooser.observe(0.25, clean(ENOUGH // 2), stream()) is None  # not enough yet
    why = chooser.observe(0.5, clean(ENOUGH // 2), stream())
    assert why is not None and "clean" in why
    assert not chooser.datagrams


def test_loss_keeps_data_on_datagrams() -> None:
    for share in (0.01, 0.03, 0.002):
        chooser = ncctl.PathChooser(0.0)
        for tick in range(40):
            assert chooser.observe(tick * 0.25, lossy(share), stream()) is None
        assert chooser.datagrams


def test_a_few_lost_datagrams_among_many_still_count_as_clean() -> None:
    chooser = ncctl.PathChooser(0.0)
    few = int(ncctl.AUTO_CLEAN_LOSS * 4 * ENOUGH)
    assert chooser.observe(0.25, (4 * ENOUGH, 4 * ENOUGH - few), stream()) is not None
    assert not chooser.datagrams


def test_an_idle_link_keeps_its_path_and_old_evidence_expires() -> None:
    """Keepalives alone never make a judgement: datagrams trickling in for longer than
    AUTO_EVIDENCE_S start the count again, so an hour of them proves nothing."""
    chooser = ncctl.PathChooser(0.0)
    now = 0.0
    for _ in range(4000):  # 1000 s of ticks, four datagrams a second
        now += 0.25
        assert chooser.observe(now, clean(1), stream()) is None
    assert chooser.datagrams


def test_without_tcp_info_the_stream_is_never_chosen() -> None:
    chooser = ncctl.PathChooser(0.0)
    for tick in range(10):
        assert chooser.observe(tick * 0.25, clean(), None) is None
    assert chooser.datagrams


def test_bytes_sent_again_on_the_stream_move_data_back_to_datagrams() -> None:
    chooser = on_stream()
    chooser.observe(0.25, clean(1), stream())  # the first counters: a base, no judgement
    assert chooser.observe(0.5, clean(1), stream(sent=2 * BYTES)) is None  # clean stream: stays
    assert not chooser.datagrams
    why = chooser.observe(0.75, clean(1), stream(sent=3 * BYTES, resent=LOST_BYTES))
    assert why is not None and "sent again" in why
    assert chooser.datagrams


def test_segments_received_out_of_order_move_data_back_to_datagrams() -> None:
    """A download on the stream: the node sends nothing to be resent, but a lost segment
    leaves the rest of its window arriving out of order."""
    chooser = on_stream()
    chooser.observe(0.25, clean(1), stream())
    assert chooser.observe(0.5, clean(1), stream(segments_in=10 * SEGMENTS, out_of_order=10)) is None
    why = chooser.observe(0.75, clean(1), stream(segments_in=11 * SEGMENTS, out_of_order=10 + SEGMENTS // 2))
    assert why is not None and chooser.datagrams


def test_too_little_stream_traffic_is_no_evidence_of_loss() -> None:
    chooser = on_stream()
    chooser.observe(0.25, clean(1), stream())
    assert (
        chooser.observe(0.5, clean(1), stream(sent=BYTES // 4, resent=BYTES // 8)) is None
    )  # one resent burst, little data
    assert not chooser.datagrams


def test_the_stream_is_tried_again_after_a_wait_that_doubles_and_resets_once_proven() -> None:
    chooser = on_stream(0.0)
    counters = stream()

    def lose(now: float) -> None:
        nonlocal counters
        chooser.observe(now, clean(1), counters)  # a base for the deltas after a move
        counters = stream(sent=counters.bytes_sent + BYTES, resent=counters.bytes_resent + LOST_BYTES)
        assert chooser.observe(now + 0.25, clean(1), counters) is not None
        assert chooser.datagrams

    lose(1.0)
    first_wait = ncctl.AUTO_STREAM_AGAIN_S
    assert chooser.observe(1.25 + first_wait - 1, clean(), counters) is None  # too soon: stays on datagrams
    assert chooser.observe(1.25 + first_wait + 0.25, clean(), counters) is not None
    back = 1.25 + first_wait + 0.25
    lose(back + 1)
    assert chooser.observe(back + 1.25 + 2 * first_wait - 1, clean(), counters) is None  # doubled
    assert chooser.observe(back + 1.25 + 2 * first_wait + 0.25, clean(), counters) is not None
    # A stream that ran clean for AUTO_STREAM_PROVEN_S starts the wait afresh.
    proven = back + 1.25 + 2 * first_wait + 0.25 + ncctl.AUTO_STREAM_PROVEN_S
    lose(proven)
    assert chooser.observe(proven + 0.25 + first_wait + 0.25, clean(), counters) is not None


def test_the_wait_stops_doubling_at_its_ceiling() -> None:
    chooser = on_stream(0.0)
    counters, now = stream(), 0.0
    for _ in range(12):
        chooser.observe(now, clean(1), counters)
        counters = stream(sent=counters.bytes_sent + BYTES, resent=counters.bytes_resent + LOST_BYTES)
        now += 0.25
        assert chooser.observe(now, clean(1), counters) is not None
        now = chooser.stream_after + 0.25
        assert chooser.observe(now, clean(), counters) is not None
    assert chooser.wait == ncctl.AUTO_STREAM_AGAIN_MAX_S


def test_the_datagram_counters_count_what_never_came() -> None:
    """The node's DatagramPath: of 20 datagrams the server sealed, 3 never arrive; the
    sample says 20 sent and 17 opened, and the next sample starts from there."""
    node_keys, server_keys = session_pair()
    path = ncctl.DatagramPath("127.0.0.1", 6441, node_keys, "auto", TOKEN)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        here = ("127.0.0.1", path.sock.sock.getsockname()[1])
        sealed = server_keys.seal([frame(bytes([i]) * 50) for i in range(20)])
        for index, datagram in enumerate(sealed):
            if index not in (3, 7, 12):
                sender.sendto(datagram, here)
        opened: list[bytes] = []
        deadline = time.monotonic() + 5
        while len(opened) < 17 and time.monotonic() < deadline:
            opened += path.receive(64)
        assert path.loss_sample() == (20, 17)
        sender.sendto(server_keys.seal([frame(b"next")])[0], here)
        while not path.receive(64) and time.monotonic() < deadline:
            pass
        assert path.loss_sample() == (1, 1)
    finally:
        path.close()
        sender.close()


def test_carrying_follows_the_choice_only_in_auto() -> None:
    node_keys, _ = session_pair()
    for mode, carries in (("auto", False), ("udp", True)):
        path = ncctl.DatagramPath("127.0.0.1", 6441, node_keys, mode, TOKEN)
        try:
            path.state = path.UP
            assert path.carrying
            path.preferred = False  # the chooser picked the stream
            assert path.carrying is carries
        finally:
            path.close()


def test_tcp_info_counts_a_streams_bytes() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    try:
        client.sendall(b"x" * 100_000)
        got = 0
        while got < 100_000:
            got += len(server.recv(65536))
        counters = ncctl.stream_counters(client)
        assert counters is not None and counters.bytes_sent == 100_000 and counters.bytes_resent == 0
        received = ncctl.stream_counters(server)
        assert received is not None and received.segments_in >= 1 and received.out_of_order == 0
    finally:
        for sock in (client, server, listener):
            sock.close()
