"""Helpers for the overlay end-to-end tests: a server with joined nodes, node
states through `nc adm`, ping assertions, underlay changes, a stream fuzzer that runs
inside a node's namespace, metrics scrapes; and for several networks on one server:
networks and nodes through `nc adm`, clients started in parallel, and pings that must
get through or must be sent into the tunnel and lost."""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from netlab import SCRIPTS, Host, Lab, NcClient, NcServer, Process, start_client, start_server, wait_for
from prometheus_client.parser import text_string_to_metric_families

import ncctl

SERVER_OVERLAY_IP = "10.1.1.1"
NETWORK_PORT = 6441


@dataclass
class Overlay:
    """A running server and its joined, connected nodes."""

    lab: Lab
    server_host: Host
    server: NcServer
    hosts: list[Host]
    clients: list[NcClient]
    join: str

    def add_node(self, name: str, wait: bool = True) -> NcClient:
        host = self.lab.add_host(name)
        client = start_client(host, self.join, wait=wait)
        self.hosts.append(host)
        self.clients.append(client)
        return client


def build_overlay(lab: Lab, nodes: int, **server_fields: object) -> Overlay:
    """A server plus `nodes` nodes, each joined and connected (state 3, nc0 = bindIp)."""
    server_host = lab.add_host("server")
    server = start_server(server_host, **server_fields)
    join = server.join_string()
    hosts = [lab.add_host(f"node{i}") for i in range(1, nodes + 1)]
    clients = [start_client(host, join) for host in hosts]
    overlay = Overlay(lab, server_host, server, hosts, clients, join)
    for client in clients:
        wait_connected(server, client)
    return overlay


def node_state(server: NcServer, token: str) -> dict:
    """`nc adm node state --node-token T -o json` as a dict ({} when the command fails)."""
    done = server.adm("node", "state", "--node-token", token, "-o", "json", check=False)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def wait_state(server: NcServer, token: str, state: int, timeout: float = 10) -> dict:
    """Wait until `nc adm node state` reports the given connState; returns that state."""
    return wait_for(
        lambda: (found := node_state(server, token)).get("connState") == state and found,
        timeout=timeout,
        interval=0.2,
        what=f"node {token} to reach state {state}",
    )


def wait_connected(server: NcServer, client: NcClient, timeout: float = 20) -> str:
    """Wait until the server says the node is connected (3) with a bindIp equal to its nc0 address."""

    def connected() -> str | None:
        state = node_state(server, client.token())
        ip = client.overlay_ip()
        return ip if state.get("connState") == 3 and ip and state.get("bindIp") == ip else None

    try:
        return wait_for(connected, timeout=timeout, interval=0.2, what=f"{client.host.name} to be connected")
    except AssertionError:
        raise AssertionError(
            f"{client.host.name} not connected: state {node_state(server, client.token())}, "
            f"nc0 {client.overlay_ip()}, log:\n{client.process.log()[-3000:]}"
        ) from None


def assert_reaches(host: Host, ip: str, timeout: float = 10) -> None:
    """Some ping from host to ip gets an answer within timeout."""
    wait_for(lambda: host.ping(ip, timeout=1), timeout=timeout, interval=0.2, what=f"{host.name} to reach {ip}")


def assert_blocked(host: Host, ip: str) -> None:
    """Three pings from host to ip all go unanswered."""
    assert not host.ping(ip, count=3, timeout=1), f"{host.name} reached {ip}, which must be blocked"


def assert_full_mesh(overlay: Overlay, timeout: float = 10) -> None:
    """Every node pings every other node and the server, and the server pings every node."""
    ips = [client.overlay_ip() for client in overlay.clients]
    assert all(ips) and len(set(ips)) == len(ips), f"overlay addresses are not unique: {ips}"
    for host, ip in zip(overlay.hosts, ips):
        assert_reaches(host, SERVER_OVERLAY_IP, timeout)
        assert_reaches(overlay.server_host, ip, timeout)
    for (a, _), (_, ip_b) in itertools.permutations(zip(overlay.hosts, ips), 2):
        assert_reaches(a, ip_b, timeout)


def ping_counts(host: Host, ip: str, count: int, interval: float = 0.2) -> tuple[int, int]:
    """(sent, answered) for `count` pings at `interval`."""
    done = host.run(
        "ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "1", ip, check=False, timeout=count + 15
    )
    found = re.search(r"(\d+) packets transmitted, (\d+) received", done.stdout)
    assert found, f"unexpected ping output: {done.stdout} {done.stderr}"
    return int(found.group(1)), int(found.group(2))


def ping_rtts(host: Host, ip: str, count: int, interval: float = 0.2) -> tuple[int, list[float]]:
    """(sent, the round-trip times in ms of the answered ones) for `count` pings at `interval`."""
    done = host.run("ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", ip, check=False, timeout=count + 15)
    found = re.search(r"(\d+) packets transmitted", done.stdout)
    assert found, f"unexpected ping output: {done.stdout} {done.stderr}"
    return int(found.group(1)), [float(t) for t in re.findall(r"time=([\d.]+) ms", done.stdout)]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("inf")


def change_underlay(host: Host, new_ip: str) -> None:
    """Move host's eth0 to new_ip the way a DHCP renumbering would: add the new, drop the old.

    The new address is a secondary one until the old goes; without promote_secondaries
    the kernel would delete it together with the old primary."""
    host.run("sysctl", "-q", "-w", "net.ipv4.conf.eth0.promote_secondaries=1")
    host.run("ip", "addr", "add", f"{new_ip}/24", "dev", "eth0")
    host.run("ip", "addr", "del", f"{host.ip}/24", "dev", "eth0")
    shown = host.run("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert f" {new_ip}/24 " in shown and f" {host.ip}/24 " not in shown, shown
    host.ip = new_ip


def network_peers(server_host: Host) -> set[str]:
    """Underlay addresses with an established connection to the server's network port."""
    done = server_host.run("ss", "-Htn", "state", "established", f"( sport = :{NETWORK_PORT} )")
    peers = set()
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            peers.add(ncctl.unmapped(fields[-1].rsplit(":", 1)[0].strip("[]")))  # the listener is dual-stack
    return peers


def stop_client(client: NcClient, sig: int = signal.SIGTERM) -> int:
    return client.process.stop(sig, timeout=10)


def wait_exit(process: Process, timeout: float = 15) -> int:
    """The process ends by itself within timeout; returns its exit code."""
    wait_for(lambda: not process.alive(), timeout=timeout, interval=0.05, what="the process to exit")
    return process.popen.wait(1)


def server_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def spawn_tcpdump(host: Host, device: str, name: str) -> Process:
    """tcpdump of ICMP on device, line-buffered into its log; returns once it listens."""
    process = host.spawn("tcpdump", "-n", "-l", "--immediate-mode", "-i", device, "icmp", name=name)
    process.wait_for_output("listening on", timeout=10, what=f"tcpdump on {host.name} {device}")
    return process


# -- the stream fuzzer ----------------------------------------------------------------------------

FUZZ_CASES = [
    "raw-garbage",  # not even TLS
    "idle-connections",  # TCP connections that never start TLS
    "tls-without-cert",  # TLS with no client certificate, then a hello
    "tls-random-bytes",  # valid cert, random bytes instead of frames
    "packet-before-hello",  # valid cert, a PACKET frame before any hello
    "oversized-data-frame",  # valid cert, a header declaring 16 MiB
    "oversized-hello",  # valid cert, a hello header over the control limit
    "truncated-header",  # valid cert, half a frame header, then close
    "truncated-hello",  # valid cert, a hello cut short, then close
    "wrong-token-hello",  # valid cert, a hello naming another node-token
    "nested-json-hello",  # valid cert, a legal-size hello whose JSON nests deeply
]


def run_fuzz(host: Host, server_ip: str, cert_dir: Path, token: str, case: str, rounds: int) -> Process:
    """Start the fuzzer for one case in host's namespace (background)."""
    return host.spawn(
        sys.executable,
        str(SCRIPTS / "fuzz_stream.py"),
        server_ip,
        str(NETWORK_PORT),
        str(cert_dir),
        token,
        case,
        str(rounds),
        name=f"fuzz-{case}",
    )


def tcp_transfer(sender: Host, receiver: Host, ip: str, size: int = 16 * 1024 * 1024) -> None:
    """A TCP stream of `size` bytes from sender to receiver at ip arrives whole and unaltered."""
    server = receiver.spawn("python3", str(SCRIPTS / "tcp_receive.py"), ip, name=f"receive-{receiver.name}")
    server.wait_for_output("listening", timeout=10, what="the receiver to listen")
    sent = sender.run("python3", str(SCRIPTS / "tcp_send.py"), ip, str(size), timeout=90).stdout.split()
    assert wait_exit(server, timeout=30) == 0, server.log()
    received = server.log().split()[1:]
    assert received == sent, f"sent {sent}, received {received}"


def scrape(host: Host, address: str = "127.0.0.1:9441") -> dict[tuple[str, tuple], float]:
    """Every sample as (name, sorted labels) -> value."""
    text = host.run(sys.executable, str(SCRIPTS / "scrape_metrics.py"), f"http://{address}/metrics").stdout
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# -- several networks on one server ------------------------------------------------------------

DEFAULT_CIDR = "10.1.1.0/24"
DEFAULT_SERVER_IP = SERVER_OVERLAY_IP
NET_TOKEN_RE = re.compile(r"^[a-z0-9]{16}$")
NETWORK_KEYS = {"name", "cidr", "interconnection", "netToken", "serverIp", "nodes", "fromConfig"}


# -- the admin view ---------------------------------------------------------------------------


def networks(server: NcServer) -> dict[str, dict]:
    """`nc adm network list -o json`, by network name."""
    listed = server.adm_json("network", "list")
    assert isinstance(listed, list), listed
    return {n["name"]: n for n in listed}


def create_network(server: NcServer, name: str, cidr: str, *flags: str) -> dict:
    """`nc adm network create -o json` that must succeed; returns the new network."""
    created = server.adm_json("network", "create", "--name", name, "--cidr", cidr, *flags)
    assert isinstance(created, dict) and set(created) == NETWORK_KEYS, created
    assert created["name"] == name and NET_TOKEN_RE.match(created["netToken"]), created
    return created


def nodes(server: NcServer) -> dict[str, dict]:
    """`nc adm node list -o json`, by node-token."""
    listed = server.adm_json("node", "list")
    assert isinstance(listed, list), listed
    return {n["nodeToken"]: n for n in listed}


# -- nodes ------------------------------------------------------------------------------------


def start_clients(lab: Lab, joins: list[tuple[str, str]]) -> list[NcClient]:
    """One host per (name, join string), each `nc client --join`, all started before waiting for any."""
    clients = [start_client(lab.add_host(name), join, wait=False) for name, join in joins]
    for client in clients:
        try:
            wait_for(client.overlay_ip, timeout=30, what=f"{client.host.name} to get an overlay address")
        except AssertionError:
            raise AssertionError(f"{client.host.name} did not connect; log:\n{client.process.log()[-3000:]}") from None
    return clients


def set_net_token(client: NcClient, net_token: str) -> None:
    """Rewrite client.netToken in the node's client.yml, as an operator with an editor would."""
    import yaml

    doc = yaml.safe_load(client.config.read_text())
    doc["client"]["netToken"] = net_token
    client.config.write_text(yaml.safe_dump(doc, sort_keys=False))


def saved_net_token(client: NcClient) -> str:
    import yaml

    return yaml.safe_load(client.config.read_text())["client"]["netToken"]


# -- reachability -----------------------------------------------------------------------------


def route_into_tunnel(host: Host, cidr: str) -> None:
    """Send cidr into the node's nc0, so a ping there really enters the overlay instead of
    failing with `network unreachable` in the node's own kernel."""
    host.run("ip", "route", "replace", cidr, "dev", "nc0")


def assert_all_lost(probes: list[tuple[Host, str]], count: int = 3) -> None:
    """All probes at once, `count` pings from host to ip each: every ping is sent (ping exits 1,
    not 2 for `unreachable`) and none is answered."""
    running = [
        (
            host,
            ip,
            host.spawn("ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1", ip, name=f"ping-{host.name}"),
        )
        for host, ip in probes
    ]
    for host, ip, process in running:
        code = wait_exit(process, timeout=count + 10)
        found = re.search(r"(\d+) packets transmitted, (\d+) received", process.log())
        assert found, f"{host.name} -> {ip}: ping sent nothing (exit {code}): {process.log()}"
        sent, received = int(found.group(1)), int(found.group(2))
        assert received == 0, f"{host.name} reached {ip} ({received}/{sent} answered), which must be isolated"
        assert sent == count and code == 1, f"{host.name} -> {ip}: exit {code}, {process.log()}"


def icmp_sources(capture: Process) -> set[str]:
    """Source addresses of the ICMP echo requests a tcpdump saw."""
    return set(re.findall(r"IP (\d+\.\d+\.\d+\.\d+) > [\d.]+: ICMP echo request", capture.log()))


def server_tun_with(host: Host, ip: str) -> str | None:
    """The name of the interface in host's namespace that holds ip, if any."""
    shown = json.loads(host.run("ip", "-j", "-4", "addr", "show").stdout or "[]")
    for link in shown:
        if any(info.get("local") == ip for info in link.get("addr_info", [])):
            return link["ifname"]
    return None


def links(host: Host) -> set[str]:
    return {link["ifname"] for link in json.loads(host.run("ip", "-j", "link", "show").stdout or "[]")}


def in_cidr(ip: str, cidr: str) -> bool:
    return ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(cidr, strict=False)
