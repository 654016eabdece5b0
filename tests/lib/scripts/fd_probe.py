"""argv = server, port, count. Opens count TCP connections to server:port at once and,
1.5 s later, tells which the server refused (reset or closed: at once, as it should when
out of descriptors) and which it still holds (a handshake it waits for). Prints one JSON
line {"held": H, "refused": R}, then keeps the held ones open for 4 s."""

import json
import socket
import sys
import time

server, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = []
held = refused = 0
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect((server, port))
    except socket.timeout:
        s.close()
        continue  # neither held nor refused: the count shows it missing
    except OSError:  # reset while connecting: refused at once too
        s.close()
        refused += 1
        continue
    s.setblocking(False)
    conns.append(s)
time.sleep(1.5)
for s in conns:
    try:
        data = s.recv(1)
        refused += not data
    except BlockingIOError:
        held += 1
    except OSError:
        refused += 1
print(json.dumps({"held": held, "refused": refused}), flush=True)
time.sleep(4)
