"""Direct node-to-node paths against the server relay, in case (b) of the direct-path tests:
two sites, each a node behind its own masquerading router (endpoint-independent mapping),
the server on the routers' WAN bridge. In one run: iperf3 node -> server, node -> node
while the path is direct, then node -> node relayed (nftables cuts the routers off from
each other, so the nodes fall back to the server); ping node -> node both ways; and the
server's CPU seconds during each node -> node transfer. Targets: direct node -> node at
least 0.9x node -> server; the server's CPU during the direct transfer at most 5 % of
what relaying the same transfer costs it. Prints one table and the machine's load.

    tests/bench.sh direct [--seconds 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))  # netlab and the helpers

from benchlib import cpu_seconds, fmt, format_table, machine_note, progress, run_lab_bench, temp_dir
from direct_helpers import add_site, cut_between
from netlab import Host, Lab, start_client, start_server, wait_for

SERVER_OVERLAY_IP = "10.1.1.1"


def iperf(client: Host, target: str, seconds: int) -> float:
    """One TCP stream for `seconds`; Mbit/s received."""
    done = client.run("iperf3", "-c", target, "-t", str(seconds), "-J", "--connect-timeout", "5000",
                      check=False, timeout=seconds + 60)  # fmt: skip
    report = json.loads(done.stdout)
    return report["end"]["sum_received"]["bits_per_second"] / 1e6


def ping_ms(host: Host, target: str) -> float:
    done = host.run("ping", "-n", "-q", "-c", "20", "-i", "0.05", target, check=False, timeout=30)
    found = re.search(r"= [\d.]+/([\d.]+)/", done.stdout)
    return float(found.group(1)) if found else float("nan")


def path_of(host: Host, work_dir: Path, peer: str) -> str:
    done = host.nc("status", "--work-dir", str(work_dir), "-o", "json", check=False)
    peers = json.loads(done.stdout or "{}").get("peers", [])
    return next((p["path"] for p in peers if p["ip"] == peer), "")


def measured(server_pid: int, work: Callable[[], float]) -> tuple[float, float]:
    """(result of work(), the server's CPU seconds meanwhile)."""
    before = cpu_seconds(server_pid)
    result = work()
    return result, cpu_seconds(server_pid) - before


def run_bench(seconds: int, repeat: int) -> int:
    rows = []
    with temp_dir("nc-bench-direct-") as work:
        lab = Lab(work / "lab")
        try:
            server_host = lab.add_host("server")
            server = start_server(server_host, keepalive=5)
            server_pid = server.process.pid  # `ip netns exec` execs ./nc in place (its comm is "nc")
            join = server.join_string()
            site1, site2 = add_site(lab, 1), add_site(lab, 2)
            first, second = start_client(site1, join), start_client(site2, join)
            ip2 = second.overlay_ip()
            for host in (server_host, site2):
                host.spawn("iperf3", "-s", name=f"iperf3-{host.name}")
            direct = lambda: path_of(site1, first.work_dir, ip2)  # noqa: E731
            wait_for(lambda: direct() == "direct", timeout=60, what="the direct path")
            rounds = []
            for index in range(1, repeat + 1):  # interleaved: a shared host's noise hits both alike
                progress(f"round {index}/{repeat}: node -> server, then node -> node direct")
                mbit = iperf(site1, SERVER_OVERLAY_IP, seconds)
                rounds.append((mbit, *measured(server_pid, lambda: iperf(site1, ip2, seconds))))
                progress(f"  {mbit:,.0f} and {rounds[-1][1]:,.0f} Mbit/s")
            to_server, direct_mbit, direct_cpu = (statistics.median(column) for column in zip(*rounds))
            direct_rtt = ping_ms(site1, ip2)
            cut_between(lab.hosts["router1"], lab.hosts["router2"])
            wait_for(lambda: direct() == "relayed", timeout=30, what="the fallback to the server")
            progress("node -> node, relayed")
            relayed_mbit, relayed_cpu = measured(server_pid, lambda: iperf(site1, ip2, seconds))
            relayed_rtt = ping_ms(site1, ip2)
        finally:
            lab.close()
    rows.append(["node -> server", fmt(to_server), "", "", ""])
    rows.append(["node -> node, direct", fmt(direct_mbit), fmt(direct_rtt, 3), fmt(direct_cpu, 2),
                 f"{direct_mbit / to_server:.2f}x node -> server (target >= 0.9)"])  # fmt: skip
    rows.append(["node -> node, relayed", fmt(relayed_mbit), fmt(relayed_rtt, 3), fmt(relayed_cpu, 2),
                 f"server CPU direct / relayed {100 * direct_cpu / max(relayed_cpu, 1e-9):.1f} % (target <= 5)"])  # fmt: skip
    headers = ["path", "Mbit/s", "ping ms", "server CPU s", "ratio"]
    title = f"nc direct paths, two sites behind NATs, iperf3 {seconds} s, one stream, median of {repeat} rounds"
    print(format_table(headers, rows, title))
    print(machine_note())
    return 0


def run() -> int:
    parser = argparse.ArgumentParser(prog="tests/bench.sh direct")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds of node -> server and direct")
    args = parser.parse_args()
    return run_bench(args.seconds, args.repeat)


if __name__ == "__main__":
    sys.exit(run_lab_bench("bench_direct", run))
