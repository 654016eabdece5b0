"""How fast nc's data path falls back to TLS/TCP and returns to UDP.

One server and one node on one bridge; iptables in the node's own namespace drops its
UDP to the server's data port. Measures: with UDP blocked before the join, the time
from starting the client to the first answered ping over the overlay; with UDP blocked
mid-session, the gap in replies of a ping every 50 ms; after unblocking, the time until
the node is back on UDP. The targets: 5 s, 5 s and a minute. Prints one table.

    tests/bench.sh fallback
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))  # netlab and the helpers

from benchlib import format_table, progress, run_lab_bench, temp_dir
from netlab import Host, Lab, start_client, start_server, wait_for

SERVER_OVERLAY_IP = "10.1.1.1"


def udp_blocked(host: Host, blocked: bool) -> None:
    action = "-A" if blocked else "-D"
    host.run("iptables", "-w", action, "OUTPUT", "-p", "udp", "--dport", "6441", "-j", "DROP")


def run() -> int:
    rows = []
    with temp_dir("nc-bench-fallback-") as work:
        lab = Lab(work / "lab")
        try:
            server_host, node = lab.add_host("server"), lab.add_host("node1")
            server = start_server(server_host, ip=server_host.ip, networkAddr=f"{SERVER_OVERLAY_IP}/24")
            udp_blocked(node, True)
            started = time.monotonic()
            client = start_client(node, server.join_string(), wait=False)
            wait_for(lambda: node.ping(SERVER_OVERLAY_IP, timeout=1), timeout=30, interval=0.05, what="the overlay")
            up = time.monotonic() - started
            rows.append(["UDP blocked before the join: client start to first answered ping", f"{up:.2f} s", "5 s"])
            progress(f"up on TLS/TCP after {up:.2f} s")
            udp_blocked(node, False)
            wait_for(lambda: "data path: UDP" in client.process.log(), timeout=90, what="UDP")
            time.sleep(2)
            pinger = node.spawn("ping", "-n", "-D", "-i", "0.05", "-W", "1", SERVER_OVERLAY_IP, name="pinger")
            time.sleep(2)
            address = node.ipv4_address("nc0")
            blocked_at = time.time()
            udp_blocked(node, True)
            wait_for(lambda: "data moves to TLS/TCP" in client.process.log(), timeout=30, what="the switch to TCP")
            time.sleep(3)
            unblocked_at = time.time()
            udp_blocked(node, False)
            wait_for(
                lambda: len(re.findall("data path: UDP", client.process.log())) >= 2, timeout=120, what="UDP again"
            )
            back = time.time() - unblocked_at
            pinger.stop()
            replies = [float(t) for t in re.findall(r"^\[(\d+\.\d+)\]", pinger.log(), re.M)]
            resumed = min((t for t in replies if t > blocked_at), default=float("nan")) - blocked_at
            rows.append(["UDP blocked mid-session: block to the next ping reply", f"{resumed:.2f} s", "5 s"])
            rows.append(["UDP unblocked: back on UDP after", f"{back:.1f} s", "60 s"])
            rows.append(["overlay IP kept", "yes" if node.ipv4_address("nc0") == address else "NO", "yes"])
        finally:
            lab.close()
    print(format_table(["what", "nc", "target"], rows, "nc fallback between UDP and TLS/TCP (ping every 50 ms)"))
    return 0


if __name__ == "__main__":
    sys.exit(run_lab_bench("bench_fallback", run))
