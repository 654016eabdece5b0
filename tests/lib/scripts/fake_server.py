"""A fake nc network server: TLS with the real server's certificate, then each node's case."""

import json
import random
import socket
import ssl
import struct
import sys
import threading
import time

listen_ip, port, cert, key, nodes = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
WELCOME, ERROR, PACKET, KEEPALIVE = 0x02, 0x03, 0x10, 0x11


def frame(kind, payload=b"", declared=None):
    return struct.pack("!I", kind << 24 | (len(payload) if declared is None else declared)) + payload


def recv_exact(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError("the client closed the connection")
        data += chunk
    return data


def drain(sock, seconds):
    """Read and ignore what the client sends (keepalives) for a while, or until it closes."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return
        except socket.timeout:  # TimeoutError only from 3.10 on
            return


def answer(sock, case, node_ip, rng):
    def welcome(**changes):
        message = {
            "proto": 1,
            "ip": node_ip,
            "prefix": 24,
            "serverIp": "10.1.1.1",
            "mtu": 1400,
            "keepalive": 1,
            "routes": ["10.1.1.0/24"],
            "caps": [],
        }
        return frame(WELCOME, json.dumps({**message, **changes}).encode())

    if case == "close-after-handshake":
        return
    header = recv_exact(sock, 4)
    recv_exact(sock, int.from_bytes(header, "big") & 0xFFFFFF)  # the hello
    if case == "random-bytes":
        sock.sendall(rng.randbytes(65536))
    elif case == "oversized-length":
        sock.sendall(frame(WELCOME, b"{", declared=0xFFFFFF))
    elif case == "truncated-frame":
        sock.sendall(welcome()[:20])
    elif case == "invalid-json":
        sock.sendall(frame(WELCOME, b'{"ip": "' + node_ip.encode() + b'", "prefix": 24,,'))
    elif case == "wrong-types":
        sock.sendall(welcome(ip=167837954, prefix="24", routes="10.1.1.0/24"))
    elif case == "out-of-range":
        sock.sendall(welcome(prefix=33, mtu=10, keepalive=0))
    elif case == "error-frame-wrong-types":
        sock.sendall(frame(ERROR, json.dumps({"code": [7], "reason": None, "retry": "false"}).encode()))
    elif case == "nonsense-welcome":
        sock.sendall(welcome(ip="0.0.0.0", prefix=8, serverIp="255.255.255.255", mtu=65535, routes=[], caps=["?"]))
    elif case == "stall-after-hello":
        drain(sock, 3600)
    elif case == "keepalives-instead-of-welcome":
        while True:
            sock.sendall(frame(KEEPALIVE))
            time.sleep(2)
    elif case == "silent-after-welcome":
        sock.sendall(welcome(keepalive=1))
        drain(sock, 3600)
    elif case == "garbage-after-welcome":
        sock.sendall(welcome())
        time.sleep(0.2)
        sock.sendall(rng.randbytes(65536))
    elif case == "oversized-after-welcome":
        sock.sendall(welcome())
        time.sleep(0.2)
        sock.sendall(frame(PACKET, b"", declared=0xFFFFFF))
    elif case == "oversized-with-welcome":  # in the same TLS record, then nothing more
        sock.sendall(welcome() + frame(PACKET, b"", declared=0xFFFFFF))
        drain(sock, 3600)
    elif case == "duplicate-route":
        sock.sendall(welcome(ip="10.1.1.200", routes=["192.0.2.0/24", "192.0.2.0/24"]))
    elif case == "route-over-server":
        sock.sendall(welcome(ip="10.1.1.200", routes=[listen_ip + "/32"]))
    elif case == "subnet-over-server":  # the node would take an address beside the server's own
        sock.sendall(welcome(ip=listen_ip.rsplit(".", 1)[0] + ".200", serverIp=listen_ip.rsplit(".", 1)[0] + ".254"))
    elif case == "server-outside-subnet":
        sock.sendall(welcome(serverIp="10.9.9.9"))
    else:
        raise SystemExit(f"unknown case {case}")
    drain(sock, 0.5)  # let the client read it all before the close


def serve(raw, peer, number, context):
    case, node_ip = nodes[peer]
    name = f"{peer} {case} #{number}"
    try:
        with context.wrap_socket(raw, server_side=True) as sock:
            print(f"{name}: TLS up", flush=True)
            answer(sock, case, node_ip, random.Random(name))
    except (OSError, EOFError) as e:
        print(f"{name}: {e!r}", flush=True)
    print(f"{name}: closed", flush=True)


context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)  # and no client certificate is asked for
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((listen_ip, port))
listener.listen()
print("listening", flush=True)
counts = {}
while True:
    raw, (peer, _) = listener.accept()
    raw.settimeout(15)
    counts[peer] = counts.get(peer, 0) + 1
    threading.Thread(target=serve, args=(raw, peer, counts[peer], context), daemon=True).start()
