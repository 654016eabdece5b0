"""A gRPC server with nc's standard services whose data-plane probe is a file: present means the
data plane is down. argv = repo, that file. Listens on 127.0.0.1:7440 in a lab namespace."""

import sys
from concurrent import futures
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import grpc

import ncctl

down = Path(sys.argv[2])
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
ncctl.add_standard_services(server, lambda: not down.exists(), ncctl.CONTROL_SERVICES)
server.add_insecure_port("127.0.0.1:7440")
server.start()
print("listening", flush=True)
server.wait_for_termination()
