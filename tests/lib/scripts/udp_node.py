"""argv: repo, server, plan (JSON). Prints one JSON line: what happened."""

import base64
import json
import os
import socket
import ssl
import struct
import sys
import time

sys.path.insert(0, sys.argv[1])
import ncctl

server, plan = sys.argv[2], json.loads(sys.argv[3])


def seal(keys, frame):
    return keys.seal([frame])[0]


def open_datagram(keys, datagram):
    header = ncctl.datagram_header(datagram)
    if header is None:
        raise ncctl.BadDatagram("malformed")
    return keys.open(datagram, header[1])


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    return 0xFFFF - int.from_bytes(data, "big") % 0xFFFF


def ping(src, dst, seq):
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x4E43, seq) + b"udp-test" * 4)
    icmp[2:4] = checksum(bytes(icmp)).to_bytes(2, "big")
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(icmp),
            seq,
            0x4000,
            64,
            1,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )
    )
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return ncctl.encode_frame(ncctl.FRAME_PACKET, bytes(header) + bytes(icmp))


class Session:
    def __init__(self, cert_dir, token):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.load_cert_chain(os.path.join(cert_dir, "client.crt"), os.path.join(cert_dir, "client.key"))
        raw = socket.create_connection((server, 6441), timeout=10)
        self.tls = context.wrap_socket(raw, server_hostname=ncctl.SERVER_TLS_NAME)
        private, share = ncctl.new_x25519()
        self.tls.sendall(ncctl.Hello(token, caps=("udp",), udp_key=share).encode())
        kind, payload = self.read_frame()
        assert kind == ncctl.FRAME_WELCOME, (kind, payload)
        w = ncctl.Welcome.decode(payload)
        transcript = ncctl.datagram_transcript(share, w.udp_key, w.udp_session, token)
        self.keys = ncctl.DatagramKeys.for_node(w.udp_session, *ncctl.datagram_keys(private, w.udp_key, transcript))
        self.ip, self.server_ip, self.port = w.ip, w.server_ip, w.udp_port
        self.tls.sendall(ncctl.encode_control(ncctl.FRAME_TRANSPORT, {"transport": "udp"}))
        self.seq = 0

    def read_frame(self):
        data = b""
        while len(data) < ncctl.FRAME_HEADER.size:
            data += self.tls.recv(ncctl.FRAME_HEADER.size - len(data))
        length = ncctl.FRAME_HEADER.unpack(data)[0] & 0xFFFFFF
        body = b""
        while len(body) < length:
            body += self.tls.recv(length - len(body))
        return data[0], body

    def sealed_ping(self):
        self.seq += 1
        return self.seq, seal(self.keys, ping(self.ip, self.server_ip, self.seq))


def udp_socket(bind_ip=""):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind_ip, 0))
    sock.settimeout(0.05)
    return sock


def answered(session, sock, wait=1.0):
    """The echo-reply sequence numbers that arrive on sock within wait, and any datagram at all."""
    seqs, anything = [], 0
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            datagram = sock.recv(65536)
        except socket.timeout:  # TimeoutError only from 3.10 on
            continue
        anything += 1
        try:
            frame = open_datagram(session.keys, datagram)
        except ncctl.BadDatagram:
            continue
        packet = frame[4:]
        if len(packet) >= 28 and packet[9] == 1 and packet[20] == 0:
            seqs.append(struct.unpack("!H", packet[26:28])[0])
    return sorted(seqs), anything


result = {}
a = Session(plan["cert_dirs"][0], plan["tokens"][0])
b = Session(plan["cert_dirs"][1], plan["tokens"][1])
target = (server, a.port)
first = udp_socket()

seq, genuine = a.sealed_ping()
first.sendto(genuine, target)
result["genuine"] = answered(a, first)[0] == [seq]

first.sendto(genuine, target)  # the very same bytes again
result["replayed"] = answered(a, first)[0]

late = [a.sealed_ping() for _ in range(3)]
for index in (2, 0, 1):
    first.sendto(late[index][1], target)
result["reordered"] = answered(a, first)[0] == sorted(s for s, _ in late)

seq, whole = a.sealed_ping()
for cut in (whole[:-1], whole[: len(whole) // 2], whole[:20]):
    first.sendto(cut, target)
result["truncated"] = answered(a, first)[0]

seq, forged = a.sealed_ping()
forged = bytearray(forged)
forged[-20] ^= 0x40
first.sendto(bytes(forged), target)
result["forged"] = answered(a, first)[0]

seq, crossed = a.sealed_ping()
crossed = bytearray(crossed)
crossed[4:8] = b.keys.session_id.to_bytes(4, "big")  # a's datagram under b's session
first.sendto(bytes(crossed), target)
result["cross_session_a"] = answered(a, first)[0]
result["cross_session_b"] = answered(b, first, 0.2)[0]

# A stranger who never authenticated: garbage, a guessed session, a captured datagram.
stranger = udp_socket()
stranger.sendto(os.urandom(100), target)
stranger.sendto(struct.pack("!BxxxIQ", 1, a.keys.session_id, 10**6) + os.urandom(60), target)
stranger.sendto(struct.pack("!BxxxIQ", 1, a.keys.session_id ^ b.keys.session_id ^ 1, 0) + os.urandom(60), target)
stranger.sendto(genuine, target)
result["stranger_got"] = answered(a, stranger, 1.5)[1]

# A datagram captured on its way (it never reached the server) and replayed from a third
# address after newer ones arrived: authentic and unseen, so its ping is answered, but to
# the node's own address; only a datagram newer than any seen moves the session.
held_seq, held = a.sealed_ping()
seq, newer = a.sealed_ping()
first.sendto(newer, target)
answered(a, first)
thief = udp_socket(plan["thief_ip"])
thief.sendto(held, target)
result["thief_got"] = answered(a, thief)[1]
result["held_answered_home"] = answered(a, first, 0.2)[0] == [held_seq]

# The node moves: a new source port, then a new underlay address; answers follow it.
moved = udp_socket()
seq, hello_again = a.sealed_ping()
moved.sendto(hello_again, target)
result["moved_port"] = answered(a, moved)[0] == [seq]
elsewhere = udp_socket(plan["new_ip"])
seq, from_there = a.sealed_ping()
elsewhere.sendto(from_there, target)
result["moved_address"] = answered(a, elsewhere)[0] == [seq]
seq, again = a.sealed_ping()
elsewhere.sendto(again, target)
got_there = answered(a, elsewhere)[0]
result["old_socket_got"] = answered(a, first, 0.2)[1] + answered(a, moved, 0.2)[1]
result["stays_moved"] = got_there == [seq]

# Fresh keys over TLS: the server answers REKEY with a new session id and share; once the
# node seals with the new keys the server answers with them, and the old keys are retired.
private, share = ncctl.new_x25519()
a.tls.sendall(ncctl.encode_control(ncctl.FRAME_REKEY, {"udpKey": base64.b64encode(share).decode()}))
kind, payload = a.read_frame()
while kind != ncctl.FRAME_REKEY:
    kind, payload = a.read_frame()
answer = json.loads(payload)
server_share = base64.b64decode(answer["udpKey"])
transcript = ncctl.datagram_transcript(share, server_share, answer["udpSession"], plan["tokens"][0])
old_keys = a.keys
a.keys = ncctl.DatagramKeys.for_node(answer["udpSession"], *ncctl.datagram_keys(private, server_share, transcript))
seq, fresh = a.sealed_ping()
elsewhere.sendto(fresh, target)
result["rekeyed"] = answered(a, elsewhere)[0] == [seq] and a.keys.session_id != old_keys.session_id
stale = seal(old_keys, ping(a.ip, a.server_ip, 999))
elsewhere.sendto(stale, target)
result["old_keys_answered"] = answered(a, elsewhere)[1]
print(json.dumps(result), flush=True)
