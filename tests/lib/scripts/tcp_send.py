"""Sends argv[2] bytes to <ip>:7000 (argv[1]); prints their length and sha256."""

import hashlib
import socket
import sys

data = hashlib.sha256(b"nc").digest() * (int(sys.argv[2]) // 32)
with socket.create_connection((sys.argv[1], 7000), timeout=30) as conn:
    conn.sendall(data)
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
