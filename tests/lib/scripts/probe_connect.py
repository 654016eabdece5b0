"""Prints "open" when a TCP connection to 127.0.0.1:<argv[1]> succeeds, else "closed" and why."""

import socket
import sys

try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3).close()
    print("open")
except OSError as e:
    print("closed", e)
