"""Replicas of nc on a real three-member etcd cluster, in lab namespaces."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

from etcd_cluster import EtcdCluster
from netlab import ROOT, Host, Lab, NcServer, start_server

SERVER_OVERLAY_IP = "10.1.1.1"
CLUSTER_TOKEN = "ha-test-cluster-token-0123456789"


class Replicas:
    """hosts s1..s3 run one etcd member each, and an nc replica on the first `count`."""

    def __init__(self, lab: Lab, count: int = 2) -> None:
        self.hosts = [lab.add_host(f"s{i}") for i in range(1, 4)]
        self.etcd = EtcdCluster(self.hosts)
        self.servers: dict[str, NcServer] = {}
        for host in self.hosts[:count]:
            self.start(host)

    def start(self, host: Host, **fields: object) -> NcServer:
        body = {"ip": host.ip, "datastoreEndpoint": self.etcd.endpoints, "clusterToken": CLUSTER_TOKEN, **fields}
        server = start_server(host, **body)
        self.servers[host.name] = server
        return server

    def holders(self) -> list[str]:
        """The replicas whose host has the server overlay address on a TUN right now."""
        return [
            name for name, server in self.servers.items() if server.host.ipv4_address("ncsrv0") == SERVER_OVERLAY_IP
        ]

    def leader(self) -> str | None:
        held = self.holders()
        return held[0] if len(held) == 1 else None


def sample_holders(replicas: Replicas, seconds: float, interval: float = 0.1) -> list[list[str]]:
    """Who holds the overlay address, every interval, for seconds."""
    samples, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(replicas.holders())
        time.sleep(interval)
    return samples


# The last build whose etcd store wrote key layout 1 (plain bootstrap-token names, no MACs).
LAYOUT1_COMMIT = "a97ea62b3f2dc028b06fbd6c15313a98a8977eef"


def layout1_nc(lab: Lab) -> str:
    """That build's ncctl.py and protocol files, from the repo's history, run from source
    (its proto modules generated as build.sh does): a program that behaves as its ./nc."""
    directory = lab.dir / "layout1-nc"
    (directory / "proto").mkdir(parents=True)
    for name in ("ncctl.py", "proto/__init__.py", "proto/nc.proto", "proto/etcd.proto"):
        (directory / name).write_text(git_show(LAYOUT1_COMMIT, name))
    protoc = [str(ROOT / ".build/tools/bin/python"), "-m", "grpc_tools.protoc", "-I.", "--python_out=."]
    protoc += ["--grpc_python_out=.", "proto/nc.proto", "proto/etcd.proto"]
    subprocess.run(protoc, cwd=directory, check=True)
    program = directory / "nc"
    program.write_text(f'#!/bin/sh\nPYTHONPATH={directory} exec {sys.executable} {directory / "ncctl.py"} "$@"\n')
    program.chmod(0o755)
    return str(program)


def git_show(commit: str, path: str) -> str:
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise AssertionError(
            f"the upgrade test needs the repo's history (commit {commit[:12]}, the last build of etcd "
            f"key layout 1): {shown.stderr.strip()}"
        )
    return shown.stdout


def etcd_dump(host: Host, endpoints: str) -> bytes:
    """Every key and value under /nc/, as anyone with read access to etcd sees them."""
    done = host.run("etcdctl", f"--endpoints={endpoints}", "get", "--prefix", "/nc/", "-w", "json")
    kvs = json.loads(done.stdout).get("kvs", [])
    return b"\n".join(base64.b64decode(kv["key"]) + b" " + base64.b64decode(kv.get("value", "")) for kv in kvs)
