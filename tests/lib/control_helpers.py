"""Helpers for the control-plane tests: raw gRPC probes, joins, the server's sqlite, CLI checks."""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import sys
from pathlib import Path

from netlab import ROOT, SCRIPTS, Host, NcServer

NODE_TOKEN_RE = re.compile(r"^[a-z0-9]{16}$")
BOOTSTRAP_TOKEN_RE = re.compile(r"^[a-z0-9]{6}\.[a-z0-9]{16}$")
JOIN_RE = re.compile(r"^(?P<token>[a-z0-9]{6}\.[a-z0-9]{16})@(?P<addr>[0-9.]+:[0-9]+)#(?P<pin>sha256:[0-9a-f]{64})$")


def grpc_call(
    host: Host,
    address: str,
    service: str,
    method: str,
    request: str,
    *,
    ca: Path,
    cert: Path | None = None,
    key: Path | None = None,
    **fields: object,
) -> dict:
    """One raw gRPC call from inside host: {"ok": True, "response": {...}} or {"ok": False, "status": ...}."""
    args = {
        "address": address,
        "service": service,
        "method": method,
        "request": request,
        "fields": fields,
        "ca": str(ca),
        "cert": str(cert) if cert else None,
        "key": str(key) if key else None,
    }
    done = host.run(sys.executable, str(SCRIPTS / "grpc_probe.py"), str(ROOT), json.dumps(args), timeout=30)
    return json.loads(done.stdout.strip().splitlines()[-1])


def lost_join(host: Host, bootstrap: str, join: str, ca: str, directory: Path) -> dict[str, Path]:
    """A GetToken whose reply the joiner never used (as if lost on the way): the gRPC
    client certificate and key it carried, saved as lost.crt and lost.key in directory."""
    got = grpc_call(
        host,
        bootstrap,
        "LiteKubeNCBootstrapService",
        "GetToken",
        "GetTokenRequest",
        ca=ca,
        bootStrapToken=join.split("@")[0],
    )
    assert got["ok"] and got["response"]["code"] == "200", got
    lost = {"cert": directory / "lost.crt", "key": directory / "lost.key"}
    lost["cert"].write_bytes(base64.b64decode(got["response"]["GrpcClientCert"]))
    lost["key"].write_bytes(base64.b64decode(got["response"]["GrpcClientKey"]))
    return lost


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """Assert a failed command printed exactly one `nc: error:` line on stderr (no traceback); return it."""
    assert done.returncode != 0, f"expected failure, got 0; stdout: {done.stdout!r}"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got: {done.stderr!r}"
    assert lines[0].startswith("nc: error: "), lines[0]
    assert "Traceback" not in done.stderr
    return lines[0]


def adm_join(host: Host, join: str, work_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return host.nc("adm", "join", join, "--work-dir", str(work_dir), *extra, check=False)


def join_node(host: Host, join: str, work_dir: Path) -> str:
    """`nc adm join` that must succeed; returns the node token it printed."""
    done = adm_join(host, join, work_dir)
    assert done.returncode == 0, f"join failed: {done.stderr}"
    token = done.stdout.strip()
    assert NODE_TOKEN_RE.match(token), token
    return token


def node_tokens(server: NcServer) -> set[str]:
    return {n["nodeToken"] for n in server.adm_json("node", "list")}


def db_path(server: NcServer) -> Path:
    return server.work_dir / "nc.db"


def node_tls(work_dir: Path, kind: str) -> dict[str, Path]:
    """A joined node's saved gRPC or network credentials."""
    tls = work_dir / "tls" / kind
    return {"ca": tls / "ca.crt", "cert": tls / "client.crt", "key": tls / "client.key"}


def admin_tls(server: NcServer) -> dict[str, Path]:
    admin = server.work_dir / "tls" / "admin"
    return {"ca": admin / "ca.crt", "cert": admin / "client.crt", "key": admin / "client.key"}


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand path of an argparse tree, aliases included."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, (*prefix, name))
    return paths
