"""Floods: a real `nc server` while one address holds idle connections on all three ports.

The attacker namespace keeps --connections (default 1000) connections open to each of
6439, 6440 and 6441 (reopening whatever the server sheds; see tests/lib/flood_helpers.py).
Meanwhile a new node joins (bootstrap gRPC, then the data plane) and a known node
reconnects (data plane only); both are timed from process start to the overlay address
on nc0, and compared with the same on the quiet server. Server RSS is sampled before,
during (peak) and after the flood. Prints one table on stdout; progress goes to stderr.

    tests/bench.sh floods [--connections 1000] [--mode idle|half-open] [--repeat 3] [--rate 500]

Targets: connect <= 2 s under the flood, RSS growth <= 100 MB, and RSS back
within 20 MB of its start after the flood ends.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))  # netlab and the helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchlib import (
    MIB,
    fmt,
    format_table,
    machine_note,
    median,
    open_fds,
    progress,
    python_pid,
    ratio,
    rss_mib,
    run_lab_bench,
    temp_dir,
)
from flood_helpers import start_flood
from netlab import Host, Lab, NcClient, NcServer, start_client, start_server, wait_for

PORTS = (6439, 6440, 6441)
SETTLE_S = 60.0  # how long the RSS may take to come back after the flood


class Sampler(threading.Thread):
    """The server's peak RSS and open fds while it runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="sampler", daemon=True)
        self.pid = pid
        self.peak_rss = 0.0
        self.peak_fds = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.peak_rss = max(self.peak_rss, rss_mib(self.pid))
            self.peak_fds = max(self.peak_fds, open_fds(self.pid))


def time_join(lab: Lab, join: str, name: str) -> tuple[float, NcClient]:
    """Seconds from `nc client --join` to an overlay address on nc0."""
    host = lab.add_host(name)
    started = time.monotonic()
    client = start_client(host, join, wait=False)
    wait_for(client.overlay_ip, timeout=60, interval=0.02, what=f"{name} to join and connect")
    return time.monotonic() - started, client


def time_reconnect(client: NcClient) -> float:
    """Seconds from `nc client --config` (saved credentials) to an overlay address."""
    client.process.stop()
    wait_for(lambda: client.overlay_ip() is None, timeout=15, what="nc0 to go away")
    started = time.monotonic()
    client.restart()
    wait_for(client.overlay_ip, timeout=60, interval=0.02, what="the node to reconnect")
    return time.monotonic() - started


def connect_times(lab: Lab, server: NcServer, known: NcClient, label: str, repeat: int) -> tuple[float, float]:
    joins, reconnects = [], []
    for i in range(repeat):
        seconds, client = time_join(lab, server.join_string(), f"{label}{i}")
        joins.append(seconds)
        client.process.stop()
        reconnects.append(time_reconnect(known))
    progress(f"{label}: join {[round(s, 2) for s in joins]} s, reconnect {[round(s, 2) for s in reconnects]} s")
    return median(joins) or 0.0, median(reconnects) or 0.0


def run(args: argparse.Namespace) -> int:
    with temp_dir("nc-bench-floods-") as work:
        lab = Lab(work / "lab")
        try:
            return measure(lab, args)
        finally:
            lab.close()


def measure(lab: Lab, args: argparse.Namespace) -> int:
    server_host: Host = lab.add_host("server")
    server = start_server(server_host)
    pid = python_pid(server.process.pid)
    known = start_client(lab.add_host("known"), server.join_string())
    progress("quiet server: timing joins and reconnects")
    quiet_join, quiet_reconnect = connect_times(lab, server, known, "quiet", args.repeat)
    time.sleep(2.0)
    start_rss = rss_mib(pid)

    progress(f"flood: {args.connections} {args.mode} connections on each of {PORTS}")
    sampler = Sampler(pid)
    sampler.start()
    attacker = lab.add_host("attacker")
    flood = start_flood(attacker, server_host.ip, PORTS, args.connections, args.mode, rate=args.rate)
    time.sleep(3.0)  # let it settle into what the server allows
    held_line = flood.log().strip().splitlines()[-1].split()
    flood_join, flood_reconnect = connect_times(lab, server, known, "flooded", args.repeat)
    healthy = server.healthy()
    flood.stop()
    sampler.done.set()
    sampler.join()

    progress("flood over: waiting for the server's memory to come back")
    settled_after = None
    began = time.monotonic()
    after_rss = rss_mib(pid)
    while time.monotonic() - began < SETTLE_S:
        time.sleep(1.0)
        after_rss = rss_mib(pid)
        if (after_rss - start_rss) * MIB / 1e6 <= 20:
            settled_after = time.monotonic() - began
            break

    growth = sampler.peak_rss - start_rss
    held = dict(zip((str(p) for p in PORTS), held_line[2:]))
    rows = [
        ["new node: join + connect (s)", fmt(quiet_join, 2), fmt(flood_join, 2), ratio(flood_join, quiet_join), "<= 2"],
        [
            "known node: reconnect (s)",
            fmt(quiet_reconnect, 2),
            fmt(flood_reconnect, 2),
            ratio(flood_reconnect, quiet_reconnect),
            "<= 2",
        ],
        ["server RSS (MiB)", fmt(start_rss), fmt(sampler.peak_rss) + " peak", "", ""],
        ["RSS growth under the flood (MB)", "", fmt(growth * MIB / 1e6), "", "<= 100"],
        [
            "RSS after the flood, over start (MB)",
            "",
            fmt((after_rss - start_rss) * MIB / 1e6),
            "",
            "<= 20",
        ],
        ["seconds until back within 20 MB", "", fmt(settled_after, 0) if settled_after is not None else "> 60", "", ""],
        ["server open fds (peak)", "", str(sampler.peak_fds), "", ""],
        ["flood connections held, 6439/6440/6441", "", "/".join(held.values()), "", ""],
        ["nc adm health during the flood", "", "ok" if healthy else "FAILED", "", ""],
    ]
    print(
        format_table(
            ["figure", "no flood", f"{args.connections} {args.mode}/port", "ratio", "target"],
            rows,
            title=f"nc server under a one-address connection flood (reopening at up to {args.rate:.0f}/s; "
            f"median of {args.repeat}); {machine_note()}",
        )
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="held per port (default 1000)")
    parser.add_argument("--mode", choices=["idle", "half-open"], default="idle")
    parser.add_argument("--repeat", type=int, default=3, help="joins and reconnects timed per phase (default 3)")
    parser.add_argument(
        "--rate",
        type=float,
        default=500.0,
        help="connects per second the flood may make to replace what the server sheds (default 500); "
        "the attacker shares this machine's CPUs, so a faster churn measures the attacker's load as much as nc",
    )
    args = parser.parse_args()
    return run_lab_bench("bench_floods", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
