"""One raw gRPC call, run inside a lab namespace with the test interpreter (it has grpcio and
the generated proto modules): argv = repo, the call as JSON. Prints the outcome as one JSON line."""

import json
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import grpc
from google.protobuf import json_format

from proto import nc_pb2, nc_pb2_grpc

a = json.loads(sys.argv[2])


def read(p):
    return Path(p).read_bytes() if p else None


creds = grpc.ssl_channel_credentials(
    root_certificates=read(a["ca"]), private_key=read(a["key"]), certificate_chain=read(a["cert"])
)
channel = grpc.secure_channel(a["address"], creds, options=[("grpc.ssl_target_name_override", "nc-server")])
stub = getattr(nc_pb2_grpc, a["service"] + "Stub")(channel)
request = getattr(nc_pb2, a["request"])(**a["fields"])
try:
    response = getattr(stub, a["method"])(request, timeout=8)
    out = {"ok": True, "response": json_format.MessageToDict(response, always_print_fields_with_no_presence=True)}
except grpc.RpcError as e:
    out = {"ok": False, "status": e.code().name, "details": e.details()}
print(json.dumps(out))
