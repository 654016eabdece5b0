"""nc's data paths on a lossy, rate-limited underlay, beside the UDP tunnels.

One server and two nodes on one bridge (198.18.0.0/15). Random loss is added on the
bridge with nftables (`numgen random mod 1000 < N drop` in a bridge-family forward
chain inside the lab namespace; this kernel has no netem) and an optional rate limit
with tbf on the bridge ports. A veth hands a GSO super-packet on whole, so by default
one dropped frame may be up to 64 datagrams or TCP segments of a path that sends with
offload (nc, the modern wireguard-go; Debian's wireguard-go does not), and a queue may
hold megabytes in a few entries; --wire makes each host's eth0 act as a NIC on a wire
instead: segments leave one by one (gso_max_segs 1) and are coalesced on arrival (GRO),
so loss and queues count packets. In one run, on the same topology, every round measures
each of these once, in this order (so a busy host weighs on all alike):

    underlay       iperf3 and ping straight over the bridge
    nc auto        ./nc server (transport auto) + two clients on transport auto, the default
    nc TCP         the same clients on transport tcp (the TLS/TCP stream)
    nc UDP         the same clients on transport udp (the encrypted UDP data path)
                   (the clients restarted on their transport each round; the server and
                   both clients stay up, idle, while the other columns run)
    wireguard-go   Debian's userspace WireGuard, in the namespaces (no kernel module); hub
                   and spoke like nc: the server has both nodes as peers and routes
                   between them (ip_forward in its namespace only)
    wg-go 9eb3221  the same with the binary --wireguard-go names: a modern wireguard-go
                   with TUN and UDP offload (tests/bench/build_wireguard_go.sh builds it)
    OpenVPN UDP    2.6, AES-256-GCM, tun-mtu 1400, client-to-client
    OpenVPN TCP    the same over TCP (tests/bench/bench_throughput.py's setup)

For each, --repeat rounds of: the idle RTT node1->server (20 pings at 5/s), iperf3 TCP
node1->server with ping at 5/s beside it (and the inner TCP's retransmissions),
server->node1 (-R) and node1->node2 (through the server on every tunnel, so across the
lossy bridge twice; directly across it once on the underlay). Throughputs are medians of
the rounds, ping percentiles over all rounds' pings. Prints one table with auto's ratios
to forced TCP, forced UDP and the newest wireguard-go measured; progress (and each auto
round's choices, from the node's log) goes to stderr.

    tests/bench.sh wan [--loss PCT] [--rate MBIT] [--wire] [--seconds S] [--repeat N] [--only PATH]
                       [--wireguard-go PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))  # netlab and the helpers

from bench_throughput import (
    COMMON_OPENVPN,
    MTU,
    OPENVPN_NET,
    ensure_tools,
    iperf_lab,
    openvpn_client_conf,
    start_openvpn,
    stop,
    write_openvpn_pki,
)
from benchlib import BenchError, fmt, format_table, machine_note, percentile, progress, run_lab_bench, temp_dir
from netlab import Host, Lab, NcClient, Process, start_client, start_server, wait_for

NC_OVERLAY = "10.1.1.1/24"
WG_NET = "10.9.0"
WG_PORT = 51820


@dataclasses.dataclass
class Figures:
    up: float | None = None  # node -> server, Mbit/s
    down: float | None = None  # server -> node, Mbit/s
    node_to_node: float | None = None  # node1 -> node2 (through the server on a tunnel), Mbit/s
    load_p50: float | None = None  # ping ms while node -> server runs
    load_p99: float | None = None
    load_lost: int = 0  # pings unanswered while loaded
    idle: float | None = None  # median RTT, ms, no load
    resent: float | None = None  # the inner TCP's retransmitted segments per node -> server run (median)


@dataclasses.dataclass
class Samples:
    """Every run's figures of one path, gathered round by round; figures() sums them up."""

    ups: list[float] = dataclasses.field(default_factory=list)
    downs: list[float] = dataclasses.field(default_factory=list)
    node_to_node: list[float] = dataclasses.field(default_factory=list)
    resent: list[int] = dataclasses.field(default_factory=list)
    loaded: list[float] = dataclasses.field(default_factory=list)  # ping ms under load, all rounds
    lost: int = 0
    idle: list[float] = dataclasses.field(default_factory=list)

    def figures(self) -> Figures:
        def median(values: list) -> float | None:
            return statistics.median(values) if values else None

        return Figures(
            up=median(self.ups),
            down=median(self.downs),
            node_to_node=median(self.node_to_node),
            load_p50=percentile(self.loaded, 0.5) if self.loaded else None,
            load_p99=percentile(self.loaded, 0.99) if self.loaded else None,
            load_lost=self.lost,
            idle=median(self.idle),
            resent=median(self.resent),
        )


# -- the lossy underlay ----------------------------------------------------------------


# -- measurements ------------------------------------------------------------------------


def iperf_once(client: Host, target: str, seconds: int, reverse: bool = False, port: int = 5201) -> tuple[float, int]:
    """One iperf3 TCP run: (Mbit/s received, segments the sender retransmitted)."""
    args = ["iperf3", "-c", target, "-p", str(port), "-t", str(seconds), "-J", "--connect-timeout", "5000"]
    args += ["-R"] if reverse else []
    done = client.run(*args, check=False, timeout=seconds + 60)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = {"error": done.stderr.strip() or "no JSON output"}
    if done.returncode != 0 or "error" in report:
        raise BenchError(f"iperf3 {' '.join(args[1:])} in {client.name}: {report.get('error', done.stderr.strip())}")
    return report["end"]["sum_received"]["bits_per_second"] / 1e6, int(report["end"]["sum_sent"].get("retransmits", 0))


IPERF_PORTS: dict[str, int] = {}  # host name: the port of its iperf3 server, if not iperf_lab's 5201


def iperf_run(client: Host, target: str, seconds: int, server: Host, reverse: bool = False) -> tuple[float, int]:
    """iperf_once, again after a moment while the server still ends the last test: it
    answers "busy", or on a stalled tunnel (nc TCP at 3 % loss) may reset the new control
    connection. A server still busy after 5 s is left (a test whose end was lost with the
    tunnel it ran through, torn down since, can hold it for minutes) for a fresh one."""
    for attempt in range(10):
        port = IPERF_PORTS.get(server.name, 5201)
        try:
            return iperf_once(client, target, seconds, reverse, port)
        except BenchError as e:
            if "busy" not in str(e) and "reset by peer" not in str(e):
                raise
            if attempt == 4:
                progress(f"iperf3 on {server.name} (port {port}) stays busy: a fresh one on {port + 1}")
                server.spawn("iperf3", "-s", "-p", str(port + 1), name=f"iperf3-{server.name}-{port + 1}")
                wait_for(lambda: f":{port + 1} " in server.run("ss", "-ltn").stdout, what="the fresh iperf3 server")
                IPERF_PORTS[server.name] = port + 1
            time.sleep(1.0)
    raise BenchError(f"iperf3 server on {target} stayed busy")


def iperf_mbps(client: Host, target: str, seconds: int, server: Host, reverse: bool = False) -> float:
    return iperf_run(client, target, seconds, server, reverse)[0]


def ping_times(host: Host, target: str, count: int, interval: float) -> tuple[list[float], int]:
    done = host.run(
        "ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", target,
        check=False, timeout=count * interval + 30,
    )  # fmt: skip
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", done.stdout)]
    return times, count - len(times)


def measure_round(
    samples: Samples, hosts: tuple[Host, Host, Host], target: str, peer: str, args: argparse.Namespace, label: str
) -> None:
    """One round from node (hosts: the node, the server, the other node): idle pings,
    node->server with pings beside it, server->node, node->node (to the other node at peer)."""
    node, server_host, peer_host = hosts
    node.run("ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", target, check=False)  # warm up ARP and paths
    samples.idle += ping_times(node, target, 20, 0.2)[0]
    loaded: dict[str, tuple[list[float], int]] = {}
    pinger = threading.Thread(
        target=lambda: loaded.update(run=ping_times(node, target, max(5, int(args.seconds * 5) - 5), 0.2))
    )
    pinger.start()
    up, resent = iperf_run(node, target, args.seconds, server_host)
    pinger.join()
    times, lost = loaded["run"]
    samples.ups.append(up)
    samples.resent.append(resent)
    samples.loaded += times
    samples.lost += lost
    samples.downs.append(iperf_mbps(node, target, args.seconds, server_host, reverse=True))
    samples.node_to_node.append(iperf_mbps(node, peer, args.seconds, peer_host))
    progress(
        f"{label}: node->server {up:,.0f} Mbit/s ({resent} resent), ping under load p50 "
        f"{fmt(percentile(times, 0.5) if times else None, 2)} p99 {fmt(percentile(times, 0.99) if times else None, 2)}"
        f" ms, {lost} lost; server->node {samples.downs[-1]:,.0f}; node->node {samples.node_to_node[-1]:,.0f}"
    )


# -- the paths ---------------------------------------------------------------------------


NC_MODES = {"nc auto": "auto", "nc TCP": "tcp", "nc UDP": "udp"}  # column: the nodes' client.yml transport


def use_transport(clients: list[NcClient], transport: str, server_ip: str) -> None:
    """Restart both nodes with `transport` in client.yml and wait until they reach the
    server (on udp: until the datagram path carries)."""
    for client in clients:
        client.process.stop()
        client.config.write_text(
            re.sub(r"(?m)^(\s*)transport: \w+$", rf"\1transport: {transport}", client.config.read_text())
        )
        client.restart()
    for client in clients:
        wait_for(lambda c=client: c.host.ping(server_ip), timeout=30, what=f"nc {transport}: {client.host.name} back")
        if transport != "tcp":
            wait_for(lambda c=client: "data path: UDP" in c.process.log(), timeout=20,
                     what=f"nc {transport}: the UDP data path on {client.host.name}")  # fmt: skip


@dataclasses.dataclass
class NcOverlay:
    """The nc server and both nodes, up for the whole run: each round picks a transport."""

    clients: list[NcClient]
    target: str  # the server's overlay address
    peer: str  # node2's overlay address


@contextlib.contextmanager
def nc_overlay(server_host: Host, nodes: tuple[Host, Host]) -> Iterator[NcOverlay]:
    """Both nodes join one nc server (transport auto, which offers datagrams), which
    switches node1 -> node2 traffic itself."""
    progress("nc: starting server and two clients")
    server = start_server(server_host, ip=server_host.ip, networkAddr=NC_OVERLAY, transport="auto")
    clients: list[NcClient] = []
    try:
        join = server.join_string()
        for node in nodes:
            clients.append(start_client(node, join))
        yield NcOverlay(clients, NC_OVERLAY.split("/")[0], str(clients[1].overlay_ip()))
    finally:
        for client in clients:
            stop(client.process, f"nc client on {client.host.name}")
            shutil.rmtree(client.work_dir, ignore_errors=True)
        stop(server.process, "nc server")
        shutil.rmtree(server.work_dir, ignore_errors=True)


@contextlib.contextmanager
def nc_path(nc: NcOverlay, column: str) -> Iterator[tuple[str, str]]:
    """The nodes restarted on the column's transport, so auto starts afresh each round, as
    after a restart; afterwards, what auto chose and when (from the nodes' logs)."""
    use_transport(nc.clients, NC_MODES[column], nc.target)
    wait_for(lambda: nc.clients[0].host.ping(nc.peer), timeout=20, what=f"{column}: node1 to reach node2")
    yield nc.target, nc.peer
    for client in nc.clients:
        for line in client.process.log().splitlines():
            if "auto:" in line or "data path:" in line:
                progress(f"  {client.host.name}: {line.strip()}")


def wg_keys(host: Host) -> tuple[str, str]:
    private = host.run("wg", "genkey").stdout.strip()
    public = host.run("wg", "pubkey", input=private + "\n").stdout.strip()
    return private, public


@dataclasses.dataclass
class WgPeer:
    """One `wg set ... peer` entry: who, which overlay addresses it owns, where it listens."""

    public_key: str
    allowed_ips: str
    endpoint: str


def start_wireguard(host: Host, work: Path, index: int, private: str, peers: list[WgPeer], binary: str) -> Process:
    """wireguard-go (the binary at `binary`) on host with overlay address WG_NET.<index>/24
    and the given peers."""
    # The UAPI socket (/var/run/wireguard/<name>.sock) is shared by every namespace: one
    # name per device of this lab.
    device = f"wg{host.lab.id}{index}"
    process = host.spawn(binary, "-f", device, name=f"wireguard-go-{host.name}")
    wait_for(lambda: host.has_link(device), timeout=10, what=f"wireguard-go on {host.name} to make {device}")
    key = work / f"wg-{host.name}.key"
    key.write_text(private + "\n")
    key.chmod(0o600)
    host.run("wg", "set", device, "private-key", str(key), "listen-port", str(WG_PORT))
    for peer in peers:
        host.run("wg", "set", device, "peer", peer.public_key, "allowed-ips", peer.allowed_ips,
                 "endpoint", f"{peer.endpoint}:{WG_PORT}")  # fmt: skip
    host.run("ip", "addr", "add", f"{WG_NET}.{index}/24", "dev", device)
    host.run("ip", "link", "set", device, "mtu", str(MTU), "up")
    return process


def offload_note(host: Host, device: str) -> str:
    """What the TUN's offload features say (a modern wireguard-go turns TSO on)."""
    features = host.run("ethtool", "-k", device, check=False).stdout
    wanted = ("tx-tcp-segmentation", "generic-receive-offload", "tx-udp-segmentation")
    return ", ".join(line.strip() for line in features.splitlines() if line.strip().split(":")[0] in wanted)


@contextlib.contextmanager
def wireguard_path(
    server_host: Host, nodes: tuple[Host, Host], work: Path, binary: str, label: str
) -> Iterator[tuple[str, str]]:
    """Hub and spoke: each node's one peer is the server, which forwards node1 -> node2."""
    indexes = (2, 3)  # the nodes' host parts in WG_NET; the server is .1
    server_private, server_public = wg_keys(server_host)
    node_keys = [wg_keys(node) for node in nodes]
    spokes = [
        WgPeer(public, f"{WG_NET}.{index}/32", node.ip) for index, node, (_, public) in zip(indexes, nodes, node_keys)
    ]
    hub = WgPeer(server_public, f"{WG_NET}.0/24", server_host.ip)
    processes = []
    server_host.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    try:
        processes.append(start_wireguard(server_host, work, 1, server_private, spokes, binary))
        for index, node, (private, _) in zip(indexes, nodes, node_keys):
            processes.append(start_wireguard(node, work, index, private, [hub], binary))
        target, peer = f"{WG_NET}.1", f"{WG_NET}.{indexes[1]}"
        wait_for(lambda: nodes[0].ping(target), timeout=20, what=f"{label}: node1 to reach the server")
        wait_for(lambda: nodes[0].ping(peer), timeout=20, what=f"{label}: node1 to reach node2")
        progress(f"{label}: {binary}, node1's TUN: {offload_note(nodes[0], f'wg{nodes[0].lab.id}{indexes[0]}')}")
        yield target, peer
    finally:
        for process in reversed(processes):
            stop(process, "wireguard-go")
        server_host.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=0", check=False)


def openvpn_confs(work: Path, pki: Path, proto: str, server_host: Host, nodes: tuple[Host, Host]) -> list[Path]:
    """The server's config (client-to-client, so it switches node1 -> node2), then each node's."""

    def over(conf: str) -> str:
        return conf.replace("proto tcp", f"proto {proto}")

    nodelay = "tcp-nodelay\n" if proto == "tcp" else ""
    server_conf = work / f"openvpn-server-{proto}.conf"
    server_conf.write_text(
        over(COMMON_OPENVPN) + f"topology subnet\nserver {OPENVPN_NET} 255.255.255.0\nclient-to-client\n{nodelay}"
        f"keepalive 10 60\ndh none\nca {pki}/ca.crt\ncert {pki}/server.crt\nkey {pki}/server.key\n"
    )
    confs = [server_conf]
    for node in nodes:
        node_conf = work / f"openvpn-{node.name}-{proto}.conf"
        node_conf.write_text(over(openvpn_client_conf(pki, node.name, server_host.ip)))
        confs.append(node_conf)
    return confs


@contextlib.contextmanager
def openvpn_path(server_host: Host, nodes: tuple[Host, Host], work: Path, proto: str) -> Iterator[tuple[str, str]]:
    label = f"OpenVPN {proto.upper()}"
    pki = work / f"openvpn-pki-{proto}"
    if not pki.exists():  # made once, in the first round
        pki.mkdir()
        write_openvpn_pki(pki, [node.name for node in nodes])
    confs = openvpn_confs(work, pki, proto, server_host, nodes)
    processes = []
    try:
        for host, conf in zip((server_host, *nodes), confs):
            processes.append(start_openvpn(host, conf, f"openvpn-{host.name}-{proto}"))
        target = str(wait_for(lambda: server_host.ipv4_address("tun0"), timeout=20, what=f"{label}: server tun0"))
        peer = str(wait_for(lambda: nodes[1].ipv4_address("tun0"), timeout=20, what=f"{label}: node2 tun0"))
        wait_for(lambda: nodes[0].ping(target), timeout=20, what=f"{label}: node1 to reach the server")
        wait_for(lambda: nodes[0].ping(peer), timeout=20, what=f"{label}: node1 to reach node2")
        yield target, peer
    finally:
        for process in reversed(processes):
            stop(process, "openvpn")


# -- the rounds --------------------------------------------------------------------------


def measure_all(
    server_host: Host, nodes: tuple[Host, Host], work: Path, args: argparse.Namespace, columns: list[str]
) -> dict[str, Figures]:
    """--repeat rounds, each of which measures every column once in turn (measure_round),
    so the host's ups and downs over the run weigh on all alike and the ratios compare
    figures taken minutes apart, not a whole run apart."""
    samples = {column: Samples() for column in columns}
    with contextlib.ExitStack() as stack:
        nc = stack.enter_context(nc_overlay(server_host, nodes)) if set(NC_MODES) & set(columns) else None
        paths: dict[str, Callable[[], contextlib.AbstractContextManager[tuple[str, str]]]] = {
            "underlay": lambda: contextlib.nullcontext((server_host.ip, nodes[1].ip)),
            "wireguard-go": lambda: wireguard_path(server_host, nodes, work, "wireguard-go", "wireguard-go"),
            MODERN_WG: lambda: wireguard_path(server_host, nodes, work, args.wireguard_go, MODERN_WG),
            "OpenVPN UDP": lambda: openvpn_path(server_host, nodes, work, "udp"),
            "OpenVPN TCP": lambda: openvpn_path(server_host, nodes, work, "tcp"),
        }
        for column in NC_MODES:
            paths[column] = lambda column=column: nc_path(nc, column)  # type: ignore[arg-type]
        for attempt in range(1, args.repeat + 1):
            for column in columns:
                with paths[column]() as (target, peer):
                    label = f"{column} round {attempt}/{args.repeat}"
                    measure_round(samples[column], (nodes[0], server_host, nodes[1]), target, peer, args, label)
    return {column: samples[column].figures() for column in columns}


# -- the table ---------------------------------------------------------------------------

ROWS = [
    ("node->server", "Mbit/s", "up", 0),
    ("server->node", "Mbit/s", "down", 0),
    ("node->node", "Mbit/s", "node_to_node", 0),
    ("ping p50 under load", "ms", "load_p50", 2),
    ("ping p99 under load", "ms", "load_p99", 2),
    ("pings lost under load", "", "load_lost", 0),
    ("inner TCP resent / run", "", "resent", 0),
    ("idle RTT", "ms", "idle", 3),
]
MODERN_WG = "wg-go 9eb3221"  # the column of --wireguard-go PATH
COLUMNS = ["underlay", *NC_MODES, "wireguard-go", MODERN_WG, "OpenVPN UDP", "OpenVPN TCP"]
# Ratio columns: auto over each forced path and over the newest wireguard-go measured.
RATIOS = [("nc auto", "nc TCP"), ("nc auto", "nc UDP"), ("nc auto", "wg")]


def table(results: dict[str, Figures], args: argparse.Namespace) -> str:
    reference = MODERN_WG if MODERN_WG in results else "wireguard-go"
    columns = [c for c in COLUMNS if c in results]
    rows = []
    for label, unit, key, digits in ROWS:
        value = {c: getattr(results[c], key) for c in columns}
        ratios = []
        for top, bottom in RATIOS:
            a, b = value.get(top), value.get(reference if bottom == "wg" else bottom)
            ratios.append(fmt(a / b, 2) + "x" if unit != "" and a is not None and b else "-")
        rows.append([label, unit, *(fmt(value[c], digits) for c in columns), *ratios])
    title = (
        f"WAN: loss {args.loss} %{' per packet (--wire)' if args.wire else ''}, rate {args.rate or 'unlimited'} Mbit/s — iperf3 TCP median of {args.repeat} x "
        f"{args.seconds} s (every column once a round, in turn; nc's nodes restarted each round), node->node through the server "
        f"(underlay: direct); ping at 5/s during node->server, p50/p99 over all rounds; idle RTT median of 20 pings a "
        f"round; MTU {MTU}; wg = {reference}"
    )
    headers = ["path", "unit", *columns, *(f"{a.split()[1]}/{b.split()[-1]}" for a, b in RATIOS)]
    return format_table(headers, rows, title)


def set_up(lab: Lab, args: argparse.Namespace) -> tuple[Host, tuple[Host, Host]]:
    """The server and two nodes on the shaped bridge, an iperf3 server in the server and node2."""
    server_host, node1, node2 = iperf_lab(lab)
    lab.shape_underlay(args.loss, args.rate, wire=args.wire)
    return server_host, (node1, node2)


def run(args: argparse.Namespace) -> int:
    ensure_tools()
    wanted = set(args.only or COLUMNS) - ({MODERN_WG} if not args.wireguard_go else set())
    needs = [("wg", "wireguard-tools"), ("ethtool", "ethtool")]
    needs += [("wireguard-go", "wireguard-go")] if "wireguard-go" in wanted else []
    for command, package in needs:
        if shutil.which(command) is None:
            raise BenchError(f"{command} is missing: apt-get install {package}")
    progress(f"before: {machine_note()}")
    with temp_dir("nc-bench-wan-") as work:
        lab = Lab(work / "lab")
        try:
            server_host, nodes = set_up(lab, args)
            results = measure_all(server_host, nodes, work, args, [c for c in COLUMNS if c in wanted])
        finally:
            lab.close()
    progress(f"after: {machine_note()}")
    print(table(results, args))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", type=float, default=0.0, help="random loss on the underlay, percent (default 0)")
    parser.add_argument("--rate", type=float, default=0.0, help="underlay rate limit, Mbit/s (default: none)")
    parser.add_argument(
        "--wire", action="store_true", help="segment on egress and GRO on ingress, as NICs do: loss hits single packets"
    )
    parser.add_argument("--seconds", type=int, default=10, help="length of each iperf3 run (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="iperf3 runs per figure; the median (default 3)")
    parser.add_argument("--only", action="append", choices=COLUMNS, help="measure only these paths (repeatable)")
    parser.add_argument(
        "--wireguard-go",
        metavar="PATH",
        help=f"a modern wireguard-go for the column {MODERN_WG!r} (tests/bench/build_wireguard_go.sh builds it)",
    )
    args = parser.parse_args()
    if args.wireguard_go:
        args.wireguard_go = str(Path(args.wireguard_go).resolve())
        if not Path(args.wireguard_go).is_file():
            parser.error(f"--wireguard-go {args.wireguard_go}: no such file")
    elif args.only and MODERN_WG in args.only:
        parser.error(f"--only {MODERN_WG!r} needs --wireguard-go PATH")
    if args.seconds < 1 or args.repeat < 1 or not 0 <= args.loss < 100 or args.rate < 0:
        parser.error("--seconds and --repeat must be at least 1, --loss 0-99, --rate not negative")
    return run_lab_bench("bench_wan", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
