"""Unit tests of the resource bounds: the shared send budget's policy, the
gRPC connection caps cut from the file-descriptor limit, and the gRPC guard's splice."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

import ncctl

FRAME = b"x" * 1000


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def link(sockets: list[socket.socket], budget: ncctl.SendBudget) -> ncctl.Link:
    """A link whose queue is never flushed: a peer that stopped reading."""
    a, b = socket.socketpair()
    sockets += [a, b]
    return ncctl.Link(a, "peer", budget=budget)  # type: ignore[arg-type]


def fill(peer: ncctl.Link) -> int:
    queued = 0
    while peer.queue(FRAME):
        queued += 1
    return queued


def test_slow_peers_stop_at_the_total_and_fresh_peers_still_get_their_share(sockets: list[socket.socket]) -> None:
    budget = ncctl.SendBudget(limit=100_000, fair_share=10_000)
    slow = [link(sockets, budget) for _ in range(3)]
    for peer in slow:
        fill(peer)
    # past the total only peers within their share may add to it, one frame each over
    assert budget.queued <= budget.limit + len(slow) * (budget.fair_share + len(FRAME))
    assert budget.queued == sum(peer.queued for peer in slow)
    fresh = link(sockets, budget)
    assert fill(fresh) == budget.fair_share // len(FRAME)  # never starved by the slow ones
    assert not slow[0].queue(FRAME)  # while over the total, the slow ones get nothing more


def test_closing_or_refusing_a_peer_gives_its_bytes_back(sockets: list[socket.socket]) -> None:
    budget = ncctl.SendBudget(limit=50_000, fair_share=5_000)
    first, second = link(sockets, budget), link(sockets, budget)
    fill(first)
    fill(second)
    second.drop_queue()
    assert budget.queued == first.queued and second.queued == 0
    first.close()
    assert budget.queued == 0
    assert second.queue(FRAME)


def test_one_peer_alone_stops_at_its_own_limit(sockets: list[socket.socket]) -> None:
    budget = ncctl.SendBudget()
    peer = link(sockets, budget)
    fill(peer)
    assert ncctl.SEND_QUEUE_LIMIT < peer.queued <= ncctl.SEND_QUEUE_LIMIT + len(FRAME)


def test_a_batch_stops_at_the_first_frame_the_queue_refuses_and_counts_one_drop(
    sockets: list[socket.socket],
) -> None:
    budget = ncctl.SendBudget(limit=2_000, fair_share=3_500)
    peer = link(sockets, budget)
    taken = peer.send([FRAME] * 10)  # send is the data path's queue: the same policy, per batch
    assert taken == 4  # over the total, queued while under its share; the fifth finds it spent
    assert peer.queued == taken * len(FRAME) == budget.queued
    assert peer.counters["dropped-queue-full"] == 1
    assert peer.send([]) == 0 and peer.name == "tcp"


@pytest.mark.parametrize("limit", [256, 1024, 20_000, 1_048_576])
def test_grpc_ports_leave_most_file_descriptors_to_the_data_plane(limit: int) -> None:
    cap = ncctl.grpc_connection_cap(limit)
    assert 16 <= cap <= ncctl.GRPC_MAX_CONNECTIONS
    if limit >= 1024:  # both ports together, each connection with its three descriptors
        assert 2 * cap * ncctl.FDS_PER_GRPC_CONNECTION <= 0.4 * limit
    options = dict(ncctl.grpc_server_options(cap))
    assert options["grpc.max_allowed_incoming_connections"] == cap
    assert options["grpc.server_handshake_timeout_ms"] <= 10_000


def echo_server() -> tuple[socket.socket, threading.Thread]:
    """A loopback server that sends back what one caller sends, until it closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    thread = threading.Thread(target=serve, name="echo", daemon=True)
    thread.start()
    return listener, thread


def read_exactly(sock: socket.socket, count: int, into: bytearray) -> None:
    while len(into) < count and (chunk := sock.recv(1 << 16)):
        into.extend(chunk)


def test_the_grpc_guard_splices_both_ways_and_forgets_closed_callers() -> None:
    """4 MiB through the guard to an echo server and back, written faster than it is
    read, so both directions hit backpressure; then the caller's count is released."""
    stop = threading.Event()
    listener, echo = echo_server()
    guard = ncctl.GrpcGuard(stop)
    port = guard.listen(0, "test", cap=8, field="testPort")
    port.backend_port = listener.getsockname()[1]
    guard.start()
    payload = bytes(range(256)) * (4 * 4096)
    received = bytearray()
    try:
        with socket.create_connection(("127.0.0.1", port.listener.getsockname()[1]), timeout=30) as caller:
            reader = threading.Thread(target=read_exactly, args=(caller, len(payload), received), daemon=True)
            reader.start()
            caller.sendall(payload)
            reader.join(timeout=60)
        assert bytes(received) == payload
        echo.join(timeout=10)
        for _ in range(100):  # the guard sees the close on its next poll
            if not guard.splices:
                break
            time.sleep(0.05)
        assert guard.splices == {} and port.slots.total == 0 and not port.slots.held
    finally:
        stop.set()
        guard.join(timeout=5)
        listener.close()


def test_an_ipv6_source_is_its_prefix_and_ipv4_its_address() -> None:
    assert ncctl.source_key("2001:2:0:1::17") == ncctl.source_key("2001:2:0:1:ffff::1") == "2001:2:0:1::/64"
    assert ncctl.source_key("2001:2:0:1::17", 48) == "2001:2::/48"
    assert ncctl.source_key("2001:2:0:1::17", 128) == "2001:2:0:1::17"
    assert ncctl.source_key("::ffff:198.18.0.2") == ncctl.source_key("198.18.0.2") == "198.18.0.2"


def test_addresses_of_one_prefix_share_one_limit_and_the_refusal_names_the_prefix() -> None:
    slots = ncctl.SourceSlots(cap=1333, per_source=64)
    crowd = [slots.key(f"2001:2:0:1::{n:x}") for n in range(24 * 64)]  # 24 addresses x 64 would hold 1536
    refusals = [refusal for source in crowd if (refusal := slots.take(source)) is not None]
    assert slots.total == 64 and len(refusals) == len(crowd) - 64
    assert {blamed for blamed, _ in refusals} == {"2001:2:0:1::/64"}
    assert all("2001:2:0:1::/64" in why for _, why in refusals)
    assert slots.take(slots.key("2001:2:0:2::1")) is None  # another /64 is another source


def test_sources_at_their_limit_leave_room_for_a_new_one_and_the_log_blames_them() -> None:
    slots = ncctl.SourceSlots(cap=64, per_source=16)
    for flooder in range(4):  # four sources at their limit would hold the whole cap
        for _ in range(16):
            slots.take(f"198.18.1.{flooder}")
    assert slots.total == slots.cap - slots.reserve  # the last eighth is kept
    assert slots.take("198.18.2.1") is None  # a host holding nothing still gets in
    assert slots.take("198.18.2.1") is None
    for newcomer in range(slots.reserve):  # until the port is truly full
        slots.take(f"198.18.3.{newcomer}")
    assert slots.total == slots.cap
    blamed, why = slots.take("198.18.4.1") or ("", "")
    assert blamed.startswith("198.18.1.") and "198.18.4.1" not in why  # never the victim
    for _ in range(16):
        slots.release("198.18.1.0")
    assert "198.18.1.0" not in slots.held and slots.top != "198.18.1.0"
    assert slots.take("198.18.4.1") is None


def test_loopback_has_no_per_source_limit_on_the_grpc_ports() -> None:
    slots = ncctl.SourceSlots(cap=100, per_source=2)
    assert all(slots.take("127.0.0.1", unlimited=True) is None for _ in range(4))
    assert slots.take("198.18.0.9") is None and slots.take("198.18.0.9") is None
    assert slots.take("198.18.0.9") is not None


def test_the_metrics_server_holds_slow_clients_without_a_thread_each_and_still_answers() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()
    server = ncctl.MetricsHttp(listener, lambda: (b"nc_up 1\n", "text/plain; version=0.0.4"))
    threads = threading.active_count()
    server.start()
    slow: list[socket.socket] = []
    try:
        for n in range(300):  # connected, some halfway through a request line, none finishing it
            sock = socket.create_connection(address, timeout=5)
            if n % 2:
                sock.sendall(b"GET /met")
            slow.append(sock)
        time.sleep(0.5)
        assert threading.active_count() <= threads + 1
        assert len(server.clients) <= ncctl.METRICS_MAX_CLIENTS
        with socket.create_connection(address, timeout=5) as scraper:  # a real scrape still gets through
            scraper.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := scraper.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n") and answer.endswith(b"\r\n\r\nnc_up 1\n"), answer
        with socket.create_connection(address, timeout=5) as stray:
            stray.sendall(b"GET /other HTTP/1.0\r\n\r\n")
            assert stray.recv(4096).startswith(b"HTTP/1.0 404")
    finally:
        for sock in slow:
            sock.close()
        server.close()
    assert not server.is_alive()
