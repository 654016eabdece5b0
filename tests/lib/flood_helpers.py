"""Connection floods from one lab host, for the flood tests and tests/bench/bench_floods.py.

FLOOD runs inside the attacker's namespace (plain python3, stdlib only). It keeps
`count` connections open to each given port of the server: "idle" ones are bare TCP
connections that never send a byte, "half-open" ones send a TLS ClientHello and then
nothing. Whatever the server closes or resets is opened again (at most `rate`
connects a second in all), so the flood holds as many as the server lets it for as
long as it runs. It prints "opened" once every slot was tried, then "held N" lines.
"""

from __future__ import annotations

import re

from netlab import Host, Process

FLOOD = r"""
import collections, resource, select, socket, ssl, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
server, ports, count, mode, rate = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
poll = select.epoll()
conns = {}  # fd -> (socket, port, connected)
todo = collections.deque(p for _ in range(count) for p in ports)  # first in, first out: every port gets its turn

def open_one(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
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
        print("held", sum(1 for c in conns.values() if c[2]), *(sum(1 for c in conns.values() if c[2] and c[1] == p) for p in ports), flush=True)
    for fd, events in poll.poll(0.02):
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
                if s.recv(65536) if not isinstance(s, ssl.SSLSocket) else s.socket_recv(65536):
                    continue
            except (BlockingIOError, ssl.SSLWantReadError):
                continue
            except OSError:
                pass
            lost(fd)
"""

# ssl.SSLSocket has no raw recv that skips TLS; read the kernel socket under it.
FLOOD = FLOOD.replace("s.socket_recv(65536)", "socket.socket.recv(s, 65536)")


def start_flood(
    attacker: Host, server_ip: str, ports: tuple[int, ...], count: int, mode: str, rate: float = 2000.0
) -> Process:
    """Start FLOOD in the attacker's namespace and wait until it tried every slot once."""
    flood = attacker.spawn(
        "python3",
        "-c",
        FLOOD,
        server_ip,
        ",".join(str(p) for p in ports),
        str(count),
        mode,
        str(rate),
        name=f"flood-{mode}",
    )
    flood.wait_for_output("opened", timeout=60, what="the flood to open its connections")
    return flood


def held(flood: Process) -> int:
    """How many connections the flood held open at its last report."""
    counts = re.findall(r"^held (\d+)", flood.log(), re.M)
    return int(counts[-1]) if counts else 0


SLOW_READERS = r"""
import json, os, re, socket, ssl, struct, sys, time
server, port, work_dirs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
socks = []
for work_dir in work_dirs:
    token = re.search(r"^\s*token:\s*'?(\w+)", open(os.path.join(work_dir, "client.yml")).read(), re.M).group(1)
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
"""

BLAST = r"""
import socket, sys, time
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
"""


def welcomed_ips(process: Process) -> list[str]:
    return re.findall(r"^welcome (\S+)$", process.log(), re.M)
