"""Throughput and latency of nc against the underlay and OpenVPN 2.6 (TCP).

One lab: a server and two nodes on one bridge (198.18.0.0/15). Three stages
run one after the other, never at the same time, so the tunnels do not fight
over the CPUs:

1. underlay  iperf3 and ping straight over the bridge (the ceiling)
2. nc        ./nc server + two ./nc clients; overlay 10.1.1.0/24
3. OpenVPN   2.6, proto tcp, AES-256-GCM, client-to-client, tun-mtu 1400,
             overlay 10.8.0.0/24, a throwaway EC PKI made here with `cryptography`

Each iperf3 figure is the median of --repeat runs of --seconds each (TCP,
one stream, sum_received of `iperf3 -J`); each RTT is the median of --pings
echo requests 0.2 s apart (sparse: every process on the path wakes from idle)
and of ten times as many 0.01 s apart (busy: the path stays warm). Prints one
table on stdout; progress goes to stderr.

    tests/bench.sh throughput [--seconds 10] [--repeat 3] [--pings 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))  # netlab and the helpers

from benchlib import BenchError, fmt, format_table, machine_note, progress, ratio, run_lab_bench, temp_dir
from netlab import Host, Lab, Process, start_client, start_server, wait_for

NEEDED_TOOLS = {"iperf3": "iperf3", "openvpn": "openvpn", "ping": "iputils-ping"}
NC_OVERLAY = "10.1.1.1/24"
OPENVPN_NET = "10.8.0.0"
OPENVPN_PORT = 1194
MTU = 1400


@dataclasses.dataclass
class Figures:
    """One column of the table: what one data path achieved."""

    up: float | None = None  # node -> server, Mbit/s
    down: float | None = None  # server -> node (iperf3 -R), Mbit/s
    node_to_node: float | None = None  # node1 -> node2, Mbit/s
    rtt_server: float | None = None  # node -> server, ms, 5 pings/s
    rtt_node: float | None = None  # node1 -> node2, ms, 5 pings/s
    rtt_server_busy: float | None = None  # node -> server, ms, 100 pings/s
    rtt_node_busy: float | None = None  # node1 -> node2, ms, 100 pings/s


# -- tools ------------------------------------------------------------------------


def ensure_tools() -> None:
    """Install iperf3, openvpn and ping when missing (apt-get update only then)."""
    missing = [package for command, package in NEEDED_TOOLS.items() if shutil.which(command) is None]
    if missing:
        progress(f"installing {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    version = subprocess.run(["openvpn", "--version"], capture_output=True, text=True).stdout.split()
    found = version[1] if len(version) > 1 else "?"
    if not found.startswith("2.6"):
        progress(f"warning: the reference should be OpenVPN 2.6, found {found}")


def iperf_lab(lab: Lab) -> tuple[Host, Host, Host]:
    """The server and two nodes on the bridge, an iperf3 server listening in the server and node2."""
    server_host, node1, node2 = (lab.add_host(name) for name in ("server", "node1", "node2"))
    for host in (server_host, node2):
        host.spawn("iperf3", "-s", name=f"iperf3-{host.name}")
    wait_for(lambda: node1.ping(server_host.ip) and node1.ping(node2.ip), what="the underlay")
    wait_for(
        lambda: all(":5201" in host.run("ss", "-ltn").stdout for host in (server_host, node2)),
        what="the iperf3 servers to listen",
    )
    return server_host, node1, node2


# -- measurements -----------------------------------------------------------------


def iperf_mbps(client: Host, target: str, seconds: int, reverse: bool = False) -> float:
    """One iperf3 TCP run; Mbit/s received (by the server, or by the client with -R)."""
    args = ["iperf3", "-c", target, "-t", str(seconds), "-J", "--connect-timeout", "5000"]
    if reverse:
        args.append("-R")
    done = client.run(*args, check=False, timeout=seconds + 60)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = {"error": done.stderr.strip() or "no JSON output"}
    if done.returncode != 0 or "error" in report:
        raise BenchError(f"iperf3 {' '.join(args[1:])} in {client.name}: {report.get('error', done.stderr.strip())}")
    return report["end"]["sum_received"]["bits_per_second"] / 1e6


def median_mbps(client: Host, target: str, seconds: int, repeat: int, what: str, reverse: bool = False) -> float:
    runs = []
    for attempt in range(1, repeat + 1):
        runs.append(iperf_mbps(client, target, seconds, reverse))
        progress(f"{what}: run {attempt}/{repeat}: {runs[-1]:,.0f} Mbit/s")
    return statistics.median(runs)


def rtt_ms(client: Host, target: str, count: int, what: str, interval: float = 0.2) -> float:
    """Median ping RTT, after one warm-up echo (ARP, first-packet setup)."""
    client.run("ping", "-n", "-c", "1", "-W", "2", target, check=False, timeout=10)
    done = client.run(
        "ping",
        "-n",
        "-c",
        str(count),
        "-i",
        str(interval),
        "-W",
        "2",
        target,
        check=False,
        timeout=count * interval + 30,
    )
    samples = [float(t) for t in re.findall(r"time=([\d.]+) ms", done.stdout)]
    if not samples:
        raise BenchError(f"ping {target} from {client.name}: no replies\n{done.stdout}{done.stderr}")
    if len(samples) < count:
        progress(f"{what}: only {len(samples)}/{count} echo replies")
    value = statistics.median(samples)
    progress(f"{what}: median RTT {value:.3f} ms over {len(samples)} pings")
    return value


def measure(node1: Host, node2: Host, server_ip: str, node2_ip: str, args: argparse.Namespace, label: str) -> Figures:
    """The five figures of one column, over the given addresses."""
    s, r, busy = args.seconds, args.repeat, 10 * args.pings
    return Figures(
        up=median_mbps(node1, server_ip, s, r, f"{label} node->server"),
        down=median_mbps(node1, server_ip, s, r, f"{label} node->server -R", reverse=True),
        node_to_node=median_mbps(node1, node2_ip, s, r, f"{label} node->node"),
        rtt_server=rtt_ms(node1, server_ip, args.pings, f"{label} node->server"),
        rtt_node=rtt_ms(node1, node2_ip, args.pings, f"{label} node->node"),
        rtt_server_busy=rtt_ms(node1, server_ip, busy, f"{label} node->server, busy", interval=0.01),
        rtt_node_busy=rtt_ms(node1, node2_ip, busy, f"{label} node->node, busy", interval=0.01),
    )


def stop(process: Process, what: str) -> None:
    """SIGTERM by PID and wait, so the tunnel removes its own devices."""
    code = process.stop()
    if code not in (0, -15):
        progress(f"warning: {what} exited with {code}; log {process.log_path}")


# -- stage 2: nc --------------------------------------------------------------------


def bench_nc(server_host: Host, node1: Host, node2: Host, args: argparse.Namespace) -> tuple[Figures, list[str]]:
    """Figures over nc, plus the warning/error lines its server logged."""
    progress("nc: starting server and two clients")
    server = start_server(server_host, ip=server_host.ip, networkAddr=NC_OVERLAY)
    clients = []
    try:
        join = server.join_string()
        clients = [start_client(node, join) for node in (node1, node2)]
        node2_ip = clients[1].overlay_ip()
        server_ip = NC_OVERLAY.split("/")[0]
        assert node2_ip, "node2 has no overlay address"
        wait_for(lambda: node1.ping(server_ip), timeout=20, what="nc: node1 to reach the server overlay IP")
        wait_for(lambda: node1.ping(node2_ip), timeout=20, what="nc: node1 to reach node2 over nc")
        figures = measure(node1, node2, server_ip, node2_ip, args, "nc")
    finally:
        for client in clients:
            stop(client.process, f"nc client on {client.host.name}")
        stop(server.process, "nc server")
    complaints = [line for line in server.process.log().splitlines() if re.search(r"WARNING|ERROR|Traceback", line)]
    return figures, complaints


# -- stage 3: OpenVPN ---------------------------------------------------------------


def write_openvpn_pki(directory: Path, clients: list[str]) -> None:
    """ca.crt, server.crt/key and <client>.crt/key: EC P-256, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            key_path = directory / f"{stem}.key"
            key_path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            key_path.chmod(0o600)

    def builder(cn: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        builder("nc-bench OpenVPN CA", ca_key, name("nc-bench OpenVPN CA"))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    save("ca", ca, None)
    for cn, usage in [("server", ExtendedKeyUsageOID.SERVER_AUTH)] + [
        (c, ExtendedKeyUsageOID.CLIENT_AUTH) for c in clients
    ]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(cn, key, ca.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        save(cn, cert, key)


COMMON_OPENVPN = f"""\
dev tun
proto tcp
port {OPENVPN_PORT}
cipher AES-256-GCM
data-ciphers AES-256-GCM
tun-mtu {MTU}
verb 3
"""


def openvpn_server_conf(pki: Path) -> str:
    # tcp-nodelay: nc sets TCP_NODELAY too, so latency compares like with like.
    return COMMON_OPENVPN + (
        f"topology subnet\nserver {OPENVPN_NET} 255.255.255.0\nclient-to-client\ntcp-nodelay\n"
        f"keepalive 10 60\ndh none\nca {pki}/ca.crt\ncert {pki}/server.crt\nkey {pki}/server.key\n"
    )


def openvpn_client_conf(pki: Path, name: str, server_ip: str) -> str:
    return COMMON_OPENVPN + (
        f"client\nremote {server_ip}\nnobind\nremote-cert-tls server\n"
        f"ca {pki}/ca.crt\ncert {pki}/{name}.crt\nkey {pki}/{name}.key\n"
    )


def start_openvpn(host: Host, config: Path, name: str) -> Process:
    process = host.spawn("openvpn", "--config", str(config), name=name)

    def up() -> bool:
        if not process.alive():
            raise BenchError(f"{name} exited early; log:\n{process.log()}")
        return "Initialization Sequence Completed" in process.log()

    try:
        wait_for(up, timeout=30, what=f"{name} to complete initialization")
    except AssertionError:
        raise BenchError(f"{name} did not come up; log:\n{process.log()}") from None
    return process


def bench_openvpn(
    server_host: Host, node1: Host, node2: Host, work: Path, args: argparse.Namespace
) -> tuple[Figures, list[str]]:
    """Figures over OpenVPN, plus notes from its logs (DCO, warnings)."""
    pki = work / "openvpn-pki"
    pki.mkdir()
    write_openvpn_pki(pki, ["node1", "node2"])
    (work / "openvpn-server.conf").write_text(openvpn_server_conf(pki))
    processes: list[Process] = []
    try:
        progress("OpenVPN: starting server and two clients")
        processes.append(start_openvpn(server_host, work / "openvpn-server.conf", "openvpn-server"))
        for node in (node1, node2):
            config = work / f"openvpn-{node.name}.conf"
            config.write_text(openvpn_client_conf(pki, node.name, server_host.ip))
            processes.append(start_openvpn(node, config, f"openvpn-{node.name}"))
        node2_ip = wait_for(lambda: node2.ipv4_address("tun0"), timeout=20, what="OpenVPN: node2 tun0 address")
        server_ip = str(wait_for(lambda: server_host.ipv4_address("tun0"), timeout=20, what="OpenVPN: server tun0"))
        wait_for(lambda: node1.ping(server_ip), timeout=20, what="OpenVPN: node1 to reach the server")
        wait_for(lambda: node1.ping(str(node2_ip)), timeout=20, what="OpenVPN: node1 to reach node2")
        figures = measure(node1, node2, server_ip, str(node2_ip), args, "OpenVPN")
    finally:
        for process in reversed(processes):
            stop(process, "openvpn")
    notes = sorted(
        {
            re.sub(r"^\S+ \S+ ", "", line)
            for p in processes
            for line in p.log().splitlines()
            if re.search(r"DCO version|Note:|WARNING|ERROR", line)
        }
    )
    return figures, notes


# -- the table ----------------------------------------------------------------------

ROWS = [
    ("node->server", "Mbit/s", "up"),
    ("node->server -R (server->node)", "Mbit/s", "down"),
    ("node1->node2 via server", "Mbit/s", "node_to_node"),
    ("RTT node->server, 5 pings/s", "ms", "rtt_server"),
    ("RTT node->server, 100 pings/s", "ms", "rtt_server_busy"),
    ("RTT node1->node2, 5 pings/s", "ms", "rtt_node"),
    ("RTT node1->node2, 100 pings/s", "ms", "rtt_node_busy"),
]


def table(nc: Figures, openvpn: Figures, underlay: Figures, args: argparse.Namespace) -> str:
    rows = []
    for label, unit, key in ROWS:
        a, b, c = (getattr(f, key) for f in (nc, openvpn, underlay))
        digits = 3 if unit == "ms" else 0
        added = fmt(a - c, 3) if unit == "ms" and a is not None and c is not None else "-"
        rows.append([label, unit, fmt(a, digits), fmt(b, digits), fmt(c, digits), ratio(a, b), ratio(a, c), added])
    title = (
        f"nc vs OpenVPN 2.6 (TCP, AES-256-GCM) vs underlay — iperf3 median of {args.repeat} x {args.seconds} s, "
        f"RTT median of {args.pings} pings at 5/s and {10 * args.pings} at 100/s, MTU {MTU}"
    )
    headers = ["path", "unit", "nc", "OpenVPN", "underlay", "nc/OpenVPN", "nc/underlay", "nc-underlay"]
    return format_table(headers, rows, title)


# -- main ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    ensure_tools()
    progress(f"before: {machine_note()}")
    with temp_dir("nc-bench-") as work:
        lab = Lab(work / "lab")
        try:
            server_host, node1, node2 = iperf_lab(lab)
            underlay = measure(node1, node2, server_host.ip, node2.ip, args, "underlay")
            nc, nc_log = bench_nc(server_host, node1, node2, args)
            openvpn, openvpn_notes = bench_openvpn(server_host, node1, node2, work, args)
        finally:
            lab.close()
    progress(f"after: {machine_note()}")
    print(table(nc, openvpn, underlay, args))
    for line in nc_log[:10]:
        progress(f"nc server log: {line}")
    for line in openvpn_notes[:10]:
        progress(f"OpenVPN log: {line}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each iperf3 run (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="iperf3 runs per figure; the median is shown (default 3)")
    parser.add_argument("--pings", type=int, default=20, help="echo requests per RTT figure (default 20)")
    args = parser.parse_args()
    if args.seconds < 1 or args.repeat < 1 or args.pings < 1:
        parser.error("--seconds, --repeat and --pings must be at least 1")
    return run_lab_bench("bench_throughput", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
