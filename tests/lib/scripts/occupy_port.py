"""A dual-stack TCP listener on port argv[1], held for ten minutes (until it is stopped)."""

import socket
import sys
import time

s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
time.sleep(600)
