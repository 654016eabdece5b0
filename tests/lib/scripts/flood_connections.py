"""argv = server, ports (comma-separated), count, mode (idle or half-open), rate, and
optionally source addresses (comma-separated, used in turn): see flood_helpers.py.
Prints "opened" once every slot was tried, then "held N" lines."""

import collections
import resource
import select
import socket
import ssl
import sys
import time

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
server, ports, count, mode, rate = (
    sys.argv[1],
    [int(p) for p in sys.argv[2].split(",")],
    int(sys.argv[3]),
    sys.argv[4],
    float(sys.argv[5]),
)
sources = sys.argv[6].split(",") if len(sys.argv) > 6 and sys.argv[6] else []
family = socket.AF_INET6 if ":" in server else socket.AF_INET
tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
poll = select.epoll()
conns = {}  # fd -> (socket, port, connected)
todo = collections.deque(p for _ in range(count) for p in ports)  # first in, first out: every port gets its turn


def open_one(port):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        if sources:
            s.bind((sources[tried % len(sources)], 0))
        s.connect((server, port))
    except BlockingIOError:
        pass
    except OSError:
        s.close()
        todo.append(port)
        return
    conns[s.fileno()] = (s, port, False)
    poll.register(s.fileno(), select.EPOLLOUT)


def lost(fd):
    s, port, _ = conns.pop(fd)
    poll.unregister(fd)
    s.close()
    todo.append(port)


announced, last_print, credit, last, tried = False, 0.0, 0.0, time.monotonic(), 0
while True:
    now = time.monotonic()
    credit = min(rate, credit + (now - last) * rate)
    last = now
    while todo and credit >= 1:
        credit -= 1
        open_one(todo.popleft())
        tried += 1
    if not announced and tried >= len(ports) * count:
        print("opened", len(conns), flush=True)
        announced = True
    if now - last_print >= 1.0:
        last_print = now
        print(
            "held",
            sum(1 for c in conns.values() if c[2]),
            *(sum(1 for c in conns.values() if c[2] and c[1] == p) for p in ports),
            flush=True,
        )
    for fd, _events in poll.poll(0.02):
        s, port, connected = conns[fd]
        if not connected:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                lost(fd)
                continue
            if mode == "half-open":
                try:
                    t = tls.wrap_socket(s, do_handshake_on_connect=False)
                    try:
                        t.do_handshake()  # sends the ClientHello; the answer is never read
                    except ssl.SSLWantReadError:
                        pass
                    conns[fd] = (t, port, True)
                except OSError:
                    lost(fd)
                    continue
            else:
                conns[fd] = (s, port, True)
            poll.modify(fd, select.EPOLLIN)
        else:
            try:  # data from the server (a TLS answer) is dropped; EOF or a reset means closed
                if s.recv(65536) if not isinstance(s, ssl.SSLSocket) else socket.socket.recv(s, 65536):
                    continue
            except (BlockingIOError, ssl.SSLWantReadError):
                continue
            except OSError:
                pass
            lost(fd)
