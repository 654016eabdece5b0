"""UDP datagrams of 1300 bytes to port 9 of each address in argv[1] (comma-separated) until
argv[2] MiB are sent; prints how much."""

import socket
import sys
import time

ips, megabytes = sys.argv[1].split(","), int(sys.argv[2])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload, sent = b"x" * 1300, 0
while sent < megabytes << 20:
    for ip in ips:
        try:
            sock.sendto(payload, (ip, 9))
            sent += len(payload)
        except OSError:  # a full TUN queue: give it a moment
            time.sleep(0.001)
print("sent", sent, flush=True)
