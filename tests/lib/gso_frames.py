"""GSO frames as a hostile node sends them, for the wire protocol's unit tests and the
hostile-peer end-to-end test: IPv4/TCP/UDP packet and virtio_net_hdr builders, and a
hypothesis strategy that breaks a few parts of a kernel-made frame. Pure: no processes."""

from __future__ import annotations

import socket
import struct

from hypothesis import strategies as st

import ncctl

SRC, DST = socket.inet_aton("10.1.1.2"), socket.inet_aton("10.1.1.3")


def ipv4(proto: int, l4: bytes, ihl: int = 5, src: bytes = SRC, dst: bytes = DST, total: int | None = None) -> bytes:
    options = b"\x01" * (ihl * 4 - 20)  # NOP options
    length = ihl * 4 + len(l4) if total is None else total
    return (
        struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, length & 0xFFFF, 7, 0x4000, 64, proto, 0, src, dst) + options + l4
    )


def tcp(payload: bytes, doff: int = 5) -> bytes:
    return (
        struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 1, doff << 4, 0x18, 65535, 0, 0)
        + b"\0" * (doff * 4 - 20)
        + payload
    )


def udp(payload: bytes) -> bytes:
    return struct.pack("!HHHH", 5000, 53, 8 + len(payload), 0) + payload


def vnet(
    flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0, csum_start: int = 0, csum_offset: int = 0
) -> bytes:
    return ncctl.VNET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


# -- fuzzing: random, truncated, oversized, fields around their bounds --------------------------

BOUNDARY_16 = st.sampled_from([0, 1, 6, 10, 12, 16, 19, 20, 40, 499, 500, 501, 1359, 1360, 1361, 0xFFFE, 0xFFFF])
FIELD_16 = st.one_of(BOUNDARY_16, st.integers(0, 0xFFFF))


FRAME_PARTS = ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset", "ihl", "doff", "total", "cut")


@st.composite
def hostile_gso_frames(draw: st.DrawFn) -> bytes:
    """A frame as a kernel makes it (TCP, UDP, ICMP or odd protocols, of any size), with
    a few of its parts (none, one, or several) replaced by any value, boundary values
    first: frames land on both sides of every check."""
    broken = draw(st.sets(st.sampled_from(FRAME_PARTS), max_size=3))

    def part(name: str, sane: int, hostile: st.SearchStrategy[int] = FIELD_16) -> int:
        return draw(hostile) if name in broken else sane

    proto = draw(st.sampled_from([socket.IPPROTO_TCP, socket.IPPROTO_UDP, socket.IPPROTO_ICMP, 0, 255]))
    data = b"d" * draw(st.sampled_from([0, 1, 499, 1360, 20_000, 65_000]) | st.integers(0, 3000))
    ihl, doff = part("ihl", 5, st.integers(0, 15)), part("doff", 5, st.integers(0, 15))
    l4 = tcp(data, doff=doff) if proto == socket.IPPROTO_TCP else udp(data) if proto == socket.IPPROTO_UDP else data
    packet = ipv4(proto, l4, ihl=ihl, total=draw(FIELD_16) if "total" in broken else None)
    packet = packet[: part("cut", len(packet), st.integers(0, len(packet)))]
    tso = proto == socket.IPPROTO_TCP and len(data) > 1360
    csum = {socket.IPPROTO_TCP: 16, socket.IPPROTO_UDP: 6}.get(proto)
    header = vnet(
        part("flags", 0 if csum is None else ncctl.VNET_F_NEEDS_CSUM, st.integers(0, 255)),
        part("gso_type", ncctl.GSO_TCPV4 if tso else 0, st.integers(0, 255)),
        part("hdr_len", 40, FIELD_16),
        part("gso_size", draw(st.integers(ncctl.GSO_MIN_SIZE, 1360)) if tso else 0),
        part("csum_start", 0 if csum is None else ihl * 4),
        part("csum_offset", csum or 0),
    )
    return header + packet
