"""argv = server, count, seconds: count connections to the network port, half of them stopped
after the TLS ClientHello, held for seconds; prints how many opened."""

import resource
import socket
import ssl
import sys
import time

resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
server, count = sys.argv[1], int(sys.argv[2])
socks = []
for i in range(count):
    try:
        s = socket.create_connection((server, 6441), timeout=2)
    except OSError:
        continue
    if i % 2:  # half of them start TLS and stop after the ClientHello
        s.setblocking(False)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        try:
            s = tls.wrap_socket(s, do_handshake_on_connect=False)
            s.do_handshake()
        except OSError:  # want-read, or the server already shed this one (EOF or reset)
            pass
    socks.append(s)
print("opened", len(socks), flush=True)
time.sleep(float(sys.argv[3]))
