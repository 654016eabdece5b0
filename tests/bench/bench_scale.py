"""Scale: one real `nc server` against N simulated nodes (default 1000).

The server runs in one lab namespace with a /16 overlay; the simulator runs
in another (this script re-started with --worker inside it) and needs no TUN
devices. Each simulated node is real to the server:

1. registration   a bootstrap gRPC GetToken with the join string's token (the
                  server CA is fetched and checked against the join-string pin)
2. connect        TLS 1.3 to the network port with the node's own client
                  certificate (CN = node-token), HELLO, WELCOME -> overlay IP
3. echo           an ICMP echo request from the node's overlay IP to the
                  server's, as a PACKET frame; the server kernel answers
                  through its TUN and the reply must come back as a frame

The phases run one after the other; between them the orchestrator samples
the server's python process (VmRSS, threads, fds, CPU) from /proc. Prints
one table on stdout; progress goes to stderr.

    tests/bench.sh scale [--nodes 1000] [--concurrency 32] [--reg-threads 16]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import resource
import select
import signal
import ssl
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))  # netlab and the helpers

from benchlib import (
    ROOT,
    BenchError,
    cpu_seconds,
    fmt,
    format_table,
    machine_note,
    median,
    nofile_limit,
    open_fds,
    percentile,
    progress,
    python_pid,
    rss_mib,
    run_lab_bench,
    temp_dir,
    thread_count,
)
from netlab import Lab, start_server, wait_for

sys.path.insert(0, str(ROOT))
import ncctl

OVERLAY = "10.20.0.1/16"
KEEPALIVE_S = 3600  # the server neither pings nor drops the silent simulated nodes
RSS_TARGET_MIB = 200
PHASE_TIMEOUT_S = 900.0


# ==================================================================================
# Simulator (runs inside the "sim" namespace with --worker)
# ==================================================================================


def import_nc() -> tuple[Any, Any, Any, Any]:
    """ncctl and the generated protobuf modules, from the source tree."""
    import grpc

    from proto import nc_pb2, nc_pb2_grpc

    return ncctl, grpc, nc_pb2, nc_pb2_grpc


@dataclasses.dataclass
class SimNode:
    index: int
    token: str
    cert: Path
    key: Path
    context: ssl.SSLContext | None = None
    ip: str = ""
    server_ip: str = ""
    frames: FrameReader | None = None
    writer: asyncio.StreamWriter | None = None
    unexpected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


class FrameReader:
    """Frames from an asyncio stream, cut with nc's own parser (ncctl.next_frame)."""

    def __init__(self, reader: asyncio.StreamReader, next_frame: Any) -> None:
        self.reader = reader
        self.next_frame = next_frame
        self.buf = bytearray()

    async def next(self) -> tuple[int, bytes]:
        while True:
            frame = self.next_frame(self.buf, 0, len(self.buf))
            if frame is not None:
                kind, start, end = frame
                payload = bytes(self.buf[start:end])
                del self.buf[:end]
                return kind, payload
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk


def sim_node(index: int, reply: Any, work: Path) -> SimNode:
    """A node from a GetToken reply, its certificate and key written to work."""
    cert, key = work / f"{reply.token}.crt", work / f"{reply.token}.key"
    cert.write_bytes(base64.b64decode(reply.NetworkClientCert))
    key.write_bytes(base64.b64decode(reply.NetworkClientKey))
    return SimNode(index, reply.token, cert, key)


def icmp_echo_request(src: str, dst: str, ident: int, seq: int) -> bytes:
    """An IPv4 ICMP echo request with correct header and ICMP checksums."""
    payload = b"nc-bench-scale-" + struct.pack("!d", time.time())
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", ncctl.checksum(icmp)) + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,  # IPv4, 5-word header
        0,
        20 + len(icmp),
        ident,
        0x4000,  # don't fragment
        64,  # TTL
        1,  # ICMP
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    header = header[:10] + struct.pack("!H", ncctl.checksum(header)) + header[12:]
    return header + icmp


def is_echo_reply(packet: bytes, src: str, ident: int, seq: int) -> bool:
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 1:
        return False
    start = (packet[0] & 0x0F) * 4
    kind, _code, _sum, got_ident, got_seq = struct.unpack_from("!BBHHH", packet, start)
    return kind == 0 and (got_ident, got_seq) == (ident, seq) and packet[12:16] == ipaddress.IPv4Address(src).packed


def emit(phase: str, **facts: Any) -> None:
    print(json.dumps({"phase": phase, **facts}), flush=True)


async def wait_go() -> None:
    line = await asyncio.to_thread(sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit("simulator: orchestrator went away")


def register_all(spec: dict, work: Path) -> tuple[list[SimNode], float, collections.Counter[str]]:
    """N GetToken calls from a thread pool over one channel; returns the nodes and the wall time."""
    ncctl, grpc, pb, pb_grpc = import_nc()
    target = ncctl.parse_join_string(spec["join"])
    ca = ncctl.fetch_server_ca(target)  # checked against the join string's pin
    errors: collections.Counter[str] = collections.Counter()
    network_ca = work / "network-ca.crt"
    cas: set[str] = set()  # every reply carries the same network CA

    with ncctl.secure_channel(target.address, ca) as channel:
        stub = pb_grpc.LiteKubeNCBootstrapServiceStub(channel)

        def one(index: int) -> SimNode | None:
            try:
                reply = stub.GetToken(pb.GetTokenRequest(bootStrapToken=target.token), timeout=120)
            except grpc.RpcError as e:
                errors[f"GetToken rpc: {e.code().name}"] += 1
                return None
            if reply.code != ncctl.CODE_OK:
                errors[f"GetToken code {reply.code}: {reply.message}"] += 1
                return None
            cas.add(reply.NetworkCaCert)
            return sim_node(index, reply, work)

        started = time.perf_counter()
        with ThreadPoolExecutor(spec["reg_threads"], thread_name_prefix="register") as pool:
            nodes = [n for n in pool.map(one, range(spec["nodes"])) if n is not None]
        elapsed = time.perf_counter() - started
    if len(cas) > 1:
        raise BenchError(f"GetToken replies carried {len(cas)} different network CAs")
    if cas:
        network_ca.write_bytes(base64.b64decode(cas.pop()))
    for node in nodes:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_verify_locations(cafile=str(network_ca))
        context.load_cert_chain(node.cert, node.key)
        node.context = context
    return nodes, elapsed, errors


async def connect(node: SimNode, spec: dict, ncctl: Any, gate: asyncio.Semaphore) -> float:
    """TLS 1.3 + HELLO -> WELCOME; returns the seconds it took."""
    timeout = spec["timeout"]
    async with gate:
        started = time.perf_counter()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                spec["server"], spec["port"], ssl=node.context, server_hostname=ncctl.SERVER_TLS_NAME
            ),
            timeout,
        )
        node.writer = writer
        node.frames = FrameReader(reader, ncctl.next_frame)
        try:
            # A minimal protocol-1 peer: it offers no optional capabilities, so the
            # server must talk plain PACKET frames to it.
            writer.write(ncctl.Hello(node.token, caps=()).encode())
            while True:
                kind, payload = await asyncio.wait_for(node.frames.next(), timeout)
                if kind == ncctl.FRAME_WELCOME:
                    welcome = ncctl.Welcome.decode(payload)
                    break
                if kind == ncctl.FRAME_ERROR:
                    refusal = ncctl.Refusal.decode(payload)
                    raise ConnectionError(f"refused ({refusal.code}): {refusal.reason}")
        except BaseException:
            writer.close()
            raise
        node.ip, node.server_ip = welcome.ip, welcome.server_ip
        return time.perf_counter() - started


async def echo(node: SimNode, spec: dict, ncctl: Any) -> tuple[int, float] | None:
    """(attempt that got the reply, RTT s), or None after spec['attempts'] tries."""
    assert node.writer is not None and node.frames is not None
    ident = node.index & 0xFFFF
    for attempt in range(1, spec["attempts"] + 1):
        sent = time.perf_counter()
        packet = icmp_echo_request(node.ip, node.server_ip, ident, attempt)
        node.writer.write(ncctl.encode_frame(ncctl.FRAME_PACKET, packet))
        deadline = sent + spec["echo_timeout"]
        with contextlib.suppress(asyncio.TimeoutError):  # the builtin TimeoutError only from 3.11 on
            while (left := deadline - time.perf_counter()) > 0:
                kind, payload = await asyncio.wait_for(node.frames.next(), left)
                if kind == ncctl.FRAME_PACKET and is_echo_reply(payload, node.server_ip, ident, attempt):
                    return attempt, time.perf_counter() - sent
                if kind == ncctl.FRAME_ERROR:
                    raise ConnectionError(f"server ended the session: {ncctl.Refusal.decode(payload).reason}")
                if kind != ncctl.FRAME_KEEPALIVE:
                    node.unexpected[f"frame {kind:#x}"] += 1
    return None


async def simulate(spec: dict) -> None:
    ncctl, *_ = import_nc()
    work = Path(spec["work"])
    emit("ready")
    await wait_go()

    nodes, elapsed, errors = await asyncio.to_thread(register_all, spec, work)
    emit("registered", ok=len(nodes), seconds=elapsed, errors=dict(errors))
    await wait_go()

    gate = asyncio.Semaphore(spec["concurrency"])
    started = time.perf_counter()
    results = await asyncio.gather(*(connect(n, spec, ncctl, gate) for n in nodes), return_exceptions=True)
    elapsed = time.perf_counter() - started
    latencies = [r for r in results if isinstance(r, float)]
    failures = collections.Counter(f"{type(r).__name__}: {r}"[:120] for r in results if isinstance(r, BaseException))
    up = [n for n, r in zip(nodes, results) if isinstance(r, float)]
    emit(
        "connected",
        ok=len(up),
        seconds=elapsed,
        median_ms=1000 * (median(latencies) or 0),
        p99_ms=1000 * (percentile(latencies, 0.99) if latencies else 0),
        errors=dict(failures),
    )
    await wait_go()

    started = time.perf_counter()
    replies = await asyncio.gather(*(echo(n, spec, ncctl) for n in up), return_exceptions=True)
    elapsed = time.perf_counter() - started
    answered = [r for r in replies if isinstance(r, tuple)]
    rtts = [r[1] for r in answered]
    failures = collections.Counter(f"{type(r).__name__}: {r}"[:120] for r in replies if isinstance(r, BaseException))
    failures["no reply"] = sum(1 for r in replies if r is None)
    for node in up:
        failures.update({f"received {k} (not an echo reply)": v for k, v in node.unexpected.items()})
    emit(
        "echoed",
        replied=len(answered),
        first_try=sum(1 for r in answered if r[0] == 1),
        seconds=elapsed,
        median_ms=1000 * (median(rtts) or 0),
        p99_ms=1000 * (percentile(rtts, 0.99) if rtts else 0),
        errors={k: v for k, v in failures.items() if v},
    )
    await wait_go()

    for node in up:
        assert node.writer is not None
        node.writer.close()
    await asyncio.gather(*(asyncio.wait_for(n.writer.wait_closed(), 5) for n in up if n.writer), return_exceptions=True)
    emit("closed")


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft < spec["nodes"] + 64:
        raise SystemExit(f"simulator: open-file limit {soft} is too low for {spec['nodes']} sessions; raise ulimit -n")
    asyncio.run(simulate(spec))
    return 0


# ==================================================================================
# Orchestrator
# ==================================================================================


@dataclasses.dataclass
class Sample:
    rss_mib: float
    threads: int
    fds: int
    cpu_s: float


def sample(pid: int) -> Sample:
    return Sample(rss_mib(pid), thread_count(pid), open_fds(pid), cpu_seconds(pid))


class Simulator:
    """The --worker process in the sim namespace: JSON lines out, 'go' lines in."""

    def __init__(self, netns: str, spec_path: Path, log_path: Path) -> None:
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, __file__, "--worker", str(spec_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.log_path = log_path

    def expect(self, phase: str, timeout: float = PHASE_TIMEOUT_S) -> dict:
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"simulator: no '{phase}' within {timeout:.0f} s")
            ready, _, _ = select.select([self.popen.stdout], [], [], min(left, 1.0))
            if not ready:
                continue
            line = self.popen.stdout.readline()
            if not line:
                log = self.log_path.read_text(errors="replace")[-3000:]
                raise BenchError(f"simulator exited with {self.popen.wait()} before '{phase}'; log:\n{log}")
            event = json.loads(line)
            if event.get("phase") == phase:
                return event

    def go(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write("go\n")
        self.popen.stdin.flush()

    def stop(self) -> None:
        """SIGTERM by PID (ip netns exec execs, so it is the python), then SIGKILL."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)


def connected_count(server: Any) -> int:
    nodes = server.adm_json("node", "list")
    return sum(1 for n in nodes if n.get("connState") == 3 and n.get("nodeToken") != "reserverd")


def phase(sim: Simulator, name: str, pid: int, samples: dict[str, Sample]) -> dict:
    progress(f"phase: {name} ...")
    sim.go()
    event = sim.expect(name)
    samples[name] = sample(pid)
    progress(f"phase: {name}: {json.dumps({k: v for k, v in event.items() if k != 'phase'})}")
    return event


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.1f}/s" if seconds > 0 else "-"


def errors_text(event: dict) -> str:
    errors = event.get("errors") or {}
    return "; ".join(f"{v}x {k}" for k, v in errors.items()) or "none"


def build_table(args: argparse.Namespace, ev: dict[str, dict], s: dict[str, Sample], facts: dict[str, Any]) -> str:
    n = args.nodes
    reg, con, ech = ev["registered"], ev["connected"], ev["echoed"]
    peak = max(x.rss_mib for x in s.values())
    rows = [
        ["simulated nodes (no TUN)", f"{n}", "", ""],
        [
            "registrations (GetToken)",
            f"{reg['ok']}/{n} in {reg['seconds']:.1f} s = {rate(reg['ok'], reg['seconds'])}",
            f"{n}/{n}",
            "ok" if reg["ok"] == n else "FAIL",
        ],
        [
            "  server CPU during registrations",
            f"{s['registered'].cpu_s - s['start'].cpu_s:.1f} s",
            "",
            "",
        ],
        [
            "connects (TLS 1.3 + HELLO/WELCOME)",
            f"{con['ok']}/{reg['ok']} in {con['seconds']:.1f} s = {rate(con['ok'], con['seconds'])}",
            "all",
            "ok" if con["ok"] == reg["ok"] == n else "FAIL",
        ],
        [
            "  connect latency median / p99",
            f"{con['median_ms']:.0f} / {con['p99_ms']:.0f} ms ({args.concurrency} in flight)",
            "",
            "",
        ],
        ["  server CPU during connects", f"{s['connected'].cpu_s - s['registered'].cpu_s:.1f} s", "", ""],
        ["connected per `nc adm node list`", f"{facts['listed_connected']}", f"{n}", ""],
        [
            "echo replies, all up at once",
            f"{ech['replied']}/{con['ok']} ({ech['first_try']} on the first try)",
            f"{n}/{n}",
            "ok" if ech["replied"] == n else "FAIL",
        ],
        ["  echo RTT median / p99 (whole burst)", f"{ech['median_ms']:.1f} / {ech['p99_ms']:.1f} ms", "", ""],
        [
            "server RSS: start / registered",
            f"{fmt(s['start'].rss_mib)} / {fmt(s['registered'].rss_mib)} MiB",
            "",
            "",
        ],
        [
            "server RSS: all up / after echo",
            f"{fmt(s['connected'].rss_mib)} / {fmt(s['echoed'].rss_mib)} MiB",
            f"<= {RSS_TARGET_MIB} MiB",
            "ok" if peak <= RSS_TARGET_MIB else "FAIL",
        ],
        ["server RSS after all closed", f"{fmt(s['closed'].rss_mib)} MiB", "", ""],
        ["server threads (all up)", f"{s['connected'].threads}", "", ""],
        ["server open fds (all up) / nofile", f"{s['connected'].fds} / {facts['nofile']}", "", ""],
        ["connected after all closed", f"{facts['listed_after_close']}", "0", ""],
        ["server log warnings / errors", f"{facts['warnings']} / {facts['errors']}", "0 / 0", ""],
    ]
    title = f"nc server scale: {n} simulated nodes, overlay {OVERLAY}, one server process"
    return format_table(["measure", "value", "target", ""], rows, title)


def run(args: argparse.Namespace) -> int:
    progress(f"before: {machine_note()}")
    with temp_dir("nc-bench-scale-") as work:
        lab = Lab(work / "lab")
        sim: Simulator | None = None
        try:
            server_host, sim_host = lab.add_host("server"), lab.add_host("sim")
            server = start_server(server_host, ip=server_host.ip, networkAddr=OVERLAY, keepalive=KEEPALIVE_S)
            pid = python_pid(server.process.pid)
            join = server.join_string("--life", "240")
            certs = work / "sim-certs"
            certs.mkdir()
            spec = {
                "join": join,
                "server": server_host.ip,
                "port": 6441,
                "nodes": args.nodes,
                "reg_threads": args.reg_threads,
                "concurrency": args.concurrency,
                "timeout": 60.0,
                "attempts": 3,
                "echo_timeout": 5.0,
                "work": str(certs),
            }
            spec_path = work / "sim.json"
            spec_path.write_text(json.dumps(spec))
            samples: dict[str, Sample] = {}
            events: dict[str, dict] = {}
            sim = Simulator(sim_host.ns, spec_path, work / "lab" / "simulator.log")
            sim.expect("ready", timeout=60)
            samples["start"] = sample(pid)
            for name in ("registered", "connected"):
                events[name] = phase(sim, name, pid, samples)
            facts: dict[str, Any] = {"listed_connected": connected_count(server), "nofile": nofile_limit(pid)}
            events["echoed"] = phase(sim, "echoed", pid, samples)
            phase(sim, "closed", pid, samples)
            sim.stop()
            with contextlib.suppress(AssertionError):
                wait_for(lambda: connected_count(server) == 0, timeout=30, interval=1, what="sessions to close")
            facts["listed_after_close"] = connected_count(server)
            samples["closed"] = sample(pid)
            log = server.process.log().splitlines()
            warnings = [line for line in log if "WARNING" in line]
            errors = [line for line in log if re.search(r"ERROR|CRITICAL|Traceback", line)]
            facts.update(warnings=len(warnings), errors=len(errors))
        finally:
            if sim is not None:
                sim.stop()
            lab.close()
    progress(f"after: {machine_note()}")
    print(build_table(args, events, samples, facts))
    for name in ("registered", "connected", "echoed"):
        if events[name].get("errors"):
            progress(f"{name} failures: {errors_text(events[name])}")
    for line in (errors + warnings)[:15]:
        progress(f"server log: {line}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000, help="simulated nodes (default 1000)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="connects in flight (default 32); all come from one address, and the server sheds "
        "handshakes beyond 32 pending per address (MAX_PENDING_PER_SOURCE); the simulator does not retry them",
    )
    parser.add_argument("--reg-threads", type=int, default=16, help="concurrent GetToken calls (default 16)")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker)
    if args.nodes < 1 or args.concurrency < 1 or args.reg_threads < 1:
        parser.error("--nodes, --concurrency and --reg-threads must be at least 1")
    return run_lab_bench("bench_scale", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
