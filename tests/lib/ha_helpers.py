"""Replicas of nc on a real three-member etcd cluster, in lab namespaces."""

from __future__ import annotations

import time

from etcd_cluster import EtcdCluster
from netlab import Host, Lab, NcServer, start_server

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
