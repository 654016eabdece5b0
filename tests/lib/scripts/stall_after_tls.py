"""A dual-stack TLS listener on port argv[1] with the certificate chain in argv[2] and its key
in argv[3]: it completes every handshake (ALPN h2, as gRPC asks) and then answers nothing,
so a client's gRPC call waits inside gRPC itself, past TLS."""

import socket
import ssl
import sys
import threading

context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[2], sys.argv[3])
context.set_alpn_protocols(["h2"])
listener = socket.socket(socket.AF_INET6)
listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("::", int(sys.argv[1])))
listener.listen()
print("listening", flush=True)


def hold(conn: socket.socket) -> None:
    try:
        with context.wrap_socket(conn, server_side=True) as tls:
            print("handshake done", flush=True)
            while tls.recv(65536):
                pass
    except (OSError, ssl.SSLError):
        pass


while True:
    conn, _ = listener.accept()
    threading.Thread(target=hold, args=(conn,), daemon=True).start()
