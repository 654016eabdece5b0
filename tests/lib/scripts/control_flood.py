"""argv: repo, server, cert_dir, token, plan (JSON). A node with real certificates that
agrees the UDP path in its hello, then floods control frames over its TLS session:
REKEY (one valid X25519 share, again and again) or TRANSPORT alternating udp/tcp, until
the server refuses it; then again in a new session, up to plan["rounds"] sessions and
plan["seconds"] in all. Prints one JSON line: each round's frames sent, REKEY answers,
refusal (and whether it came instead of the welcome)."""

import base64
import json
import os
import socket
import ssl
import sys
import threading
import time

sys.path.insert(0, sys.argv[1])
import ncctl

server, cert_dir, token, plan = sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])


def read_frame(tls):
    def exact(count):
        data = b""
        while len(data) < count:
            chunk = tls.recv(count - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    header = exact(ncctl.FRAME_HEADER.size)
    return header[0], exact(ncctl.FRAME_HEADER.unpack(header)[0] & 0xFFFFFF)


class RefusedAtHello(Exception):
    pass


class Reader(threading.Thread):
    """Counts the server's REKEY answers and remembers its refusal, until it closes."""

    def __init__(self, tls):
        super().__init__(daemon=True)
        self.tls, self.answers, self.refusal, self.closed = tls, 0, None, threading.Event()

    def run(self):
        try:
            self.tls.settimeout(None)
            while True:
                kind, payload = read_frame(self.tls)
                if kind == ncctl.FRAME_REKEY:
                    self.answers += 1
                elif kind == ncctl.FRAME_ERROR:
                    self.refusal = json.loads(payload)
        except (OSError, EOFError, ValueError):
            pass
        self.closed.set()


def connect():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(os.path.join(cert_dir, "client.crt"), os.path.join(cert_dir, "client.key"))
    tls = context.wrap_socket(socket.create_connection((server, 6441), timeout=10), server_hostname="nc-server")
    _private, share = ncctl.new_x25519()
    tls.sendall(ncctl.Hello(token, caps=("udp",), udp_key=share).encode())
    kind, payload = read_frame(tls)
    if kind == ncctl.FRAME_ERROR:
        tls.close()
        raise RefusedAtHello(json.loads(payload))
    assert kind == ncctl.FRAME_WELCOME, (kind, payload[:200])
    assert ncctl.Welcome.decode(payload).udp_session, "the server did not agree on UDP"
    return tls


def frames():
    if plan["kind"] == "rekey":
        share = base64.b64encode(ncctl.new_x25519()[1]).decode()
        rekey = ncctl.encode_control(ncctl.FRAME_REKEY, {"udpKey": share})
        while True:
            yield rekey
    flips = [ncctl.encode_control(ncctl.FRAME_TRANSPORT, {"transport": t}) for t in ("udp", "tcp")]
    while True:
        yield from flips


def flood(deadline):
    try:
        tls = connect()
    except RefusedAtHello as e:
        return {"sent": 0, "answers": 0, "refusal": e.args[0], "at_hello": True}
    reader = Reader(tls)
    reader.start()
    result = {"sent": 0}
    started = time.monotonic()
    try:
        for frame in frames():
            if reader.closed.is_set() or time.monotonic() > deadline:
                break
            tls.sendall(frame)
            result["sent"] += 1
    except OSError as e:
        result["send_error"] = str(e)
    reader.closed.wait(5 if time.monotonic() < deadline else 0.5)
    result.update(seconds=round(time.monotonic() - started, 2), answers=reader.answers, refusal=reader.refusal)
    tls.close()
    return result


rounds = []
end = time.monotonic() + plan.get("seconds", 10)
while len(rounds) < plan.get("rounds", 1) and time.monotonic() < end:
    try:
        rounds.append(flood(end))
    except (OSError, EOFError, AssertionError) as e:
        rounds.append({"error": str(e)})
print(json.dumps(rounds), flush=True)
