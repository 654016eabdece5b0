"""The wire protocol (section 8 of ncctl.py): frames, handshake messages and the
IPv4 header peek, as pure functions of bytes, checked with hypothesis."""

from __future__ import annotations

import ipaddress
import json
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ncctl

CONTROL_KINDS = st.integers(0, ncctl.FRAME_PACKET - 1)
DATA_KINDS = st.integers(ncctl.FRAME_PACKET, 0xFF)
TOKENS = st.text(alphabet=ncctl.TOKEN_ALPHABET, min_size=ncctl.NODE_TOKEN_LEN, max_size=ncctl.NODE_TOKEN_LEN)
SHORT_TEXT = st.text(max_size=24)
IPV4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
NETWORKS = st.builds(
    lambda n, p: str(ipaddress.IPv4Network((n, p), strict=False)), st.integers(0, 2**32 - 1), st.integers(0, 32)
)


def frames_strategy(max_payload: int = 600) -> st.SearchStrategy[list[tuple[int, bytes]]]:
    """Lists of (kind, payload) that are all within the protocol's limits."""
    frame = st.one_of(
        st.tuples(CONTROL_KINDS, st.binary(max_size=min(max_payload, ncctl.MAX_CONTROL_PAYLOAD))),
        st.tuples(DATA_KINDS, st.binary(max_size=max_payload)),
    )
    return st.lists(frame, max_size=30)


def feed(stream: bytes, cuts: list[int]) -> tuple[list[tuple[int, bytes]], int]:
    """Feed stream into a FrameBuffer the way Link.receive does, split at cuts;
    returns the frames that came out and how many bytes wait for more."""
    buffer = ncctl.FrameBuffer()
    got: list[tuple[int, bytes]] = []
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(stream)}), len(stream)]
    for low, high in zip(bounds, bounds[1:]):
        chunk = stream[low:high]
        while chunk:
            space = buffer.space()
            count = min(len(space), len(chunk))
            space[:count] = chunk[:count]
            buffer.commit(count)
            chunk = chunk[count:]
            # Copy payloads out at once: space() may move the bytes on the next round.
            got.extend((kind, bytes(buffer.view[start:end])) for kind, start, end in buffer.frames())
    return got, buffer.end - buffer.start


def read_through_buffer(stream: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    """The frames of a complete stream; nothing may be left over."""
    got, left = feed(stream, cuts)
    assert left == 0, f"{left} bytes of a complete stream were left in the buffer"
    return got


# -- frames ---------------------------------------------------------------------------------


@given(frames=frames_strategy(), cuts=st.lists(st.integers(0, 20_000), max_size=40))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_frame_sequences_survive_any_chunking(frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    """encode_frame + FrameBuffer return exactly the frames sent, however TLS splits the stream."""
    stream = b"".join(ncctl.encode_frame(kind, payload) for kind, payload in frames)
    assert read_through_buffer(stream, cuts) == frames


@given(frames=frames_strategy(), data=st.data())
@settings(deadline=None)
def test_next_frame_walks_a_stream_and_waits_for_incomplete_frames(
    frames: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    """next_frame gives (kind, start, end) for each whole frame and None for any cut-off tail."""
    stream = b"".join(ncctl.encode_frame(kind, payload) for kind, payload in frames)
    position = 0
    for kind, payload in frames:
        found = ncctl.next_frame(stream, position, len(stream))
        assert found == (kind, position + 4, position + 4 + len(payload))
        assert stream[found[1] : found[2]] == payload
        cut = data.draw(st.integers(position, found[2] - 1), label="cut inside this frame")
        assert ncctl.next_frame(stream, position, cut) is None
        position = found[2]
    assert ncctl.next_frame(stream, position, len(stream)) is None


def test_largest_frames_pass_through_the_buffer() -> None:
    """A packet frame of MAX_PAYLOAD and a control frame of MAX_CONTROL_PAYLOAD are accepted whole."""
    frames = [
        (ncctl.FRAME_PACKET, bytes(range(256)) * (ncctl.MAX_PAYLOAD // 256) + b"x" * (ncctl.MAX_PAYLOAD % 256)),
        (ncctl.FRAME_HELLO, b"h" * ncctl.MAX_CONTROL_PAYLOAD),
        (ncctl.FRAME_PACKET, b"y" * ncctl.MAX_PAYLOAD),
        (ncctl.FRAME_KEEPALIVE, b""),
    ] * 3
    stream = b"".join(ncctl.encode_frame(kind, payload) for kind, payload in frames)
    for step in (1_000, 7_777, 65_536, len(stream)):
        assert read_through_buffer(stream, list(range(step, len(stream), step))) == frames


@given(
    kind=DATA_KINDS,
    length=st.integers(ncctl.MAX_PAYLOAD + 1, 0xFFFFFF),
    tail=st.binary(max_size=64),
)
def test_oversized_data_frame_is_refused_from_its_header(kind: int, length: int, tail: bytes) -> None:
    """A declared length over MAX_PAYLOAD raises ProtocolError as soon as the 4-byte header is in."""
    header = struct.pack("!I", kind << 24 | length)
    with pytest.raises(ncctl.ProtocolError):
        ncctl.next_frame(header + tail, 0, 4 + len(tail))
    buffer = ncctl.FrameBuffer()
    space = buffer.space()
    space[:4] = header
    buffer.commit(4)
    with pytest.raises(ncctl.ProtocolError):
        list(buffer.frames())


@given(kind=CONTROL_KINDS, length=st.integers(ncctl.MAX_CONTROL_PAYLOAD + 1, 0xFFFFFF))
def test_oversized_control_frame_is_refused(kind: int, length: int) -> None:
    """Handshake/control frames (types below 0x10) are limited to MAX_CONTROL_PAYLOAD."""
    with pytest.raises(ncctl.ProtocolError):
        ncctl.next_frame(struct.pack("!I", kind << 24 | length), 0, 4)


@given(junk=st.binary(max_size=2_000), cuts=st.lists(st.integers(0, 2_000), max_size=10))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_in_the_frame_buffer_raise_only_protocol_error(junk: bytes, cuts: list[int]) -> None:
    """Garbage on the stream either yields frames, waits for more, or raises ProtocolError."""
    try:
        frames, left = feed(junk, cuts)
    except ncctl.ProtocolError:
        return
    assert all(0 <= kind <= 0xFF for kind, _ in frames)
    assert sum(4 + len(payload) for _, payload in frames) + left == len(junk)


# -- handshake messages -------------------------------------------------------------------------


def payload_of(frame: bytes, kind: int) -> bytes:
    found = ncctl.next_frame(frame, 0, len(frame))
    assert found is not None and found[0] == kind and found[2] == len(frame)
    return frame[found[1] : found[2]]


@given(
    token=st.one_of(TOKENS, st.just(ncctl.RESERVED_NODE_TOKEN)),
    version=st.text(max_size=32),
    caps=st.lists(SHORT_TEXT, max_size=32).map(tuple),
    proto=st.integers(1, 2**31),
)
def test_hello_round_trip(token: str, version: str, caps: tuple[str, ...], proto: int) -> None:
    """Hello.encode is a HELLO frame that Hello.decode turns back into the same message."""
    hello = ncctl.Hello(token, version, caps, proto)
    assert ncctl.Hello.decode(payload_of(hello.encode(), ncctl.FRAME_HELLO)) == hello


def test_hello_carries_the_name_a_node_asks_for_and_an_older_hello_none() -> None:
    """The name is an optional hello field: sent only when set (an older server ignores
    it), absent from an older node's hello (the server then names it by hostName)."""
    named = ncctl.Hello("a" * 16, host_name="vm", name="edge-7")
    assert ncctl.Hello.decode(payload_of(named.encode(), ncctl.FRAME_HELLO)).name == "edge-7"
    older = ncctl.Hello("a" * 16, host_name="vm")
    assert b'"name"' not in older.encode()
    assert ncctl.Hello.decode(payload_of(older.encode(), ncctl.FRAME_HELLO)).name == ""
    with pytest.raises(ncctl.ProtocolError, match="name must be a string"):
        ncctl.Hello.decode(json.dumps({"proto": 1, "nodeToken": "a" * 16, "name": 7}).encode())


@st.composite
def usable_welcomes(draw: st.DrawFn) -> ncctl.Welcome:
    """Welcomes a node can configure: two distinct hosts of a subnet clear of the
    special-purpose ranges, and distinct routes clear of them too."""
    prefix = draw(st.integers(8, 30))
    network = draw(
        st.integers(0, 2**32 - 1)
        .map(lambda n: ipaddress.IPv4Network((n, prefix), strict=False))
        .filter(lambda net: ncctl.special_range(net) is None)
    )
    ip, server = draw(st.lists(st.integers(1, network.num_addresses - 2), min_size=2, max_size=2, unique=True))
    routes = draw(
        st.lists(
            NETWORKS.filter(lambda r: ncctl.special_range(ipaddress.IPv4Network(r)) is None), max_size=20, unique=True
        )
    )
    return ncctl.Welcome(
        str(network.network_address + ip),
        prefix,
        str(network.network_address + server),
        draw(st.integers(576, 65535)),
        draw(st.integers(1, 3600)),
        tuple(routes),
        tuple(draw(st.lists(SHORT_TEXT, max_size=10))),
    )


@given(welcome=usable_welcomes())
def test_welcome_round_trip(welcome: ncctl.Welcome) -> None:
    """Welcome.encode is a WELCOME frame that Welcome.decode turns back into the same message."""
    decoded = ncctl.Welcome.decode(payload_of(welcome.encode(), ncctl.FRAME_WELCOME))
    assert decoded == welcome
    assert decoded.interface == ipaddress.IPv4Interface(f"{welcome.ip}/{welcome.prefix}")


def test_welcome_drops_duplicate_routes() -> None:
    """The same route twice is kept once, in order (the kernel would refuse the second)."""
    message = {**WELCOME_FIELDS, "routes": ["192.0.2.0/24", "10.1.1.0/24", "192.0.2.0/24"]}
    welcome = ncctl.Welcome.decode(json.dumps(message).encode())
    assert welcome.routes == ("192.0.2.0/24", "10.1.1.0/24")


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"ip": "0.0.0.0", "prefix": 8}, "unusable address 0.0.0.0/8"),
        ({"ip": "127.0.0.2", "serverIp": "127.0.0.1", "prefix": 8}, "unusable address"),
        ({"ip": "169.254.1.2", "serverIp": "169.254.1.1"}, "unusable address"),
        ({"ip": "224.0.0.2", "serverIp": "224.0.0.1"}, "unusable address"),
        ({"ip": "255.255.255.254", "serverIp": "255.255.255.253"}, "unusable address"),
        ({"ip": "10.1.1.0"}, "unusable address 10.1.1.0/24"),
        ({"ip": "10.1.1.255"}, "unusable address 10.1.1.255/24"),
        ({"serverIp": "10.9.9.9"}, "names 10.9.9.9 as the server"),
        ({"serverIp": "10.1.1.2"}, "names 10.1.1.2 as the server"),
        ({"serverIp": "10.1.1.255"}, "names 10.1.1.255 as the server"),
        ({"routes": ["0.0.0.0/0"]}, "route 0.0.0.0/0, which overlaps 0.0.0.0/8"),
        ({"routes": ["224.0.0.0/4"]}, "route 224.0.0.0/4"),
        ({"routes": [f"192.0.{i // 256}.{i % 256}/32" for i in range(257)]}, "over 256 routes"),
    ],
)
def test_welcome_a_node_cannot_use_is_refused(changes: dict, complaint: str) -> None:
    """Addresses and routes that would break the node are a ProtocolError naming the problem."""
    payload = json.dumps({**WELCOME_FIELDS, **changes}).encode()
    with pytest.raises(ncctl.ProtocolError, match=complaint):
        ncctl.Welcome.decode(payload)


def test_refusal_retries_unless_told_false() -> None:
    """Only a JSON false ends the retries; "false", 0 or null do not."""

    def retry(value: object) -> bool:
        return ncctl.Refusal.decode(json.dumps({"code": "x", "retry": value}).encode()).retry

    assert retry(False) is False
    assert all(retry(value) is True for value in (True, "false", 0, None, []))
    assert ncctl.Refusal.decode(b'{"code": "x"}').retry is True


@given(code=st.text(max_size=64), reason=st.text(max_size=512), retry=st.booleans())
def test_refusal_round_trip(code: str, reason: str, retry: bool) -> None:
    """Refusal.encode is an ERROR frame that Refusal.decode turns back into the same message."""
    refusal = ncctl.Refusal(code, reason, retry)
    assert ncctl.Refusal.decode(payload_of(refusal.encode(), ncctl.FRAME_ERROR)) == refusal


def test_control_message_over_the_limit_is_not_encoded() -> None:
    """encode_control refuses what next_frame would refuse on the other side."""
    with pytest.raises(ncctl.ProtocolError):
        ncctl.Refusal("x", "y" * ncctl.MAX_CONTROL_PAYLOAD, True).encode()


DECODERS = [ncctl.Hello.decode, ncctl.Welcome.decode, ncctl.Refusal.decode, ncctl.decode_control]
AWKWARD_NUMBERS = st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, -1, 0, 2**64, -(2**63)])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | AWKWARD_NUMBERS | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


Decoder = Callable[[Any], object]


def decode_raises_only_protocol_error(decode: Decoder, payload: bytes | memoryview) -> None:
    try:
        decode(payload)
    except ncctl.ProtocolError:
        pass


@pytest.mark.parametrize("decode", DECODERS, ids=lambda d: d.__qualname__)
@given(payload=st.binary(max_size=ncctl.MAX_CONTROL_PAYLOAD))
def test_decoding_arbitrary_bytes_raises_only_protocol_error(decode: Decoder, payload: bytes) -> None:
    """Random bytes (as bytes and as a memoryview) never raise anything but ProtocolError."""
    decode_raises_only_protocol_error(decode, payload)
    decode_raises_only_protocol_error(decode, memoryview(payload))


VALID_FIELDS = {
    "proto": 1,
    "nodeToken": "a" * ncctl.NODE_TOKEN_LEN,
    "version": "0",
    "caps": [],
    "ip": "10.1.1.2",
    "prefix": 24,
    "serverIp": "10.1.1.1",
    "mtu": 1400,
    "keepalive": 2,
    "routes": ["10.1.1.0/24"],
    "code": "x",
    "reason": "y",
    "retry": False,
}


@pytest.mark.parametrize("field", sorted(VALID_FIELDS))
@pytest.mark.parametrize("decode", DECODERS, ids=lambda d: d.__qualname__)
@given(value=AWKWARD_NUMBERS | JSON_VALUES, dropped=st.sets(st.sampled_from(sorted(VALID_FIELDS)), max_size=2))
@settings(deadline=None)
def test_decoding_json_with_wrong_types_raises_only_protocol_error(
    decode: Decoder, field: str, value: object, dropped: set[str]
) -> None:
    """A valid message with one field replaced by any JSON value (inf, nan, lists, ...)
    and maybe others missing decodes or raises ProtocolError, never anything else."""
    message = {k: v for k, v in {**VALID_FIELDS, field: value}.items() if k not in dropped}
    payload = json.dumps(message).encode()
    assume(len(payload) <= ncctl.MAX_CONTROL_PAYLOAD)
    decode_raises_only_protocol_error(decode, payload)


WELCOME_FIELDS = {"ip": "10.1.1.2", "prefix": 24, "serverIp": "10.1.1.1", "mtu": 1400, "keepalive": 2}


@pytest.mark.parametrize("decode", DECODERS, ids=lambda d: d.__qualname__)
@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"[" * 3000, id="nested-arrays"),
        pytest.param(b'{"a":' * 800, id="nested-objects"),
        pytest.param(b'{"proto":1,"nodeToken":"aaaaaaaaaaaaaaaa","caps":' + b"[" * 3500, id="nested-in-hello"),
        pytest.param(json.dumps({**WELCOME_FIELDS, "prefix": 1e400}).encode(), id="infinite-prefix"),
        pytest.param(json.dumps({**WELCOME_FIELDS, "mtu": float("-inf")}).encode(), id="infinite-mtu"),
        pytest.param(json.dumps({**WELCOME_FIELDS, "keepalive": float("nan")}).encode(), id="nan-keepalive"),
    ],
)
def test_hostile_control_payloads_within_the_frame_limit_raise_only_protocol_error(
    decode: Decoder, payload: bytes
) -> None:
    """Payloads a peer can send in one legal control frame (<= 4096 bytes) raise only ProtocolError.

    Any other exception escapes the server's per-session error handling (which
    catches ProtocolError) and ends the network loop for every node.
    """
    assert len(payload) <= ncctl.MAX_CONTROL_PAYLOAD
    decode_raises_only_protocol_error(decode, payload)


# -- the IPv4 header peek --------------------------------------------------------------------


def ipv4_packet(src: int, dst: int, ihl: int = 5, payload: bytes = b"", total: int | None = None) -> bytes:
    header_len = ihl * 4
    length = header_len + len(payload) if total is None else total
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, length, 0, 0, 64, 1, 0, src.to_bytes(4, "big"), dst.to_bytes(4, "big")
    )
    return header + b"\0" * (header_len - 20) + payload


ADDRESSES = st.integers(0, 2**32 - 1)


@given(
    src=ADDRESSES, dst=ADDRESSES, ihl=st.integers(5, 15), payload=st.binary(max_size=100), slack=st.binary(max_size=8)
)
def test_ipv4_endpoints_of_valid_packets(src: int, dst: int, ihl: int, payload: bytes, slack: bytes) -> None:
    """A well-formed IPv4 packet (any IHL, trailing bytes allowed) gives its (src, dst)."""
    packet = ipv4_packet(src, dst, ihl, payload) + slack
    assert ncctl.ipv4_endpoints(packet) == (src, dst)
    assert ncctl.ipv4_endpoints(memoryview(packet)) == (src, dst)
    assert ncctl.ipv4_endpoints(bytearray(packet)) == (src, dst)


@given(packet=st.binary(max_size=19))
def test_ipv4_endpoints_refuses_runts(packet: bytes) -> None:
    """Anything shorter than a minimal IPv4 header gives None."""
    assert ncctl.ipv4_endpoints(packet) is None


@given(version=st.integers(0, 15).filter(lambda v: v != 4), rest=st.binary(min_size=39, max_size=80))
def test_ipv4_endpoints_refuses_other_versions(version: int, rest: bytes) -> None:
    """IPv6 (and any version nibble but 4) gives None."""
    assert ncctl.ipv4_endpoints(bytes([version << 4 | 5]) + rest) is None


def test_ipv4_endpoints_refuses_a_real_ipv6_header() -> None:
    """A genuine IPv6 header (40 bytes, version 6) gives None."""
    ipv6 = struct.pack("!IHBB16s16s", 6 << 28, 0, 58, 64, bytes(15) + b"\1", bytes(15) + b"\2")
    assert ncctl.ipv4_endpoints(ipv6) is None


@given(src=ADDRESSES, dst=ADDRESSES, ihl=st.integers(0, 4))
def test_ipv4_endpoints_refuses_short_ihl(src: int, dst: int, ihl: int) -> None:
    """An IHL below 5 (header under 20 bytes) gives None."""
    packet = bytearray(ipv4_packet(src, dst, payload=b"x" * 20))
    packet[0] = 0x40 | ihl
    assert ncctl.ipv4_endpoints(bytes(packet)) is None


@given(src=ADDRESSES, dst=ADDRESSES, ihl=st.integers(5, 15), payload=st.binary(max_size=60), data=st.data())
def test_ipv4_endpoints_refuses_bad_total_length(
    src: int, dst: int, ihl: int, payload: bytes, data: st.DataObject
) -> None:
    """A total length shorter than the header or longer than the bytes at hand gives None."""
    real = ihl * 4 + len(payload)
    total = data.draw(st.one_of(st.integers(0, ihl * 4 - 1), st.integers(real + 1, 0xFFFF)), label="total")
    assert ncctl.ipv4_endpoints(ipv4_packet(src, dst, ihl, payload, total)) is None


@given(src=ADDRESSES, dst=ADDRESSES, ihl=st.integers(6, 15))
def test_ipv4_endpoints_refuses_header_longer_than_the_packet(src: int, dst: int, ihl: int) -> None:
    """An IHL that claims options beyond the end of the bytes gives None."""
    packet = ipv4_packet(src, dst, 5, total=20)
    packet = bytes([0x40 | ihl]) + packet[1:]
    assert ncctl.ipv4_endpoints(packet) is None


@given(packet=st.binary(max_size=100))
def test_ipv4_endpoints_of_arbitrary_bytes_is_none_or_a_pair(packet: bytes) -> None:
    """Random bytes give None or the two addresses at offsets 12 and 16, never an exception."""
    found = ncctl.ipv4_endpoints(packet)
    if found is not None:
        assert found == (int.from_bytes(packet[12:16], "big"), int.from_bytes(packet[16:20], "big"))
        assert packet[0] >> 4 == 4
