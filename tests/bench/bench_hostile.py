"""Other nodes' latency while one node floods the server with malicious GSO frames.

One lab: a server and three nodes. node1's certificate goes to a raw TLS client that
announces gso and sends malicious GSO frames as fast as TLS takes them (GSO bombs with
gso_size 1, checksum-offset spoofs over the IP source, random virtio headers), reconnecting
each time the server cuts it off. node2 pings node3, which runs without offload (so a
bomb addressed to it is what the server would have to segment in software). Prints the
ping p50/p99 between node2 and node3 without and with the flood, and their ratio; the
target is p99 with the flood at most 2x the unloaded value.

    .build/venv/bin/python tests/bench/bench_hostile.py [--pings 1000] [--interval 0.01]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))  # netlab and the helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # ncctl, for overlay_helpers

from benchlib import (
    BenchError,
    cpu_seconds,
    fmt,
    format_table,
    machine_note,
    percentile,
    progress,
    python_pid,
    ratio,
    run_lab_bench,
    temp_dir,
)
from hostile_helpers import hostile_result, spawn_hostile_node
from netlab import Host, NcClient, lab
from overlay_helpers import build_overlay, stop_client, wait_connected, wait_exit


def ping_rtts(host: Host, target: str, count: int, interval: float) -> tuple[list[float], int]:
    """RTTs in ms of `count` echo requests `interval` apart, and how many were sent."""
    host.run("ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", target, check=False, timeout=15)  # warm-up
    done = host.run(
        "ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", target, check=False, timeout=count + 60
    )
    samples = [float(t) for t in re.findall(r"time=([\d.]+) ms", done.stdout)]
    if "transmitted" not in done.stdout:
        raise BenchError(f"ping {target} from {host.name} failed:\n{done.stdout}{done.stderr}")
    return samples, count  # no samples at all: every ping lost, which the table shows as such


def pct(samples: list[float], fraction: float) -> float | None:
    return percentile(samples, fraction) if samples else None


def without_offload(client: NcClient) -> None:
    stop_client(client)
    client.config.write_text(client.config.read_text().replace("offload: true", "offload: false"))
    client.restart()


def run(args: argparse.Namespace) -> int:
    with temp_dir("nc-bench-hostile-") as work, lab(work / "lab") as the_lab:
        progress("lab: server and three nodes")
        overlay = build_overlay(the_lab, 3, keepalive=2)
        hostile, pinger, target = overlay.clients
        stop_client(hostile)
        without_offload(target)
        target_ip = wait_connected(overlay.server, target)
        server_pid = python_pid(overlay.server.process.pid)
        ping_s = args.pings * args.interval

        progress(f"unloaded: {args.pings} pings node2 -> node3, {args.interval} s apart")
        quiet, quiet_sent = ping_rtts(pinger.host, target_ip, args.pings, args.interval)

        progress("flood: node1 sends malicious GSO frames as fast as it can")
        cpu_before = cpu_seconds(server_pid)
        attacker = spawn_hostile_node(
            hostile.host,
            overlay.server_host.ip,
            hostile.work_dir / "tls" / "network",
            hostile.token(),
            victim=target_ip,
            gso_only=True,
            rounds=100_000,
            total_s=ping_s + 8,
        )
        time.sleep(1.0)  # the flood under way before the first ping
        loaded, loaded_sent = ping_rtts(pinger.host, target_ip, args.pings, args.interval)
        wait_exit(attacker, timeout=ping_s + 60)
        cpu_used = cpu_seconds(server_pid) - cpu_before
        rounds = hostile_result(attacker)
        if not overlay.server.process.alive():
            raise BenchError(f"the server died under the flood:\n{overlay.server.process.log()[-2000:]}")

    sent_frames = sum(r.get("sent", 0) for r in rounds)
    closed = sum(1 for r in rounds if r.get("closed"))
    rows = []
    for name, fraction in (("p50", 0.50), ("p99", 0.99)):
        a, b = pct(quiet, fraction), pct(loaded, fraction)
        rows.append([f"ping node2 -> node3 {name} (ms)", fmt(a, 3), fmt(b, 3), ratio(b, a)])
    mean = [fmt(statistics.mean(s), 3) if s else "-" for s in (quiet, loaded)]
    rows.append(["ping mean (ms)", *mean, ""])
    rows.append(["pings answered", f"{len(quiet)}/{quiet_sent}", f"{len(loaded)}/{loaded_sent}", ""])
    print(
        format_table(
            ["", "unloaded", "GSO flood", "flood / unloaded"],
            rows,
            title=f"nc {args.pings} pings {args.interval} s apart; {machine_note()}",
        )
    )
    print(
        f"flood: {sent_frames:,} malicious frames in {len(rounds)} session(s), {closed} cut off by the server; "
        f"server CPU {cpu_used:.1f} s over about {ping_s + 8:.0f} s"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pings", type=int, default=1000, help="echo requests per measurement (default 1000)")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between them (default 0.01)")
    args = parser.parse_args()
    return run_lab_bench("bench_hostile", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
