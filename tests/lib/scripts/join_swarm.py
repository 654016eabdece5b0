"""Joins count nodes with GetToken from threads at once, then opens one HELLO session per
joined node at once; prints the outcome of both as one JSON line and holds the sessions
open until <out>/release exists. argv = repo, server, ca, join_token, net_token, count, out."""

import base64
import json
import os
import socket
import ssl
import struct
import sys
import threading
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import grpc

from proto import nc_pb2, nc_pb2_grpc

server, ca_path, join_token, net_token, count, out = (
    sys.argv[2],
    sys.argv[3],
    sys.argv[4],
    sys.argv[5],
    int(sys.argv[6]),
    sys.argv[7],
)
ca = Path(ca_path).read_bytes()
joined, sessions, lock = {}, {}, threading.Lock()
start = threading.Barrier(count)


def join(n):
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(server + ":6439", creds, options=[("grpc.ssl_target_name_override", "nc-server")]) as ch:
        start.wait()
        r = nc_pb2_grpc.LiteKubeNCBootstrapServiceStub(ch).GetToken(
            nc_pb2.GetTokenRequest(bootStrapToken=join_token), timeout=60
        )
    if r.code != "200":
        with lock:
            joined[n] = {"refused": r.message}
        return
    d = os.path.join(out, str(n))
    os.makedirs(d, exist_ok=True)
    for name, value in (("client.crt", r.NetworkClientCert), ("client.key", r.NetworkClientKey)):
        with open(os.path.join(d, name), "wb") as f:
            f.write(base64.b64decode(value))
    with lock:
        joined[n] = {"token": r.token, "dir": d}


def connect(n, token, d, hold):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(d + "/client.crt", d + "/client.key")
    sock = context.wrap_socket(socket.create_connection((server, 6441), timeout=30), server_hostname="nc-server")
    body = json.dumps({"proto": 1, "nodeToken": token, "version": "swarm", "caps": [], "netToken": net_token}).encode()
    start.wait()
    sock.sendall(struct.pack("!I", 0x01 << 24 | len(body)) + body)
    head = b""
    while len(head) < 4:
        head += sock.recv(4 - len(head))
    (word,) = struct.unpack("!I", head)
    payload = b""
    while len(payload) < word & 0xFFFFFF:
        payload += sock.recv((word & 0xFFFFFF) - len(payload))
    with lock:
        sessions[token] = {"kind": word >> 24, "message": json.loads(payload)}
        hold.append(sock)


threads = [threading.Thread(target=join, args=(n,)) for n in range(count)]
[t.start() for t in threads]
[t.join() for t in threads]
ok = [(n, j["token"], j["dir"]) for n, j in joined.items() if "token" in j]
hold = []
start = threading.Barrier(len(ok))
threads = [threading.Thread(target=connect, args=(n, t, d, hold)) for n, t, d in ok]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"joined": joined, "sessions": sessions}), flush=True)
while not os.path.exists(os.path.join(out, "release")):  # hold every session open until the test is done
    threading.Event().wait(0.1)
