"""Peer bytes a hostile node can send, against the pure functions of the wire protocol
(section 8 of ncctl.py): GSO frames (virtio_net_hdr + packet) checked and rebuilt by
gso_header, PACKET frames by check_packet, and the stream and HELLO parsers. Every input
ends in a clean result or a ProtocolError (BadFrame for data frames), and what passes is
safe to hand to a kernel or to cut into segments."""

from __future__ import annotations

import socket

import pytest
from gso_frames import DST, FIELD_16, SRC, hostile_gso_frames, ipv4, tcp, udp, vnet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ncctl

MTU = 1400
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tso_frame(data: int = 20_000, gso_size: int = MTU - 40, **fields: int) -> bytes:
    """A GSO frame payload as a node's kernel makes it: a TCP super-segment, partial checksum."""
    header = {"flags": ncctl.VNET_F_NEEDS_CSUM, "gso_type": ncctl.GSO_TCPV4, "hdr_len": 40}
    header.update(gso_size=gso_size, csum_start=20, csum_offset=16)
    header.update(fields)
    return vnet(**header) + ipv4(socket.IPPROTO_TCP, tcp(bytes(range(256)) * (data // 256) + b"x" * (data % 256)))


def reason(payload: bytes, mtu: int = MTU) -> str:
    with pytest.raises(ncctl.BadFrame) as caught:
        ncctl.gso_header(payload, mtu)
    return caught.value.reason


def passed_on(payload: bytes, mtu: int = MTU) -> bytes:
    """The frame payload as the server passes it on: the rebuilt header, then the packet."""
    return ncctl.gso_header(payload, mtu) + payload[ncctl.VNET_HDR_LEN :]


# -- what real kernels send passes, rebuilt to the same fields ---------------------------------


def test_a_kernel_tso_frame_passes_and_is_rebuilt_to_the_same_fields() -> None:
    frame = tso_frame()
    assert ncctl.gso_header(frame, MTU) == frame[: ncctl.VNET_HDR_LEN]
    ecn = tso_frame(gso_type=ncctl.GSO_TCPV4 | ncctl.GSO_ECN)
    assert ncctl.gso_header(ecn, MTU) == ecn[: ncctl.VNET_HDR_LEN]


def test_plain_and_partially_checksummed_packets_pass() -> None:
    icmp = ipv4(socket.IPPROTO_ICMP, b"\x08\0\0\0" + b"p" * 56)
    assert ncctl.gso_header(vnet() + icmp, MTU) == vnet(hdr_len=20)
    datagram = ipv4(socket.IPPROTO_UDP, udp(b"q" * 100))
    partial = vnet(flags=ncctl.VNET_F_NEEDS_CSUM, hdr_len=28, csum_start=20, csum_offset=6)
    assert ncctl.gso_header(partial + datagram, MTU) == partial


def test_the_header_is_rebuilt_not_copied() -> None:
    """Fields that mean nothing for the frame are not passed on: hdr_len becomes the real
    header length, checksum offsets without NEEDS_CSUM become zero, gso_size without GSO too."""
    segment = ipv4(socket.IPPROTO_TCP, tcp(b"z" * 500))
    rebuilt = ncctl.gso_header(vnet(hdr_len=7, gso_size=999, csum_start=12, csum_offset=4) + segment, MTU)
    assert rebuilt == vnet(hdr_len=40)
    kept = ncctl.gso_header(vnet(flags=ncctl.VNET_F_DATA_VALID) + segment, MTU)
    assert kept == vnet(flags=ncctl.VNET_F_DATA_VALID, hdr_len=40)


# -- each field at its bounds --------------------------------------------------------------------


def test_gso_size_at_its_bounds() -> None:
    """gso_size from GSO_MIN_SIZE up to MTU minus the headers; the bomb (gso_size 1) is refused."""
    largest = MTU - 40
    assert ncctl.gso_header(tso_frame(gso_size=ncctl.GSO_MIN_SIZE), MTU)
    assert ncctl.gso_header(tso_frame(gso_size=largest), MTU)
    for bad in (0, 1, ncctl.GSO_MIN_SIZE - 1, largest + 1, 0xFFFF):
        assert reason(tso_frame(gso_size=bad)) == "gso-size", bad
    # TCP options make the header longer, so the largest segment payload smaller.
    with_options = vnet(ncctl.VNET_F_NEEDS_CSUM, ncctl.GSO_TCPV4, 52, largest, 20, 16)
    assert reason(with_options + ipv4(socket.IPPROTO_TCP, tcp(b"o" * 5000, doff=8))) == "gso-size"


def test_the_gso_bomb_costs_no_segmentation() -> None:
    """gso_size 1 on 64 KiB would be 65 000 segments: refused by the check, and the segmenter
    itself refuses an mss that small."""
    bomb = tso_frame(data=65_000, gso_size=1)
    assert reason(bomb) == "gso-size"
    assert ncctl.segment_tcp4(bomb[ncctl.VNET_HDR_LEN :], 1) == []
    assert ncctl.plain_packets(bomb) == []


def test_every_gso_type_but_tcpv4_is_refused() -> None:
    allowed = {ncctl.GSO_NONE, ncctl.GSO_TCPV4, ncctl.GSO_TCPV4 | ncctl.GSO_ECN}
    for gso_type in set(range(256)) - allowed:
        assert reason(tso_frame(gso_type=gso_type)) == "gso-type", gso_type
    assert reason(vnet(gso_type=ncctl.GSO_TCPV4, gso_size=600) + ipv4(socket.IPPROTO_UDP, udp(b"u" * 3000))) == (
        "gso-type"
    )


def test_unknown_flags_are_refused() -> None:
    for flag in (0x04, 0x08, 0x10, 0x80):
        assert reason(tso_frame(flags=ncctl.VNET_F_NEEDS_CSUM | flag)) == "gso-type"


def test_hdr_len_must_lie_inside_the_packet() -> None:
    frame = tso_frame(data=1000)
    length = len(frame) - ncctl.VNET_HDR_LEN
    assert ncctl.gso_header(tso_frame(data=1000, hdr_len=length), MTU)
    assert reason(tso_frame(data=1000, hdr_len=length + 1)) == "gso-hdr-len"


@pytest.mark.parametrize(
    ("csum_start", "csum_offset"),
    [
        (0, 12),  # the IP source address
        (12, 0),  # the same, from another start
        (0, 16),  # the IP destination address
        (0, 10),  # the IP header checksum
        (20, 0),  # the TCP ports
        (20, 18),  # beside the TCP checksum
        (24, 12),  # the TCP checksum's position, reached from a wrong start
        (21, 15),
        (20, 0xFFFF),  # far outside the packet
        (0xFFFF, 16),
    ],
)
def test_checksum_offsets_other_than_the_transport_checksum_are_refused(csum_start: int, csum_offset: int) -> None:
    """NEEDS_CSUM makes the kernel write a checksum at csum_start + csum_offset: anywhere but
    the TCP or UDP checksum field it could rewrite the source address after the spoof check."""
    assert reason(tso_frame(csum_start=csum_start, csum_offset=csum_offset)) == "gso-csum"
    plain = vnet(ncctl.VNET_F_NEEDS_CSUM, 0, 40, 0, csum_start, csum_offset) + ipv4(6, tcp(b"s" * 100))
    assert reason(plain) == "gso-csum"


def test_needs_csum_on_a_packet_without_a_transport_checksum_is_refused() -> None:
    icmp = ipv4(socket.IPPROTO_ICMP, b"\x08\0\0\0" + b"p" * 56)
    assert reason(vnet(flags=ncctl.VNET_F_NEEDS_CSUM, csum_start=20, csum_offset=2) + icmp) == "gso-csum"


def test_ip_options_move_the_checksum_start() -> None:
    """With IP options the transport header (and so csum_start) starts later."""
    packet = ipv4(socket.IPPROTO_TCP, tcp(b"o" * 3000), ihl=7)
    good = vnet(ncctl.VNET_F_NEEDS_CSUM, ncctl.GSO_TCPV4, 48, 1300, 28, 16)
    assert ncctl.gso_header(good + packet, MTU) == good
    assert reason(vnet(ncctl.VNET_F_NEEDS_CSUM, ncctl.GSO_TCPV4, 48, 1300, 20, 16) + packet) == "gso-csum"


def test_packets_that_are_not_whole_ipv4_are_refused() -> None:
    frame = tso_frame(data=3000)
    for cut in (0, 5, ncctl.VNET_HDR_LEN, ncctl.VNET_HDR_LEN + 19, ncctl.VNET_HDR_LEN + 40, len(frame) - 1):
        assert reason(frame[:cut]) in {"runt", "not-ipv4"}, cut
    assert reason(frame + b"trailing") == "not-ipv4"
    ipv6 = bytes([0x60]) + frame[ncctl.VNET_HDR_LEN + 1 :]
    assert reason(frame[: ncctl.VNET_HDR_LEN] + ipv6) == "not-ipv4"
    short_tcp = vnet() + ipv4(socket.IPPROTO_TCP, tcp(b"", doff=5)[:12] + b"\xf0" + b"\0" * 7)
    assert reason(short_tcp) == "not-ipv4"  # data offset 15 words in a 20-byte TCP header


def test_a_plain_packet_over_the_mtu_is_refused() -> None:
    assert reason(vnet() + ipv4(socket.IPPROTO_UDP, udp(b"b" * (MTU - 28 + 1)))) == "oversized"
    assert ncctl.gso_header(vnet() + ipv4(socket.IPPROTO_UDP, udp(b"b" * (MTU - 28))), MTU)
    with pytest.raises(ncctl.BadFrame, match="over the MTU"):
        ncctl.check_packet(ipv4(socket.IPPROTO_UDP, udp(b"b" * MTU)), MTU)
    with pytest.raises(ncctl.BadFrame) as caught:
        ncctl.check_packet(b"\x60" + bytes(59), MTU)
    assert caught.value.reason == "not-ipv4"
    assert ncctl.check_packet(ipv4(socket.IPPROTO_UDP, udp(b"b")), MTU) == (
        int.from_bytes(SRC, "big"),
        int.from_bytes(DST, "big"),
    )


# -- fuzzing: random, truncated, oversized, fields around their bounds --------------------------


def assert_safe(payload: bytes, mtu: int) -> None:
    """Either a clean BadFrame, or a rebuilt header under which every byte that leaves is safe."""
    try:
        header = ncctl.gso_header(payload, mtu)
    except ncctl.BadFrame as e:
        assert e.reason in {"runt", "not-ipv4", "gso-type", "gso-hdr-len", "gso-csum", "oversized", "gso-size"}
        assert str(e) and "\n" not in str(e)
        return
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = ncctl.VNET_HDR.unpack(header)
    packet = payload[ncctl.VNET_HDR_LEN :]
    src, dst = ncctl.ipv4_endpoints(packet)
    ihl = (packet[0] & 0x0F) * 4
    assert hdr_len <= len(packet)
    assert ncctl.gso_header(header + packet, mtu) == header, "a rebuilt header passes again, unchanged"
    if flags & ncctl.VNET_F_NEEDS_CSUM:
        assert csum_start == ihl, "the checksum is written after the IP header"
        assert csum_start + csum_offset + 2 <= min(hdr_len, len(packet))
    else:
        assert csum_start == csum_offset == 0
    pieces = ncctl.plain_packets(header + packet)
    assert len(pieces) <= ncctl.MAX_GSO_SEGMENTS
    for piece in pieces:
        assert len(piece) <= max(mtu, len(packet) if gso_type == ncctl.GSO_NONE else 0)
        assert ncctl.ipv4_endpoints(piece) == (src, dst), "the bytes that leave carry the checked addresses"
    if gso_type != ncctl.GSO_NONE:
        assert ncctl.GSO_MIN_SIZE <= gso_size <= mtu - 40


@given(payload=hostile_gso_frames(), mtu=st.sampled_from([576, 1400, 1500, 9000, 65535]))
@FUZZ
def test_hostile_gso_frames_are_refused_or_made_safe(payload: bytes, mtu: int) -> None:
    assert_safe(payload, mtu)


@given(payload=st.binary(max_size=3000), mtu=st.sampled_from([576, 1400]))
@FUZZ
def test_random_gso_payloads_are_refused_or_made_safe(payload: bytes, mtu: int) -> None:
    assert_safe(payload, mtu)


@given(cut=st.integers(0, 21_000))
@settings(deadline=None)
def test_truncated_tso_frames_are_refused(cut: int) -> None:
    frame = tso_frame()
    if cut < len(frame):
        assert reason(frame[:cut]) in {"runt", "not-ipv4"}


@given(
    flags=st.integers(0, 255),
    gso_type=st.integers(0, 255),
    hdr_len=FIELD_16,
    gso_size=FIELD_16,
    csum_start=FIELD_16,
    csum_offset=FIELD_16,
)
@FUZZ
def test_any_header_on_a_real_super_segment_is_refused_or_made_safe(
    flags: int, gso_type: int, hdr_len: int, gso_size: int, csum_start: int, csum_offset: int
) -> None:
    packet = tso_frame()[ncctl.VNET_HDR_LEN :]
    assert_safe(vnet(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) + packet, MTU)


# -- HELLO, at and over its bounds -------------------------------------------------------------

TOKEN = "a" * ncctl.NODE_TOKEN_LEN


def hello_payload(**fields: object) -> bytes:
    import json

    return json.dumps({"proto": 1, "nodeToken": TOKEN, "version": "1", "caps": [], **fields}).encode()


@given(
    version=st.text(max_size=200) | st.integers() | st.none() | st.lists(st.integers(), max_size=3),
    caps=st.lists(st.text(max_size=40), max_size=100),
    net_token=st.text(max_size=40),
    proto=st.integers(-(2**70), 2**70) | st.booleans() | st.text(max_size=5),
)
@FUZZ
def test_hello_fields_at_any_value_decode_or_raise_protocol_error(
    version: object, caps: list[str], net_token: str, proto: object
) -> None:
    payload = hello_payload(version=version, caps=caps, netToken=net_token, proto=proto)
    if len(payload) > ncctl.MAX_CONTROL_PAYLOAD:
        return
    try:
        hello = ncctl.Hello.decode(payload)
    except ncctl.ProtocolError:
        return
    assert len(hello.version) <= 32 and len(hello.caps) <= 32
    assert hello.node_token == TOKEN


@given(cut=st.integers(0, 200))
def test_truncated_hellos_raise_protocol_error(cut: int) -> None:
    payload = hello_payload(version="1.2.3")
    if cut < len(payload):
        with pytest.raises(ncctl.ProtocolError):
            ncctl.Hello.decode(payload[:cut])


# -- log lines a peer cannot forge -----------------------------------------------------------


def test_loggable_escapes_line_breaks_and_control_characters() -> None:
    forged = "1.0\n2026-11-30 00:00:00,000 INFO    network-server: node aaaa connected\r\x1b[2J\u2028\x85"
    text = ncctl.loggable(forged)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text and text.isprintable()
    assert text.startswith("1.0\\n2026-11-30") and "\\r\\x1b[2J\\u2028\\x85" in text
    assert ncctl.loggable("nc 0.3.0") == "nc 0.3.0"
    assert ncctl.loggable("x" * 500, limit=10) == "x" * 10 + "..."
    assert ncctl.loggable("a\\nb") == "a\\\\nb", "a literal backslash cannot pass for an escape"


@given(text=st.text(max_size=300), limit=st.integers(1, 300))
def test_loggable_output_is_one_printable_bounded_line(text: str, limit: int) -> None:
    out = ncctl.loggable(text, limit)
    assert out.isprintable()
    assert len(out) <= 10 * limit + 3  # \U0001xxxx is the longest escape
