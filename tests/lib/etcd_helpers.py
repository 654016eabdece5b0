"""Real etcd v3 members for tests: a single member on loopback for the store's unit
tests, and a three-member cluster across lab namespaces for the replica tests.

Each member is started with a known PID and stopped by it; data dirs live in the
test's temporary directory."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from netlab import Host, Process, wait_for

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
CLIENT_PORT, PEER_PORT = 2379, 2380


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def member_args(name: str, ip: str, data_dir: Path, cluster: str, client_port: int, peer_port: int) -> list[str]:
    return [
        ETCD,
        "--name", name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", f"http://{ip}:{client_port}",
        "--advertise-client-urls", f"http://{ip}:{client_port}",
        "--listen-peer-urls", f"http://{ip}:{peer_port}",
        "--initial-advertise-peer-urls", f"http://{ip}:{peer_port}",
        "--initial-cluster", cluster,
        "--initial-cluster-state", "new",
        "--initial-cluster-token", f"nc-test-{os.getpid()}",
        "--heartbeat-interval", "100",
        "--election-timeout", "1000",
        "--log-level", "warn",
    ]  # fmt: skip


def port_open(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), timeout=0.5).close()
        return True
    except OSError:
        return False


class LocalEtcd:
    """One etcd member on 127.0.0.1 (free ports), for in-process store tests. With tls
    (ca, cert, key files), clients must speak TLS and present a certificate of that CA."""

    def __init__(self, directory: Path, tls: tuple[Path, Path, Path] | None = None) -> None:
        self.client_port, self.peer_port = free_port(), free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / "etcd.log"
        cluster = f"unit=http://127.0.0.1:{self.peer_port}"
        args = member_args("unit", "127.0.0.1", directory / "data", cluster, self.client_port, self.peer_port)
        scheme = "https" if tls else "http"
        if tls:
            ca, cert, key = tls
            args = [
                a.replace(f"http://127.0.0.1:{self.client_port}", f"https://127.0.0.1:{self.client_port}") for a in args
            ]
            args += [
                "--trusted-ca-file",
                str(ca),
                "--cert-file",
                str(cert),
                "--key-file",
                str(key),
                "--client-cert-auth",
            ]
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.endpoint = f"{scheme}://127.0.0.1:{self.client_port}"
        try:
            wait_for(lambda: port_open("127.0.0.1", self.client_port), timeout=20, what="etcd to listen")
        except AssertionError:
            self.stop()
            raise AssertionError(f"etcd did not start:\n{self.log_path.read_text()[-2000:]}") from None

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)


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
