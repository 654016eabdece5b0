"""Replicas of nc on a real three-member etcd cluster, in lab namespaces."""

from __future__ import annotations

import base64
import json
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from etcd_cluster import EtcdCluster
from etcd_member import CLIENT_PORT as ETCD_CLIENT_PORT
from etcd_member import PEER_PORT as ETCD_PEER_PORT
from netlab import SCRIPTS, Host, Lab, NcServer, Process, start_server
from releases import nc_of_commit

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
    """That build's nc, run from source: a program that behaves as its ./nc."""
    return nc_of_commit(lab, LAYOUT1_COMMIT, "the last build of etcd key layout 1")


def etcd_dump(host: Host, endpoints: str) -> bytes:
    """Every key and value under /nc/, as anyone with read access to etcd sees them."""
    done = host.run("etcdctl", f"--endpoints={endpoints}", "get", "--prefix", "/nc/", "-w", "json")
    kvs = json.loads(done.stdout).get("kvs", [])
    return b"\n".join(base64.b64decode(kv["key"]) + b" " + base64.b64decode(kv.get("value", "")) for kv in kvs)


def cut_from_etcd(host: Host) -> None:
    """The host's processes reach no etcd member's client port (its own member included);
    the members still talk to each other, and everyone else reaches the host."""
    script = (
        "table inet ncfault {\n  chain out {\n    type filter hook output priority 0; policy accept;\n"
        f"    tcp dport {ETCD_CLIENT_PORT} drop\n  }}\n}}\n"
    )
    host.run("nft", "-f", "-", input=script)


def reconnect_to_etcd(host: Host) -> None:
    host.run("nft", "delete", "table", "inet", "ncfault", check=False)


def two_holders(samples: list[list[str]]) -> list[int]:
    """The sample indexes at which more than one replica held the server overlay address."""
    return [i for i, held in enumerate(samples) if len(held) > 1]


def sample_until(
    replicas: Replicas, done: Callable[[list[str]], bool], timeout: float, interval: float = 0.1
) -> list[list[str]]:
    """Who holds the overlay address, every interval, until done(the last sample); an
    AssertionError with the samples after timeout."""
    samples, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        samples.append(replicas.holders())
        if done(samples[-1]):
            return samples
        time.sleep(interval)
    raise AssertionError(f"no sample as wanted in {timeout} s: {samples}")


def slow_etcd(replicas: Replicas, rate_kbit: int) -> Process:
    """Every member host's eth0 sends at rate_kbit (tbf, a queue of up to 2 s: no netem in
    this kernel), and a writer keeps etcd busy with 100 KB values: etcd answers in about a
    second or more. Returns the writer, to stop by its PID."""
    for host in replicas.hosts:
        host.run("tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
                 "rate", f"{rate_kbit}kbit", "burst", "32kb", "latency", "2s")  # fmt: skip
    endpoints = replicas.etcd.endpoints
    loop = f"while :; do head -c 75000 /dev/urandom | base64 -w0 | etcdctl --endpoints={endpoints} put /load/v; done"
    return replicas.hosts[0].spawn("sh", "-c", loop, name="etcd-load")


def heal_etcd(replicas: Replicas, writer: Process) -> None:
    writer.stop(signal.SIGKILL)
    for host in replicas.hosts:
        host.run("tc", "qdisc", "del", "dev", "eth0", "root", check=False)


def start_pings(source: Host, target: str, seconds: float, interval: float = 0.1) -> Process:
    """ping every interval for seconds, in the background; ping_loss() reads the result."""
    count = str(int(seconds / interval))
    return source.spawn("ping", "-n", "-q", "-i", str(interval), "-W", "1", "-c", count, target, name="pings")


def ping_loss(pings: Process) -> tuple[int, int]:
    """(sent, lost) of a finished start_pings()."""
    match = re.search(r"(\d+) packets transmitted, (\d+) received", pings.log())
    assert match, pings.log()
    sent, received = int(match.group(1)), int(match.group(2))
    return sent, sent - received


def split_with_own_member(replicas: Replicas, host: Host) -> None:
    """A split that leaves the host with its own etcd member only: the member loses its
    peers (leaderless, a minority), and the host's connections to the other members'
    client port are rejected with a reset, as a firewall's reject would. The other two
    members keep their quorum; everything else (the replicas' own ports) still passes."""
    others = ", ".join(h.ip for h in replicas.hosts if h is not host)
    script = (
        "table inet ncfault {\n"
        "  chain out {\n    type filter hook output priority 0; policy accept;\n"
        f"    tcp dport {ETCD_PEER_PORT} drop\n"
        f"    ip daddr {{ {others} }} tcp dport {ETCD_CLIENT_PORT} reject with tcp reset\n  }}\n"
        "  chain in {\n    type filter hook input priority 0; policy accept;\n"
        f"    tcp dport {ETCD_PEER_PORT} drop\n  }}\n}}\n"
    )
    host.run("nft", "-f", "-", input=script)


DELAY_PROXY_PORT = 23790  # + the member's number: a replica's proxy to that member, on its loopback


def delayed_replicas(lab: Lab, delay_file: Path) -> Replicas:
    """Three replicas that reach etcd only through a delay_proxy on their own host's
    loopback: every byte to and from etcd is held the seconds delay_file says, one way
    (0 at first). etcd itself stays fast; its members talk to each other directly."""
    delay_file.write_text("0")
    replicas = Replicas(lab, count=0)
    members = list(enumerate(replicas.hosts, 1))
    specs = [f"{DELAY_PROXY_PORT + i}:{member.ip}:{ETCD_CLIENT_PORT}" for i, member in members]
    endpoints = ",".join(f"http://127.0.0.1:{DELAY_PROXY_PORT + i}" for i, _ in members)
    for host in replicas.hosts:
        proxy = host.spawn(
            sys.executable, str(SCRIPTS / "delay_proxy.py"), str(delay_file), *specs, name=f"etcd-delay-{host.name}"
        )
        proxy.wait_for_output("ready", timeout=20, what="the delay proxy")
        replicas.start(host, datastoreEndpoint=endpoints)
    return replicas


def failovers(samples: list[list[str]]) -> int:
    """How often the overlay address went from one replica to another in the samples
    (a gap with no holder between the two counts once; the same one back counts too)."""
    held = [h[0] for h in samples if len(h) == 1]
    return sum(1 for before, after in zip(held, held[1:]) if before != after)
