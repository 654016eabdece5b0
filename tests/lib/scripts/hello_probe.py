"""One data-plane HELLO with the given network certificate: argv = server, cert_dir, token,
net_token. Prints the server's answer (a welcome or an error frame) as one JSON line.
The frame header is ncctl's own (the HELLO body is written here, to send exactly these keys)."""

import json
import socket
import ssl
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo: ncctl from source
import ncctl

server, cert_dir, token, net_token = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
context.load_cert_chain(cert_dir + "/client.crt", cert_dir + "/client.key")
try:
    sock = context.wrap_socket(socket.create_connection((server, 6441), timeout=10), server_hostname="nc-server")
    body = json.dumps({"proto": 1, "nodeToken": token, "version": "probe", "caps": [], "netToken": net_token}).encode()
    sock.sendall(ncctl.encode_frame(ncctl.FRAME_HELLO, body))
    head = b""
    while len(head) < ncctl.FRAME_HEADER.size:
        chunk = sock.recv(ncctl.FRAME_HEADER.size - len(head))
        if not chunk:
            raise ConnectionError("closed before answering")
        head += chunk
    (word,) = ncctl.FRAME_HEADER.unpack(head)
    kind, size = word >> 24, word & 0xFFFFFF
    payload = b""
    while len(payload) < size:
        payload += sock.recv(size - len(payload))
    print(json.dumps({"kind": kind, "message": json.loads(payload)}))
except (OSError, ssl.SSLError) as e:
    print(json.dumps({"kind": None, "message": {"error": str(e)}}))
