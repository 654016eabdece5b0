"""Helpers for the trust tests: a raw data-plane HELLO with any certificate, node-side
gRPC calls, and concurrent joins and sessions from one process."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from control_helpers import grpc_call, node_tls
from netlab import ROOT, SCRIPTS, Host

SERVER_IP = "198.18.0.1"
CONTROL = f"{SERVER_IP}:6440"
BOOTSTRAP = f"{SERVER_IP}:6439"


def hello_answer(host: Host, cert_dir: Path, token: str, net_token: str = "") -> dict:
    """The server's answer to one HELLO: {"kind": 2 (welcome) or 3 (error), "message": {...}}."""
    done = host.run(
        sys.executable, str(SCRIPTS / "hello_probe.py"), SERVER_IP, str(cert_dir), token, net_token, timeout=30
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def node_call(host: Host, work: Path, method: str, request: str, creds: dict | None = None, **fields: object) -> dict:
    """A LiteKubeNCService call with the node's own gRPC certificate (or the given one)."""
    creds = creds or node_tls(work, "grpc")
    return grpc_call(host, CONTROL, "LiteKubeNCService", method, request, **creds, **fields)


def keep_copy(creds: dict[str, Path], where: Path) -> dict[str, Path]:
    """A copy of a set of credentials as they are now (renewal replaces the originals)."""
    where.mkdir(parents=True, exist_ok=True)
    return {name: Path(shutil.copy(path, where / path.name)) for name, path in creds.items()}


def swarm_script() -> Path:
    """Joins from threads at once, then one HELLO session per joined node at once; prints both
    outcomes as one JSON line and holds the sessions until <out>/release exists."""
    return SCRIPTS / "join_swarm.py"


def swarm_args(ca: Path, join_token: str, net_token: str, count: int, out: Path) -> list[str]:
    return [str(ROOT), SERVER_IP, str(ca), join_token, net_token, str(count), str(out)]
