"""The TLS stream (Link). Sending: a packet read from the TUN is written at once from the
reader's buffer when nothing waits before it, and queued as a copy otherwise. Receiving:
frames are handed over when whole, not once per TLS record, and records OpenSSL read
ahead of what was asked are never left where epoll cannot see them. Run over a real TLS
connection on a socket pair, with a pipe standing in for the TUN."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import ssl
import termios
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import ncctl


class PipeTun:
    """What TunReader needs of a TUN: a descriptor to read packets from."""

    def __init__(self) -> None:
        self.fd, self.writer = os.pipe()
        self.offload = False


@pytest.fixture
def tls_pair(tmp_path: Path) -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    """A non-blocking client TLS socket (the sender) and a blocking server one (the reader)."""
    authority = ncctl.CertAuthority(tmp_path / "ca", "test")
    authority.load_or_create()
    authority.ensure_server_cert(("127.0.0.1",))
    chain = tmp_path / "chain.pem"
    chain.write_bytes(authority.server_chain_pem())
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(chain, authority.server_key_path)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    a, b = socket.socketpair()
    for sock in (a, b):  # small buffers, so a test can fill them
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    server: list[ssl.SSLSocket] = []
    accepting = threading.Thread(target=lambda: server.append(server_context.wrap_socket(b, server_side=True)))
    accepting.start()
    client = client_context.wrap_socket(a)
    accepting.join()
    client.setblocking(False)
    try:
        yield client, server[0]
    finally:
        client.close()
        server[0].close()


def packets(count: int, size: int) -> list[bytes]:
    return [bytes([n % 251]) * (size - 1) + bytes([n % 256]) for n in range(count)]


def read_frames(sock: ssl.SSLSocket, count: int) -> list[bytes]:
    """`count` frames off the stream, each as sent (header and payload)."""
    buffer, frames = bytearray(), []
    sock.settimeout(5)
    while len(frames) < count:
        buffer += sock.recv(1 << 20)
        while (frame := ncctl.next_frame(buffer, 0, len(buffer))) is not None:
            frames.append(bytes(buffer[: frame[2]]))
            del buffer[: frame[2]]
    return frames


def send_from_tun(link: ncctl.Link, reader: ncctl.TunReader, tun: PipeTun, packet: bytes) -> int:
    os.write(tun.writer, packet)
    return link.send_read(reader, reader.read(), gso=False)


def test_packets_arrive_in_order_whether_written_at_once_or_queued_behind_others(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    client, server = tls_pair
    link, tun = ncctl.Link(client, "server"), PipeTun()
    reader = ncctl.TunReader(tun)  # type: ignore[arg-type]
    first, queued, behind, last = packets(4, 1400)
    try:
        assert send_from_tun(link, reader, tun, first) == 1
        assert link.tx_bytes == 4 + len(first) and link.queued == 0  # written, nothing kept
        assert link.send([ncctl.encode_frame(ncctl.FRAME_PACKET, queued)]) == 1
        assert send_from_tun(link, reader, tun, behind) == 1  # waits behind the queued frame
        assert link.queued == 2 * (4 + 1400)
        assert link.flush()
        assert send_from_tun(link, reader, tun, last) == 1
    finally:
        os.close(tun.fd)
        os.close(tun.writer)
    expected = [ncctl.encode_frame(ncctl.FRAME_PACKET, p) for p in (first, queued, behind, last)]
    assert read_frames(server, 4) == expected
    assert link.queued == 0 and link.tx_bytes == sum(map(len, expected))


def test_a_write_the_full_socket_refuses_keeps_a_copy_that_later_reads_do_not_change(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    """The reader's buffer is reused by the next read: what the socket could not take
    must go out as it was read, after the socket drains, and before anything newer. The
    packets span several TLS records: OpenSSL seals a record only as it writes it, so the
    records after the one the socket refused are sealed from the kept bytes."""
    client, server = tls_pair
    link, tun = ncctl.Link(client, "server"), PipeTun()
    reader = ncctl.TunReader(tun)  # type: ignore[arg-type]
    sent = packets(60, 40000)
    try:
        count = 0
        while link.pending is None:  # the peer reads nothing: the socket fills up
            assert count < len(sent), "the socket never filled"
            assert send_from_tun(link, reader, tun, sent[count]) == 1
            count += 1
        assert link.queued == 4 + 40000
        for packet in sent[count:]:  # newer reads overwrite the buffer the refused write came from
            assert send_from_tun(link, reader, tun, packet) == 1
        received: list[bytes] = []
        draining = threading.Thread(target=lambda: received.extend(read_frames(server, len(sent))))
        draining.start()
        while not link.flush():
            threading.Event().wait(0.001)
        draining.join(10)
    finally:
        os.close(tun.fd)
        os.close(tun.writer)
    assert received == [ncctl.encode_frame(ncctl.FRAME_PACKET, p) for p in sent]
    assert link.queued == 0


def test_a_broken_connection_is_not_raised_by_the_read_but_by_the_flush_after_it(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    """The TUN read goes on (the packet is kept); the owner's flush, which already ends
    the session on a broken socket, hears of it."""
    client, server = tls_pair
    link, tun = ncctl.Link(client, "server"), PipeTun()
    reader = ncctl.TunReader(tun)  # type: ignore[arg-type]
    server.close()
    try:
        for packet in packets(50, 9000):
            assert send_from_tun(link, reader, tun, packet) == 1
            if link.pending is not None:
                break
    finally:
        os.close(tun.fd)
        os.close(tun.writer)
    assert link.pending is not None, "writes to a closed peer kept succeeding"
    with pytest.raises((OSError, ssl.SSLError)):
        link.flush()


def test_a_frame_spread_over_several_records_is_handed_over_once_when_whole(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    client, server = tls_pair
    link = ncctl.Link(client, "server")
    frame = ncctl.encode_frame(ncctl.FRAME_PACKET, bytes(range(256)) * 200)  # 51 KB: four TLS records
    for start in range(0, len(frame), 16384):
        server.sendall(frame[start : start + 16384])
    handed: list[list[bytes]] = []

    def handle(link: ncctl.Link) -> None:
        handed.append([bytes(link.rx.view[start - 4 : end]) for _, start, end in link.rx.frames()])

    for _ in range(100):  # until the last record is in
        link.receive(handle)
        if handed:
            break
        threading.Event().wait(0.01)
    assert handed == [[frame]]


def test_the_buffer_is_ready_for_a_whole_frame_a_refused_header_or_any_control_frame() -> None:
    rx = ncctl.FrameBuffer()

    def holding(data: bytes) -> ncctl.FrameBuffer:
        rx.start, rx.end = 0, len(data)
        rx.buf[: len(data)] = data
        return rx

    packet = ncctl.encode_frame(ncctl.FRAME_PACKET, b"x" * 5000)
    assert not holding(packet[:3]).ready()
    assert not holding(packet[:-1]).ready()
    assert holding(packet).ready()
    oversized = ncctl.FRAME_HEADER.pack(ncctl.FRAME_PACKET << 24 | (ncctl.MAX_PAYLOAD + 1))
    assert holding(oversized).ready()  # refused at once, not after 64 KiB more
    with pytest.raises(ncctl.ProtocolError):
        list(rx.frames())
    control = ncctl.FRAME_HEADER.pack((ncctl.FRAME_PACKET - 1) << 24 | (ncctl.MAX_CONTROL_PAYLOAD + 1))
    assert holding(control).ready()  # a control frame's own limit, checked at its header as before
    with pytest.raises(ncctl.ProtocolError):
        list(rx.frames())


def test_a_frame_from_a_reused_buffer_goes_as_it_was_when_sent(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    """send_now, as the server relays a node's frame out of its receive buffer: written
    at once, or copied; never read again from the buffer after it returns."""
    client, server = tls_pair
    link = ncctl.Link(client, "server")
    buffer = bytearray(ncctl.encode_frame(ncctl.FRAME_PACKET, b"a" * 40000))
    link.send([ncctl.encode_frame(ncctl.FRAME_PACKET, b"first")])  # queued: the next one waits behind it
    assert link.send_now(memoryview(buffer)) == 1
    buffer[4:] = b"b" * 40000
    assert link.send_now(memoryview(buffer)) == 1
    assert link.flush()
    frames = read_frames(server, 3)
    assert frames[1:] == [ncctl.encode_frame(ncctl.FRAME_PACKET, c * 40000) for c in (b"a", b"b")]


def records_in_socket(server: ssl.SSLSocket, client: ssl.SSLSocket, frames: list[bytes]) -> None:
    """Send each frame as its own TLS record and wait until all of them are in client's socket."""
    for frame in frames:
        server.sendall(frame)
    expected = sum(len(frame) + 22 for frame in frames)  # TLS 1.3: 5-byte header, type byte, 16-byte tag
    for _ in range(500):
        if in_socket(client) >= expected:
            return
        threading.Event().wait(0.01)
    raise AssertionError("the records did not arrive")


def in_socket(sock: ssl.SSLSocket) -> int:
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)), "little")


def socket_readable(sock: ssl.SSLSocket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def collector() -> tuple[list[bytes], Callable[[ncctl.Link], None]]:
    got: list[bytes] = []

    def handle(link: ncctl.Link) -> None:
        got.extend(bytes(link.rx.view[start - 4 : end]) for _, start, end in link.rx.frames())

    return got, handle


def test_the_stream_reads_ahead_and_a_single_read_after_a_sleep_still_takes_every_record_read(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    """After a sleep the loop reads once (once=True) unless OpenSSL holds more. With
    read-ahead OpenSSL takes all of the socket in one read, so 'holds more' must count
    records it has read but not opened, or they wait for the next packet to arrive."""
    client, server = tls_pair
    link = ncctl.Link(client, "server")
    assert link.holds_bytes != link.tls.pending, "read-ahead was not set on this Python"
    frames = [ncctl.encode_frame(ncctl.FRAME_PACKET, bytes([n]) * 2000) for n in range(6)]
    records_in_socket(server, client, frames)
    got, handle = collector()
    assert link.receive(handle, once=True) is False
    assert got == frames
    assert not socket_readable(client)


def test_a_receive_that_stops_at_its_budget_says_openssl_holds_the_rest(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget ends a read with records in OpenSSL's buffer and none in the socket:
    receive says so (the loop holds the fd in its Poller), and the next receive delivers them."""
    client, server = tls_pair
    monkeypatch.setattr(ncctl, "RECEIVE_BUDGET", 5000)
    link = ncctl.Link(client, "server")
    frames = [ncctl.encode_frame(ncctl.FRAME_PACKET, bytes([n]) * 4000) for n in range(8)]
    records_in_socket(server, client, frames)
    got, handle = collector()
    assert link.receive(handle) is True
    assert 0 < len(got) < len(frames)
    assert not socket_readable(client), "the rest is in OpenSSL, where epoll cannot see it"
    rounds = 1
    while link.receive(handle):
        rounds += 1
    assert got == frames and rounds > 1


def test_a_held_descriptor_is_reported_readable_at_once_and_only_once() -> None:
    poller = ncctl.Poller()
    quiet, writer = os.pipe()
    try:
        poller.register(quiet, select.EPOLLIN)
        poller.hold(quiet)
        assert poller.poll(5.0) == [(quiet, select.EPOLLIN)]
        assert poller.poll(0) == []
        poller.hold(quiet)
        os.write(writer, b"x")
        assert poller.poll(5.0) == [(quiet, select.EPOLLIN)]  # once, though both said so
        poller.hold(quiet)
        poller.unregister(quiet)  # its fd may be reused: a hold does not outlive it
        assert poller.poll(0) == []
    finally:
        poller.close()
        os.close(quiet)
        os.close(writer)


def test_read_ahead_is_not_set_where_the_openssl_connection_cannot_be_told_for_certain(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    client, _ = tls_pair
    assert ncctl.read_tls_ahead(client, client.fileno()) is None  # the Python-level socket
    assert ncctl.read_tls_ahead(client._sslobj, client.fileno() + 1000) is None  # another fd
    memory = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
    assert ncctl.read_tls_ahead(memory._sslobj, -1) is None  # no socket: OpenSSL names none
    assert ncctl.read_tls_ahead(object(), client.fileno()) is None
