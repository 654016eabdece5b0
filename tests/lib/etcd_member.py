"""One real etcd v3 member: its command line (shared with the lab's cluster in
etcd_cluster.py), and a single member on loopback for the store's unit tests.

The member is started with a known PID and stopped by it; its data dir lives in the
test's temporary directory. Nothing here touches namespaces or ./nc."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from waiting import wait_for

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
