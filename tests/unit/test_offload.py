"""The software path for peers without offload: TCP super-segments cut to MSS size
(segment_tcp4) and partial checksums completed (plain_packets), checked against an
independent checksum and against the stream they must reproduce."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ncctl

SRC, DST = socket.inet_aton("10.1.1.2"), socket.inet_aton("10.1.1.3")


def reference_checksum(data: bytes) -> int:
    """RFC 1071 the slow, obvious way: fold 16-bit words, then complement."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def verifies(data: bytes) -> bool:
    """A buffer that includes its checksum sums to zero (0 or 0xFFFF are both zero)."""
    return reference_checksum(data) in (0, 0xFFFF)


def tcp_super_segment(payload: bytes, seq: int = 1000, flags: int = 0x18, ip_id: int = 7) -> bytes:
    """An IPv4/TCP packet as the kernel hands it over with TSO: one header, a big payload,
    checksums not filled in (the receiver of a super-segment must compute them)."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 5 << 4, flags, 65535, 0, 0)
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total & 0xFFFF, ip_id, 0x4000, 64, 6, 0, SRC, DST)
    return ip + tcp + payload


def tcp_pseudo(segment: bytes) -> bytes:
    ihl = (segment[0] & 0x0F) * 4
    return segment[12:20] + bytes((0, 6)) + (len(segment) - ihl).to_bytes(2, "big")


@given(st.binary(min_size=0, max_size=3000))
def test_checksum_matches_the_reference(data: bytes) -> None:
    """The modulo-0xFFFF shortcut gives a checksum that verifies like the folded one."""
    value, reference = ncctl.checksum(data), reference_checksum(data)
    assert value == reference or (reference == 0 and value == 0xFFFF)  # two spellings of zero
    assert verifies((data + b"\0" * (len(data) % 2)) + value.to_bytes(2, "big"))


@given(
    payload=st.binary(min_size=1, max_size=20000),
    mss=st.integers(min_value=ncctl.GSO_MIN_SIZE, max_value=1460),
    flags=st.sampled_from([0x10, 0x18, 0x19, 0x98]),  # ACK, PSH|ACK, FIN|PSH|ACK, CWR|PSH|ACK
    seq=st.integers(min_value=0, max_value=0xFFFFFFFF),
)
def test_segments_reassemble_the_stream_with_valid_headers(payload: bytes, mss: int, flags: int, seq: int) -> None:
    """Every piece is a valid IPv4/TCP packet of at most MSS bytes of data, sequence numbers
    follow the stream (wrapping at 2^32), FIN/PSH only on the last, CWR only on the first."""
    segments = ncctl.segment_tcp4(tcp_super_segment(payload, seq=seq, flags=flags), mss)
    assert len(segments) == -(-len(payload) // mss)
    offset = 0
    for index, segment in enumerate(segments):
        assert verifies(segment[:20]), "IPv4 header checksum"
        assert int.from_bytes(segment[2:4], "big") == len(segment)
        assert int.from_bytes(segment[4:6], "big") == (7 + index) & 0xFFFF
        tcp = segment[20:]
        assert verifies(tcp_pseudo(segment) + tcp), "TCP checksum"
        assert int.from_bytes(tcp[4:8], "big") == (seq + offset) & 0xFFFFFFFF
        data = tcp[20:]
        assert 0 < len(data) <= mss
        assert data == payload[offset : offset + len(data)]
        last = index == len(segments) - 1
        assert bool(tcp[13] & 0x09) == (last and bool(flags & 0x09))
        assert bool(tcp[13] & 0x80) == (index == 0 and bool(flags & 0x80))
        offset += len(data)
    assert offset == len(payload)


def vnet(flags: int = 0, gso_type: int = 0, gso_size: int = 0, csum_start: int = 0, csum_offset: int = 0) -> bytes:
    return ncctl.VNET_HDR.pack(flags, gso_type, 40, gso_size, csum_start, csum_offset)


def test_plain_packets_cuts_a_gso_frame() -> None:
    """A GSO frame payload (virtio_net_hdr + super-segment) becomes MSS-sized packets."""
    payload = bytes(range(256)) * 20
    packets = ncctl.plain_packets(vnet(gso_type=ncctl.GSO_TCPV4, gso_size=1360) + tcp_super_segment(payload))
    assert [len(p) - 40 for p in packets] == [1360, 1360, 1360, 1040]
    assert all(verifies(tcp_pseudo(p) + p[20:]) for p in packets)


def test_plain_packets_completes_a_partial_checksum() -> None:
    """NEEDS_CSUM: the field holds the pseudo-header sum; the result must verify."""
    packet = bytearray(tcp_super_segment(b"hello, overlay"))
    pseudo_sum = (~reference_checksum(tcp_pseudo(bytes(packet)))) & 0xFFFF  # folded, not complemented
    packet[36:38] = pseudo_sum.to_bytes(2, "big")
    (fixed,) = ncctl.plain_packets(vnet(flags=ncctl.VNET_F_NEEDS_CSUM, csum_start=20, csum_offset=16) + bytes(packet))
    assert verifies(tcp_pseudo(fixed) + fixed[20:])
    assert fixed[40:] == b"hello, overlay"


def test_plain_packets_passes_ordinary_packets_and_drops_what_it_cannot_handle() -> None:
    """No offload flags: the packet as is; unknown GSO types, runts and bad offsets: nothing."""
    packet = tcp_super_segment(b"x" * 100)
    assert ncctl.plain_packets(vnet() + packet) == [packet]
    assert ncctl.plain_packets(vnet(gso_type=4, gso_size=1000) + packet) == []  # TCPv6 on an IPv4 overlay
    assert ncctl.plain_packets(b"\0" * 5) == []
    assert ncctl.plain_packets(vnet(flags=ncctl.VNET_F_NEEDS_CSUM, csum_start=200, csum_offset=16) + packet) == []
    assert ncctl.segment_tcp4(b"\x60" + packet[1:], 500) == []  # not IPv4


class PipeTun:
    """What TunReader needs of a Tun: a descriptor to read packets from, and its offload."""

    def __init__(self, offload: bool) -> None:
        self.fd, self.writer = os.pipe()
        self.offload = offload


@pytest.mark.parametrize(("offload", "gso"), [(False, False), (False, True), (True, True), (True, False)])
def test_a_tun_read_becomes_the_frames_the_peer_takes(offload: bool, gso: bool) -> None:
    """TunReader.frames, shared by server and client: as read (a GSO frame from a TUN with
    offload to a peer that takes them), or a super-packet cut into PACKET frames."""
    tun = PipeTun(offload)
    packet = tcp_super_segment(bytes(range(256)) * 12)
    read = vnet(ncctl.VNET_F_NEEDS_CSUM, ncctl.GSO_TCPV4, 1000, 20, 16) + packet if offload else packet
    try:
        os.write(tun.writer, read)
        reader = ncctl.TunReader(tun)  # type: ignore[arg-type]
        frames = reader.frames(reader.read(), gso)
    finally:
        os.close(tun.fd)
        os.close(tun.writer)
    if offload and not gso:
        assert frames == ncctl.plain_frames(read) and len(frames) == 4
    else:
        kind = ncctl.FRAME_GSO_PACKET if offload else ncctl.FRAME_PACKET
        assert frames == [ncctl.encode_frame(kind, read)]
