"""argv: server, cert_dir, token, plan (JSON). Prints one JSON line: what happened."""

import json
import os
import random
import socket
import ssl
import struct
import sys
import threading
import time

server, cert_dir, token, plan = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
PACKET, GSO, ERROR, WELCOME = 0x10, 0x12, 0x03, 0x02
NEEDS_CSUM, GSO_TCPV4 = 1, 1
rng = random.Random(plan.get("seed", 1))


def frame(kind, payload=b""):
    return struct.pack("!I", kind << 24 | len(payload)) + payload


def vnet(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0):
    return struct.pack("=BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    return 0xFFFF - int.from_bytes(data, "big") % 0xFFFF


def ipv4(src, dst, proto, l4):
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(l4),
            1,
            0x4000,
            64,
            proto,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )
    )
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + l4


def udp(src, dst, port, data):
    return ipv4(src, dst, 17, struct.pack("!HHHH", 40000, port, 8 + len(data), 0) + data)


def tcp(src, dst, data):
    return ipv4(src, dst, 6, struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x18, 65535, 0, 0) + data)


context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
context.load_cert_chain(os.path.join(cert_dir, "client.crt"), os.path.join(cert_dir, "client.key"))


def connect():
    sock = context.wrap_socket(socket.create_connection((server, 6441), timeout=10), server_hostname="nc-server")
    hello = {"proto": 1, "nodeToken": token, "version": plan.get("version", "hostile"), "caps": ["gso"]}
    sock.sendall(frame(0x01, json.dumps(hello).encode()))
    kind, payload = read_frame(sock)
    if kind != WELCOME:
        raise SystemExit(f"no welcome: {kind:#x} {payload[:200]!r}")
    return sock, json.loads(payload)


def read_exact(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def read_frame(sock):
    word = struct.unpack("!I", read_exact(sock, 4))[0]
    return word >> 24, read_exact(sock, word & 0xFFFFFF)


class Reader(threading.Thread):
    """Reads until the server closes; remembers an ERROR frame."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock, self.refusal, self.closed = sock, None, threading.Event()

    def run(self):
        try:
            self.sock.settimeout(None)
            while True:
                kind, payload = read_frame(self.sock)
                if kind == ERROR:
                    self.refusal = json.loads(payload)
        except (OSError, EOFError, ValueError):
            pass
        self.closed.set()


def bad_frames(me, victim, server_ip):
    """Each kind of malformed frame, in turn."""
    bomb = tcp(me, victim, b"B" * 60000)
    while True:
        if not plan.get("gso_only"):
            yield frame(PACKET, os.urandom(rng.randint(0, 1500)))
        yield frame(GSO, os.urandom(rng.randint(0, 1500)))
        yield frame(GSO, vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1, 20, 16) + bomb)  # gso_size 1
        yield frame(GSO, vnet(NEEDS_CSUM, 0, 28, 0, 0, 12) + udp(me, victim, 7777, b"spoof"))  # csum over the source
        yield frame(GSO, vnet(NEEDS_CSUM, 0, 28, 0, 12, 0) + udp(me, server_ip, 7777, b"spoof"))


def fuzzed_frames(me, targets):
    """The frames a fuzzer wrote to plan["fuzz_file"] ([kind, hex] pairs), in order; an IPv4
    packet among them is sent from this node to one of the targets, its header checksum
    made right, so what passes the server's checks travels on as far as it can."""
    with open(plan["fuzz_file"]) as handle:
        made = json.load(handle)
    for index, (kind, hexed) in enumerate(made):
        payload = bytearray(bytes.fromhex(hexed))
        at = 10 if kind == GSO else 0
        ihl = (payload[at] & 0x0F) * 4 if len(payload) > at else 0
        if len(payload) >= at + max(ihl, 20) and payload[at] >> 4 == 4:
            payload[at + 12 : at + 20] = socket.inet_aton(me) + socket.inet_aton(targets[index % len(targets)])
            payload[at + 10 : at + 12] = b"\0\0"
            payload[at + 10 : at + 12] = checksum(bytes(payload[at : at + max(ihl, 20)])).to_bytes(2, "big")
        yield frame(kind, bytes(payload))


FUZZED = None  # one walk through the fuzzer's frames, across reconnects


def attack():
    global FUZZED
    sock, welcome = connect()
    me, victim, server_ip = welcome["ip"], plan["victim"], welcome["serverIp"]
    result = {"ip": me, "caps": welcome["caps"], "sent": 0}
    reader = Reader(sock)
    reader.start()
    # A genuine datagram first: proof that this session's packets do arrive.
    sock.sendall(frame(PACKET, udp(me, victim, 7777, b"genuine")))
    sock.sendall(frame(GSO, vnet() + udp(me, server_ip, 7777, b"genuine")))
    time.sleep(0.3)
    if plan.get("fuzz_file"):
        FUZZED = FUZZED or fuzzed_frames(me, [victim, server_ip, *plan.get("targets", [])])
        frames = FUZZED
    else:
        frames = bad_frames(me, victim, server_ip)
    # The two attacks (checksum-offset spoofs, GSO bombs), a few times each, then garbage until the server hangs up.
    for attack_frame in (
        []
        if plan.get("fuzz_file")
        else [frame(GSO, vnet(NEEDS_CSUM, 0, 28, 0, 0, 12) + udp(me, victim, 7777, b"spoof"))] * 3
        + [frame(GSO, vnet(NEEDS_CSUM, 0, 28, 0, 12, 0) + udp(me, server_ip, 7777, b"spoof"))] * 3
        + [frame(GSO, vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1, 20, 16) + tcp(me, victim, b"B" * 60000))] * 10
    ):
        sock.sendall(attack_frame)
        result["sent"] += 1
    deadline = min(time.monotonic() + plan.get("flood_s", 30), end)
    try:
        while not reader.closed.is_set() and time.monotonic() < deadline:
            sock.sendall(next(frames))
            result["sent"] += 1
            if plan.get("pace"):
                time.sleep(plan["pace"])
    except StopIteration:
        result["exhausted"] = True
    except OSError as e:
        result["send_error"] = str(e)
    reader.closed.wait(1 if result.get("exhausted") else 10)
    result["closed"] = reader.closed.is_set()
    result["refusal"] = reader.refusal
    sock.close()
    return result


rounds = []
end = time.monotonic() + plan.get("total_s", 3600)
for _ in range(plan.get("rounds", 1)):
    if rounds and (time.monotonic() > end or rounds[-1].get("exhausted")):
        break
    try:
        rounds.append(attack())
    except (OSError, EOFError) as e:  # a refused reconnect, say
        rounds.append({"error": str(e)})
print(json.dumps(rounds), flush=True)
