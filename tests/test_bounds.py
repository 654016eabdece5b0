"""Unit tests of the resource bounds (issue 11): the shared send budget's policy, and
the gRPC connection caps cut from the file-descriptor limit."""

from __future__ import annotations

import socket
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


@pytest.mark.parametrize("limit", [256, 1024, 20_000, 1_048_576])
def test_grpc_ports_leave_most_file_descriptors_to_the_data_plane(limit: int) -> None:
    cap = ncctl.grpc_connection_cap(limit)
    assert 16 <= cap <= ncctl.GRPC_MAX_CONNECTIONS
    if limit >= 1024:
        assert 2 * cap <= 0.4 * limit
    options = dict(ncctl.grpc_server_options(cap))
    assert options["grpc.max_allowed_incoming_connections"] == cap
    assert options["grpc.server_handshake_timeout_ms"] <= 10_000
