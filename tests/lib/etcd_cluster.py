"""A real three-member etcd v3 cluster across lab namespaces, for the replica tests.

Each member is started with a known PID and stopped by it; data dirs live in the
lab's directory."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from etcd_member import CLIENT_PORT, PEER_PORT, member_args
from netlab import Host, Process, wait_for


class EtcdCluster:
    """A three-member etcd cluster, one member per lab host, on the hosts' underlay addresses."""

    def __init__(self, hosts: list[Host]) -> None:
        self.hosts = hosts
        self.cluster = ",".join(f"{h.name}=http://{h.ip}:{PEER_PORT}" for h in hosts)
        self.members: dict[str, Process] = {}
        for host in hosts:
            self.start_member(host)
        for host in hosts:
            wait_for(lambda h=host: self.healthy(h), timeout=30, what=f"etcd member {host.name}")

    @property
    def endpoints(self) -> str:
        return ",".join(f"http://{h.ip}:{CLIENT_PORT}" for h in self.hosts)

    def data_dir(self, host: Host) -> Path:
        return host.lab.dir / f"etcd-{host.name}"

    def start_member(self, host: Host) -> None:
        args = member_args(host.name, host.ip, self.data_dir(host), self.cluster, CLIENT_PORT, PEER_PORT)
        self.members[host.name] = host.spawn(*args, name=f"etcd-{host.name}")

    def healthy(self, host: Host) -> bool:
        done = host.run(
            "etcdctl", f"--endpoints=http://{host.ip}:{CLIENT_PORT}", "endpoint", "health",
            check=False, timeout=10,
        )  # fmt: skip
        return done.returncode == 0

    def kill(self, host: Host) -> None:
        self.members[host.name].stop(signal.SIGKILL)

    def restart(self, host: Host) -> None:
        self.start_member(host)
        wait_for(lambda: self.healthy(host), timeout=30, what=f"etcd member {host.name} back")


def settle(seconds: float) -> None:
    time.sleep(seconds)
