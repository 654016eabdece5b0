"""Sessions that stop reading: argv = server, port, work_dir... For each node work dir, a HELLO
with its network certificate; prints its welcome, then sends keepalives but never reads."""

import json
import os
import re
import socket
import ssl
import struct
import sys
import time
from pathlib import Path

server, port, work_dirs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
socks = []
for work_dir in work_dirs:
    token = re.search(r"^\s*token:\s*'?(\w+)", Path(work_dir, "client.yml").read_text(), re.M).group(1)
    tls_dir = os.path.join(work_dir, "tls", "network")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.load_cert_chain(os.path.join(tls_dir, "client.crt"), os.path.join(tls_dir, "client.key"))
    raw = socket.create_connection((server, port), timeout=10)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # so the server's queue, not ours, fills
    sock = context.wrap_socket(raw, server_hostname="nc-server")
    hello = json.dumps({"proto": 1, "nodeToken": token, "version": "slow", "caps": []}).encode()
    sock.sendall(struct.pack("!I", 0x01 << 24 | len(hello)) + hello)
    header = b""
    while len(header) < 4:
        header += sock.recv(4 - len(header))
    kind, length = header[0], int.from_bytes(header[1:], "big")
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    assert kind == 0x02, body
    print("welcome", json.loads(body)["ip"], flush=True)
    socks.append(sock)
print("all welcomed", flush=True)
while True:  # alive (keepalives out) but never reading
    time.sleep(1.0)
    for sock in socks:
        sock.sendall(struct.pack("!I", 0x11 << 24))
