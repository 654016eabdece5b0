"""Helpers for the trust tests: a raw data-plane HELLO with any certificate, node-side
gRPC calls, and concurrent joins and sessions from one process."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from control_helpers import grpc_call, node_tls
from netlab import ROOT, Host

SERVER_IP = "198.18.0.1"
CONTROL = f"{SERVER_IP}:6440"
BOOTSTRAP = f"{SERVER_IP}:6439"

# One data-plane HELLO with the given network certificate: prints the server's
# answer (a welcome or an error frame) as one JSON line.
_HELLO = r"""
import json, socket, ssl, struct, sys
server, cert_dir, token, net_token = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
context.load_cert_chain(cert_dir + "/client.crt", cert_dir + "/client.key")
try:
    sock = context.wrap_socket(socket.create_connection((server, 6441), timeout=10), server_hostname="nc-server")
    body = json.dumps({"proto": 1, "nodeToken": token, "version": "probe", "caps": [], "netToken": net_token}).encode()
    sock.sendall(struct.pack("!I", 0x01 << 24 | len(body)) + body)
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            raise ConnectionError("closed before answering")
        head += chunk
    (word,) = struct.unpack("!I", head)
    kind, size = word >> 24, word & 0xFFFFFF
    payload = b""
    while len(payload) < size:
        payload += sock.recv(size - len(payload))
    print(json.dumps({"kind": kind, "message": json.loads(payload)}))
except (OSError, ssl.SSLError) as e:
    print(json.dumps({"kind": None, "message": {"error": str(e)}}))
"""


def hello_answer(host: Host, cert_dir: Path, token: str, net_token: str = "") -> dict:
    """The server's answer to one HELLO: {"kind": 2 (welcome) or 3 (error), "message": {...}}."""
    done = host.run(sys.executable, "-c", _HELLO, SERVER_IP, str(cert_dir), token, net_token, timeout=30)
    return json.loads(done.stdout.strip().splitlines()[-1])


def node_call(host: Host, work: Path, method: str, request: str, creds: dict | None = None, **fields: object) -> dict:
    """A LiteKubeNCService call with the node's own gRPC certificate (or the given one)."""
    creds = creds or node_tls(work, "grpc")
    return grpc_call(host, CONTROL, "LiteKubeNCService", method, request, **creds, **fields)


def keep_copy(creds: dict[str, Path], where: Path) -> dict[str, Path]:
    """A copy of a set of credentials as they are now (renewal replaces the originals)."""
    where.mkdir(parents=True, exist_ok=True)
    return {name: Path(shutil.copy(path, where / path.name)) for name, path in creds.items()}


# Joins count nodes with GetToken from threads at once, then opens one HELLO
# session per joined node at once; prints the outcome of both as one JSON line and
# holds the sessions open until <out>/release exists.
_SWARM = r"""
import base64, json, os, socket, ssl, struct, sys, threading
sys.path.insert(0, sys.argv[1])
import grpc
from proto import nc_pb2, nc_pb2_grpc
server, ca_path, join_token, net_token, count, out = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]), sys.argv[7]
ca = open(ca_path, "rb").read()
joined, sessions, lock = {}, {}, threading.Lock()
start = threading.Barrier(count)

def join(n):
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(server + ":6439", creds, options=[("grpc.ssl_target_name_override", "nc-server")]) as ch:
        start.wait()
        r = nc_pb2_grpc.LiteKubeNCBootstrapServiceStub(ch).GetToken(nc_pb2.GetTokenRequest(bootStrapToken=join_token), timeout=60)
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
"""


def swarm_script(directory: Path) -> Path:
    path = directory / "swarm.py"
    path.write_text(_SWARM)
    return path


def swarm_args(ca: Path, join_token: str, net_token: str, count: int, out: Path) -> list[str]:
    return [str(ROOT), SERVER_IP, str(ca), join_token, net_token, str(count), str(out)]
