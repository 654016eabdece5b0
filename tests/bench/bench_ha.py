"""HA: nc replicas on a real three-member etcd cluster, against its targets.

1. failover    SIGKILL the leader N times (default 10); each time, the seconds until
               every node is back on its own overlay IP and node-to-node ping flows
               (median and max); the killed replica is restarted as a standby.
2. overlap     who holds the server overlay address, sampled every 100 ms through
               all the failovers: the samples with two holders (must be 0).
3. etcd member one etcd member (not the leader's host) SIGKILLed and restarted:
               node disconnections meanwhile (must be 0).
4. joins       200 concurrent GetToken calls spread over the three replicas, then
               every new node connects to the leader: joins answered, addresses
               bound twice (store and welcomes; must be 0).

etcd faults (--faults: these instead of the above), on a fresh lab each:
5. partition   the leader cut off from etcd only (nft in its namespace, 30 s), N times
               (default 3): seconds until it gave the address up, until another
               replica held it, and samples with two holders (must be 0).
6. quorum loss two of three etcd members killed for 25 s while two nodes ping each
               other 10 times a second: pings lost, as seconds of outage (target:
               <= 10 % loss), and whether the same leader goes on.
7. slow etcd   tbf 1 Mbit on every member host and 100 KB writes for 30 s, then
               healed: seconds until exactly one replica leads, samples with two
               holders meanwhile (must be 0), failovers (at most 1).
8. late etcd   every replica's etcd calls answered 0.9 s late (a delaying proxy) for
               30 s: failovers and samples with no holder (must be 0: leadership
               survives an etcd answering within a second).

    tests/bench.sh ha [--failovers 10] [--joins 200]
    tests/bench.sh ha --faults [--partitions 3]
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))  # netlab and the helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchlib import format_table, machine_note, median, progress, run_lab_bench, temp_dir
from ha_helpers import (
    Replicas,
    cut_from_etcd,
    delayed_replicas,
    heal_etcd,
    ping_loss,
    reconnect_to_etcd,
    slow_etcd,
    start_pings,
)
from netlab import Lab, NcClient, start_client, wait_for


class HolderSampler(threading.Thread):
    """Samples the overlay-address holders every 100 ms until stopped: samples with two,
    samples with none, and failovers (the address held by another replica than before)."""

    def __init__(self, replicas: Replicas) -> None:
        super().__init__(name="holder-sampler", daemon=True)
        self.replicas, self.stop = replicas, threading.Event()
        self.samples = self.empty = self.failovers = 0
        self.doubles: list[list[str]] = []
        self.last = ""

    def run(self) -> None:
        while not self.stop.wait(0.1):
            held = self.replicas.holders()
            self.samples += 1
            if len(held) > 1:
                self.doubles.append(held)
            elif not held:
                self.empty += 1
            else:
                self.failovers += bool(self.last) and held[0] != self.last
                self.last = held[0]


def back(nodes: list[NcClient], addresses: list[str]) -> bool:
    if any(n.overlay_ip() != a for n, a in zip(nodes, addresses)):
        return False
    return nodes[0].host.ping(addresses[1], count=1, timeout=1)


def failovers(replicas: Replicas, nodes: list[NcClient], addresses: list[str], count: int) -> list[float]:
    times = []
    for round_ in range(count):
        leader = wait_for(replicas.leader, timeout=30, what="a leader")
        killed = replicas.servers[leader]
        started = time.monotonic()
        killed.process.stop(signal.SIGKILL)
        wait_for(lambda: replicas.leader() not in (None, leader), timeout=60, what="a new leader")
        wait_for(lambda: back(nodes, addresses), timeout=60, interval=0.05, what="nodes back after failover")
        times.append(time.monotonic() - started)
        progress(f"failover {round_ + 1}/{count}: {times[-1]:.1f} s")
        killed.start()
    return times


def disconnects(nodes: list[NcClient]) -> int:
    return sum(n.process.log().count("disconnected") + n.process.log().count("cannot connect") for n in nodes)


def etcd_member_restart(replicas: Replicas, nodes: list[NcClient]) -> int:
    leader = wait_for(replicas.leader, timeout=30, what="a leader")
    before = disconnects(nodes)
    member = next(h for h in replicas.hosts if h.name != leader)
    replicas.etcd.kill(member)
    time.sleep(5)
    replicas.etcd.restart(member)
    time.sleep(5)
    return disconnects(nodes) - before


def join_worker(spec_path: str) -> int:
    """Inside a lab namespace: GetToken round-robin over the replicas, all at once,
    then every node's HELLO to the leader. Prints one JSON line."""
    import asyncio

    import bench_scale

    import ncctl

    spec = json.loads(Path(spec_path).read_text())
    _, grpc, pb, pb_grpc = bench_scale.import_nc()
    target = ncctl.parse_join_string(spec["join"])
    ca = ncctl.fetch_server_ca(target)
    work = Path(spec["work"])
    channels = [ncctl.secure_channel(t.address, ca) for t in target.alternatives()]
    stubs = [pb_grpc.LiteKubeNCBootstrapServiceStub(c) for c in channels]
    errors: collections.Counter[str] = collections.Counter()
    barrier = threading.Barrier(spec["joins"])

    def one(index: int) -> Any:
        barrier.wait()
        for attempt in range(6):  # a replica answers RESOURCE_EXHAUSTED past 64 calls at once: try again
            try:
                request = pb.GetTokenRequest(bootStrapToken=target.token)
                reply = stubs[index % len(stubs)].GetToken(request, timeout=120)
                break
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and attempt < 5:
                    errors["retried after RESOURCE_EXHAUSTED"] += 1
                    time.sleep(0.2 * (attempt + 1))
                    continue
                errors[f"rpc {e.code().name}"] += 1
                return None
        if reply.code != ncctl.CODE_OK:
            errors[f"code {reply.code}: {reply.message}"] += 1
            return None
        (work / "network-ca.crt").write_bytes(base64.b64decode(reply.NetworkCaCert))
        return bench_scale.sim_node(index, reply, work)

    with ThreadPoolExecutor(spec["joins"]) as pool:
        nodes = [n for n in pool.map(one, range(spec["joins"])) if n is not None]
    for node in nodes:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(work / "network-ca.crt"))
        context.load_cert_chain(node.cert, node.key)
        node.context = context

    async def connect_all() -> list[Any]:
        gate = asyncio.Semaphore(16)  # under the per-address handshake limit
        cfg = {"server": spec["leader"], "port": 6441, "timeout": 30}
        return await asyncio.gather(*(bench_scale.connect(n, cfg, ncctl, gate) for n in nodes), return_exceptions=True)

    results = asyncio.run(connect_all())
    connect_errors = collections.Counter(
        f"{type(r).__name__}: {r}"[:100] for r in results if isinstance(r, BaseException)
    )
    welcomed = [n.ip for n, r in zip(nodes, results) if isinstance(r, float)]
    print(
        json.dumps(
            {
                "answered": len(nodes),
                "join_errors": dict(errors),
                "welcomed": len(welcomed),
                "welcome_duplicates": len(welcomed) - len(set(welcomed)),
                "connect_errors": dict(connect_errors),
                "tokens_unique": len({n.token for n in nodes}) == len(nodes),
            }
        )
    )
    return 0


def concurrent_joins(lab: Lab, replicas: Replicas, count: int) -> dict:
    leader = wait_for(replicas.leader, timeout=30, what="a leader")
    server = replicas.servers[leader]
    join = server.join_string("--life", "60")
    host = lab.add_host("joiner")
    work = lab.dir / "joiner"
    work.mkdir()
    spec = lab.dir / "join-spec.json"
    spec.write_text(json.dumps({"join": join, "joins": count, "work": str(work), "leader": server.host.ip}))
    python = str(Path(sys.executable))
    done = host.run(python, __file__, "--join-worker", str(spec), timeout=600)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    nodes = server.adm_json("node", "list")
    bound = [n["bindIp"] for n in nodes if n.get("bindIp")]
    result["store_duplicates"] = len(bound) - len(set(bound))
    used = [t["uses"] for t in server.adm_json("token", "list") if t["tokenId"] == join.split(".")[0]]
    result["token_uses"] = used[0] if used else -1  # a use counts once the node is heard from (its HELLO)
    return result


def partition_once(replicas: Replicas) -> tuple[float, float, int, int]:
    """(seconds until the old leader let go, until another held, two-holder samples, samples)."""
    old = wait_for(replicas.leader, timeout=60, what="a leader")
    sampler = HolderSampler(replicas)
    sampler.start()
    started = time.monotonic()
    cut_from_etcd(replicas.servers[old].host)
    wait_for(lambda: old not in replicas.holders(), timeout=60, interval=0.05, what="the old leader to let go")
    released = time.monotonic() - started
    wait_for(lambda: replicas.leader() not in (None, old), timeout=60, interval=0.05, what="another leader")
    taken = time.monotonic() - started
    time.sleep(max(0.0, 30 - (time.monotonic() - started)))
    reconnect_to_etcd(replicas.servers[old].host)
    time.sleep(5)
    sampler.stop.set()
    sampler.join()
    return released, taken, len(sampler.doubles), sampler.samples


def quorum_loss(lab: Lab, replicas: Replicas) -> tuple[int, int, bool]:
    """(pings sent, lost) through a 25 s loss of two etcd members; whether the leader stayed."""
    leader = wait_for(replicas.leader, timeout=60, what="a leader")
    join = replicas.servers[leader].join_string()
    nodes = [start_client(lab.add_host(f"q{i}"), join) for i in range(2)]
    addresses = [n.overlay_ip() for n in nodes]
    pings = start_pings(nodes[0].host, addresses[1] or "", seconds=40)
    time.sleep(5)
    killed = [h for h in replicas.hosts if h.name != leader]
    for host in killed:
        replicas.etcd.kill(host)
    time.sleep(25)
    for host in killed:
        replicas.etcd.restart(host)
    pings.popen.wait(timeout=60)
    sent, lost = ping_loss(pings)
    return sent, lost, replicas.holders() == [leader]


def late_etcd(directory: Path) -> HolderSampler:
    """Every replica reaches etcd through a proxy holding each byte 0.45 s each way (each
    call answered about 0.9 s late) for 30 s, then 3 s fast again: the holder samples."""
    lab = Lab(directory / "late")
    try:
        delay = lab.dir / "etcd-delay"
        replicas = delayed_replicas(lab, delay)
        wait_for(replicas.leader, timeout=60, what="a leader")
        sampler = HolderSampler(replicas)
        sampler.start()
        delay.write_text("0.45")
        time.sleep(30)
        delay.write_text("0")
        time.sleep(3)
        sampler.stop.set()
        sampler.join()
        return sampler
    finally:
        lab.close()


def slow_then_healed(replicas: Replicas) -> tuple[float, int, int, int]:
    """(seconds from healing until one replica leads for 5 s running, two-holder samples,
    samples, failovers through the fault and the recovery)."""
    wait_for(replicas.leader, timeout=60, what="a leader")
    sampler = HolderSampler(replicas)
    sampler.start()
    writer = slow_etcd(replicas, rate_kbit=1000)
    time.sleep(30)
    heal_etcd(replicas, writer)
    healed = time.monotonic()
    steady_since, leader = time.monotonic(), replicas.leader()
    while time.monotonic() - steady_since < 5:
        now_leader = replicas.leader()
        if now_leader is None or now_leader != leader:
            steady_since, leader = time.monotonic(), now_leader
        if time.monotonic() - healed > 120:
            break
        time.sleep(0.1)
    sampler.stop.set()
    sampler.join()
    return steady_since - healed, len(sampler.doubles), sampler.samples, sampler.failovers


def in_a_lab(directory: Path, name: str, body: Callable[[Lab, Replicas], Any]) -> Any:
    lab = Lab(directory / name)
    try:
        replicas = Replicas(lab, count=3)
        return body(lab, replicas)
    finally:
        lab.close()


def run_faults(args: argparse.Namespace) -> int:
    with temp_dir("nc-bench-ha-faults-") as directory:
        runs = []
        for n in range(args.partitions):
            progress(f"partition {n + 1}/{args.partitions}: the leader cut off from etcd for 30 s")
            runs.append(in_a_lab(directory, f"partition{n}", lambda _lab, r: partition_once(r)))
        progress("quorum loss: two of three etcd members killed for 25 s")
        sent, lost, stayed = in_a_lab(directory, "quorum", quorum_loss)
        progress("slow etcd for 30 s, then healed")
        steady, slow_doubles, slow_samples, slow_failovers = in_a_lab(
            directory, "slow", lambda _lab, r: slow_then_healed(r)
        )
        progress("etcd answering 0.9 s late for 30 s")
        late = late_etcd(directory)
    released = [r[0] for r in runs]
    taken = [r[1] for r in runs]
    rows = [
        ["partition: the old leader gave the address up after (max)", f"{max(released):.1f} s", "before the takeover"],
        ["partition: another replica held it after (max)", f"{max(taken):.1f} s", "<= 15 s"],
        [
            f"partition: samples with two holders (of {sum(r[3] for r in runs)}, {len(runs)} runs)",
            str(sum(r[2] for r in runs)),
            "0",
        ],
        [f"quorum loss 25 s: pings lost (of {sent}, 10/s)", f"{lost} ({lost * 0.1:.1f} s)", "<= 10 %"],
        ["quorum loss: the same leader after", "yes" if stayed else "no", "yes"],
        ["slow etcd healed -> one leader, steady 5 s", f"{steady:.1f} s", "<= 15 s"],
        [f"slow etcd: samples with two holders (of {slow_samples})", str(slow_doubles), "0"],
        ["slow etcd: failovers (fault and recovery)", str(slow_failovers), "<= 1"],
        [
            f"etcd 0.9 s late, 30 s: failovers / samples with no holder (of {late.samples})",
            f"{late.failovers} / {late.empty}",
            "0 / 0",
        ],
    ]
    print(format_table(["measure", "nc", "target"], rows, title="HA replicas, etcd faults " + machine_note()))
    return 0


def run(args: argparse.Namespace) -> int:
    with temp_dir("nc-bench-ha-") as directory:
        lab = Lab(directory / "lab")
        try:
            progress("starting a 3-member etcd cluster and 3 replicas")
            replicas = Replicas(lab, count=3)
            leader = wait_for(replicas.leader, timeout=30, what="a leader")
            join = replicas.servers[leader].join_string()
            nodes = [start_client(lab.add_host(f"n{i}"), join) for i in range(2)]
            addresses = [n.overlay_ip() for n in nodes]
            sampler = HolderSampler(replicas)
            sampler.start()
            times = failovers(replicas, nodes, addresses, args.failovers)
            sampler.stop.set()
            sampler.join()
            progress("etcd member kill and restart")
            member_disconnects = etcd_member_restart(replicas, nodes)
            progress(f"{args.joins} concurrent joins over three replicas")
            joins = concurrent_joins(lab, replicas, args.joins)
        finally:
            lab.close()
    rows = [
        ["leader SIGKILL -> nodes back, same IPs, traffic (median)", f"{median(times):.1f} s", "<= 15 s"],
        [f"leader SIGKILL -> ... (max over {len(times)})", f"{max(times):.1f} s", "<= 15 s"],
        [f"samples with two overlay-address holders (of {sampler.samples})", str(len(sampler.doubles)), "0"],
        ["node disconnects, one etcd member killed+restarted", str(member_disconnects), "0"],
        [f"joins answered (of {args.joins}, over 3 replicas)", str(joins["answered"]), str(args.joins)],
        ["nodes welcomed by the leader", str(joins["welcomed"]), str(args.joins)],
        ["the join token's counted uses", str(joins["token_uses"]), "= nodes welcomed"],
        [
            "addresses bound twice (welcomes / store)",
            f"{joins['welcome_duplicates']} / {joins['store_duplicates']}",
            "0",
        ],
    ]
    print(format_table(["measure", "nc", "target"], rows, title="HA replicas on etcd " + machine_note()))
    errors = {k: v for k, v in joins.items() if k.endswith("errors") and v}
    if errors:
        print(f"errors: {errors}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--failovers", type=int, default=10)
    parser.add_argument("--joins", type=int, default=200)
    parser.add_argument("--faults", action="store_true", help="etcd faults instead: partition, quorum loss, slow")
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--join-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.join_worker:
        return join_worker(args.join_worker)
    return run_lab_bench("bench_ha", lambda: run_faults(args) if args.faults else run(args))


if __name__ == "__main__":
    sys.exit(main())
