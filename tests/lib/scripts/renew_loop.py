"""argv: repo, control address, grpc cert dir, node token, count. A node that calls
RenewCertificates `count` times in a row over one channel with its own gRPC certificate,
never switching to what it gets. Prints one JSON line: each answer's code and message."""

import json
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import ncctl

address, cert_dir, token, count = sys.argv[2], Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
_, pb, pb_grpc = ncctl.grpc_modules()
ca, key, cert = ((cert_dir / name).read_bytes() for name in ("ca.crt", "client.key", "client.crt"))
csr = ncctl.new_csr(ncctl.new_key(), token)
request = pb.RenewCertificatesRequest(grpcCsr=csr, networkCsr=csr)
answers = []
with ncctl.secure_channel(address, ca, key, cert) as channel:
    for _ in range(count):
        try:
            response = ncctl.call(channel, pb_grpc.NcNodeServiceStub, "RenewCertificates", request, address)
            answers.append({"code": response.code, "message": response.message})
        except ncctl.RemoteError as e:
            answers.append({"error": str(e)})
print(json.dumps(answers), flush=True)
