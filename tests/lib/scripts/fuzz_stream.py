"""Hostile streams against the nc network port; every connection's errors are expected."""

import json
import os
import random
import socket
import ssl
import struct
import sys
import time

server, port, cert_dir, token, case, rounds = (
    sys.argv[1],
    int(sys.argv[2]),
    sys.argv[3],
    sys.argv[4],
    sys.argv[5],
    int(sys.argv[6]),
)
rng = random.Random(case)


def frame(kind, payload, declared=None):
    return struct.pack("!I", kind << 24 | (len(payload) if declared is None else declared)) + payload


def tls(with_cert):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if with_cert:
        context.load_cert_chain(os.path.join(cert_dir, "client.crt"), os.path.join(cert_dir, "client.key"))
    raw = socket.create_connection((server, port), timeout=1)
    return context.wrap_socket(raw, server_hostname="nc-server")


def drain(sock, seconds=0.3):
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except Exception:
        pass


def hello(tok):
    return json.dumps({"proto": 1, "nodeToken": tok, "version": "fuzz", "caps": []}).encode()


def one_round():
    if case == "raw-garbage":
        sock = socket.create_connection((server, port), timeout=1)
        sock.sendall(os.urandom(rng.randint(1, 5000)))
        drain(sock)
        sock.close()
        return
    if case == "idle-connections":
        socks = [socket.create_connection((server, port), timeout=1) for _ in range(20)]
        time.sleep(0.5)
        for sock in socks:
            sock.close()
        return
    sock = tls(case != "tls-without-cert")
    try:
        if case == "tls-without-cert":
            sock.sendall(frame(0x01, hello(token)))
        elif case == "tls-random-bytes":
            sock.sendall(os.urandom(rng.randint(1, 20000)))
        elif case == "packet-before-hello":
            sock.sendall(frame(0x10, os.urandom(60)) + frame(0x01, hello(token)))
        elif case == "oversized-data-frame":
            sock.sendall(frame(0x10, os.urandom(1000), declared=0xFFFFFF))
        elif case == "oversized-hello":
            sock.sendall(frame(0x01, b"{" * 100, declared=5000))
        elif case == "truncated-header":
            sock.sendall(b"\x01\x00")
        elif case == "truncated-hello":
            body = hello(token)
            sock.sendall(frame(0x01, body)[: 4 + len(body) // 2])
        elif case == "wrong-token-hello":
            sock.sendall(frame(0x01, hello("zzzzzzzzzzzzzzzz")))
        elif case == "nested-json-hello":
            body = b'{"proto":1,"nodeToken":"' + token.encode() + b'","caps":' + b"[" * 3500
            sock.sendall(frame(0x01, body))
        else:
            raise SystemExit(f"unknown case {case}")
        drain(sock)
    finally:
        sock.close()


errors = 0
for _ in range(rounds):
    try:
        one_round()
    except (OSError, ssl.SSLError):
        errors += 1
print(f"case {case}: {rounds} rounds, {errors} connection errors", flush=True)
