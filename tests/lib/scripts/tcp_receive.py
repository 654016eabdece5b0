"""Receives one TCP stream on <ip>:7000 (argv[1]); prints its length and sha256."""

import hashlib
import socket
import sys

listener = socket.create_server((sys.argv[1], 7000))
print("listening", flush=True)
conn, _ = listener.accept()
digest, total = hashlib.sha256(), 0
while chunk := conn.recv(1 << 20):
    digest.update(chunk)
    total += len(chunk)
print(total, digest.hexdigest(), flush=True)
