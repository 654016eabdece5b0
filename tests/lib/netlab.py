"""A lab of network namespaces for end-to-end tests and benchmarks.

Hosts are namespaces joined by veth pairs to a bridge that lives in its own
namespace, so nothing touches the machine's own interfaces. Underlay
addresses come from 198.18.0.0/15 and 2001:2::/48 (the benchmarking ranges).
Every process is started with a known PID and stopped by that PID; close()
removes every namespace, also when a test failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
NC = ROOT / "nc"
SCRIPTS = Path(__file__).resolve().parent / "scripts"  # programs the tests run inside lab namespaces
UNDERLAY_PREFIX = "198.18.0"
UNDERLAY6_PREFIX = "2001:2"


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} -> {done.returncode}: {done.stderr.strip()}")
    return done


class Process:
    """A process started inside a namespace; output goes to a log file."""

    def __init__(self, popen: subprocess.Popen, log_path: Path) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for_output(self, text: str, timeout: float = 20, what: str = "output") -> None:
        """Wait until `text` appears in the log; fail at once, with the log's tail, if the
        process exits first, and show the tail on timeout too."""

        def printed() -> bool:
            if text in self.log():
                return True
            if not self.alive():
                raise AssertionError(f"exited ({self.popen.returncode}) before {what}")
            return False

        try:
            wait_for(printed, timeout=timeout, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}; its log ends:\n{self.log()[-2000:]}") from None

    def send_signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Signal by PID and wait; escalates to SIGKILL after timeout."""
        if self.alive():
            os.kill(self.pid, sig)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
        return self.popen.wait(10)


class Host:
    def __init__(self, lab: Lab, name: str, ns: str, ip: str) -> None:
        self.lab, self.name, self.ns, self.ip = lab, name, ns, ip
        # Another userland for this host: words put before every command it runs (e.g. a
        # chroot into an arm64 root), and the nc that nc()/spawn_nc() run in it.
        self.prefix: tuple[str, ...] = ()
        self.nc_path = str(NC)

    def run(
        self, *args: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns, *self.prefix, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"[{self.name}] {' '.join(args)} -> {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
            )
        return done

    def use_ipv6_underlay(self, keep_ipv4: bool = False) -> str:
        """Give eth0 an IPv6 underlay address (2001:2::/48, the IPv6 benchmarking range,
        host part as in the IPv4 one; no duplicate-detection delay) and, unless keep_ipv4,
        take the IPv4 underlay address away. Returns the new address, now self.ip."""
        ip6 = f"{UNDERLAY6_PREFIX}::{self.ip.rsplit('.', 1)[1]}"
        sh("ip", "-n", self.ns, "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
        if not keep_ipv4:
            sh("ip", "-n", self.ns, "addr", "del", f"{self.ip}/24", "dev", "eth0")
        self.ip = ip6
        return ip6

    def nc(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run(self.nc_path, *args, check=check, timeout=timeout)

    def spawn(self, *args: str, name: str | None = None) -> Process:
        log_path = self.lab.dir / f"{name or self.name}-{len(self.lab.processes)}.log"
        with open(log_path, "wb") as handle:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *self.prefix, *args],
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        process = Process(popen, log_path)
        self.lab.processes.append(process)
        return process

    def spawn_nc(self, *args: str, name: str | None = None) -> Process:
        return self.spawn(self.nc_path, *args, name=name)

    def ping(self, target: str, count: int = 1, timeout: float = 2) -> bool:
        done = self.run(
            "ping",
            "-n",
            "-q",
            "-c",
            str(count),
            "-W",
            str(int(timeout)),
            "-i",
            "0.2",
            target,
            check=False,
            timeout=timeout * count + 10,
        )
        return done.returncode == 0

    def ipv4_address(self, device: str) -> str | None:
        """The first IPv4 address on device, or None (no such device, or no address yet)."""
        done = self.run("ip", "-j", "-4", "addr", "show", "dev", device, check=False)
        if done.returncode != 0:
            return None
        for link in json.loads(done.stdout or "[]"):
            for info in link.get("addr_info", []):
                return info["local"]
        return None

    def ipv4_routes(self) -> list[dict]:
        """The main IPv4 routing table, as `ip -j` reports it."""
        return json.loads(self.run("ip", "-j", "-4", "route", "show").stdout or "[]")

    def has_link(self, name: str) -> bool:
        return self.run("ip", "link", "show", "dev", name, check=False).returncode == 0


class Lab:
    """Namespaces on one bridge: lab.add_host('server') -> 198.18.0.1, and so on."""

    def __init__(self, directory: Path) -> None:
        self.id = secrets.token_hex(3)
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hosts: dict[str, Host] = {}
        self.processes: list[Process] = []
        self.namespaces: list[str] = []
        self.bridge_ns = self._namespace("br")
        sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")

    def _namespace(self, role: str) -> str:
        name = f"nct-{self.id}-{role}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        ns = self._namespace(name)
        port = f"p{index}"
        sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.bridge_ns)
        sh("ip", "-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
        ip = f"{UNDERLAY_PREFIX}.{index}"
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        host = Host(self, name, ns, ip)
        self.hosts[name] = host
        return host

    def shape_underlay(self, loss_pct: float = 0.0, rate_mbit: float = 0.0, wire: bool = False) -> None:
        """Random loss on every frame the bridge forwards (nftables numgen: this kernel has
        no netem), and a tbf rate limit out of each bridge port. A veth passes a GSO
        super-packet on whole, so loss would take up to 64 datagrams or segments at once
        and a queue could hold megabytes in a few entries; `wire` makes the hosts' eth0
        behave as a NIC on a wire instead: segments leave one by one (gso_max_segs 1) and
        are coalesced on arrival (GRO)."""
        if wire:
            for host in self.hosts.values():
                host.run("ip", "link", "set", "eth0", "gso_max_segs", "1")
                host.run("ethtool", "-K", "eth0", "gro", "on")
        if loss_pct > 0:
            script = (
                "table bridge nclab {\n  chain forward {\n    type filter hook forward priority 0; policy accept;\n"
                f"    numgen random mod 1000 < {round(loss_pct * 10)} counter drop\n  }}\n}}\n"
            )
            subprocess.run(
                ["ip", "netns", "exec", self.bridge_ns, "nft", "-f", "-"], input=script, text=True, check=True
            )
        if rate_mbit > 0:
            for index in range(1, len(self.hosts) + 1):
                sh("ip", "netns", "exec", self.bridge_ns, "tc", "qdisc", "add", "dev", f"p{index}", "root", "tbf",
                   "rate", f"{rate_mbit}mbit", "burst", "64kb", "latency", "50ms")  # fmt: skip

    def clear_underlay(self) -> None:
        """No more loss (the rate limits stay)."""
        subprocess.run(
            ["ip", "netns", "exec", self.bridge_ns, "nft", "delete", "table", "bridge", "nclab"], check=False
        )

    def close(self) -> None:
        for process in self.processes:
            with contextlib.suppress(Exception):
                process.stop(signal.SIGKILL, timeout=5)
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)


class NcServer:
    """`nc server` running in a lab host with its own server.yml and workDir."""

    def __init__(self, host: Host, process: Process, config: Path, work_dir: Path) -> None:
        self.host, self.process, self.config, self.work_dir = host, process, config, work_dir

    def adm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.host.nc("adm", "--config", str(self.config), *args, check=check)

    def adm_json(self, *args: str) -> object:
        return json.loads(self.adm(*args, "-o", "json").stdout)

    def join_string(self, *args: str) -> str:
        return self.adm("token", "create", *args).stdout.strip()

    def healthy(self) -> bool:
        return self.adm("health", check=False).returncode == 0

    def node(self, token: str) -> dict:
        return {n["nodeToken"]: n for n in self.adm_json("node", "list")}.get(token, {})

    def start(self) -> NcServer:
        """(Re)start the server process on the same config; waits until healthy."""
        if self.process.alive():
            raise RuntimeError("server already running")
        self.process = self.host.spawn_nc("server", "--config", str(self.config), name="server")
        wait_for(self.healthy, timeout=30, what="nc server to become healthy")
        return self


def start_server(host: Host, **fields: object) -> NcServer:
    """Write server.yml (workDir in the lab dir plus the given camelCase fields), start, wait healthy."""
    work_dir = host.lab.dir / f"{host.name}-work"
    config = host.lab.dir / f"{host.name}-server.yml"
    body = {"workDir": str(work_dir), **fields}
    config.write_text(json.dumps({"mode": "server", "server": body}))  # JSON is YAML
    process = host.spawn_nc("server", "--config", str(config), name="server")
    server = NcServer(host, process, config, work_dir)
    try:
        wait_for(server.healthy, timeout=30, what="nc server to become healthy")
    except AssertionError:
        raise AssertionError(f"server did not start; log:\n{process.log()}") from None
    return server


class NcClient:
    def __init__(self, host: Host, process: Process, work_dir: Path) -> None:
        self.host, self.process, self.work_dir = host, process, work_dir

    @property
    def config(self) -> Path:
        return self.work_dir / "client.yml"

    def token(self) -> str:
        import yaml

        return yaml.safe_load(self.config.read_text())["client"]["token"]

    def overlay_ip(self) -> str | None:
        """The IPv4 address on the client's nc0, or None."""
        return self.host.ipv4_address("nc0")

    def restart(self) -> NcClient:
        if self.process.alive():
            raise RuntimeError("client already running")
        self.process = self.host.spawn_nc("client", "--config", str(self.config), name=f"{self.host.name}-client")
        return self

    def restart_with_full_tunnel(self) -> None:
        """Stop, turn on redirectGateway in client.yml, start again; returns once the
        redirect routes are in."""
        self.process.stop()
        self.config.write_text(self.config.read_text().replace("redirectGateway: false", "redirectGateway: true"))
        self.restart()
        wait_for(lambda: any(r.get("dst") == "0.0.0.0/1" for r in self.host.ipv4_routes()), what="the redirect routes")


def start_client(host: Host, join: str, wait: bool = True) -> NcClient:
    """`nc client --join` in host with a work dir in the lab dir; waits for nc0 to get an address."""
    work_dir = host.lab.dir / f"{host.name}-client"
    process = host.spawn_nc("client", "--join", join, "--work-dir", str(work_dir), name=f"{host.name}-client")
    client = NcClient(host, process, work_dir)
    if wait:
        try:
            wait_for(client.overlay_ip, timeout=30, what=f"{host.name} to get an overlay address")
        except AssertionError:
            raise AssertionError(f"client on {host.name} did not connect; log:\n{process.log()}") from None
    return client


@contextlib.contextmanager
def lab(directory: Path) -> Iterator[Lab]:
    the_lab = Lab(directory)
    try:
        yield the_lab
    finally:
        the_lab.close()
