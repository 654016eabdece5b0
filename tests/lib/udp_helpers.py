"""A scripted node for the UDP data path's security tests: it holds real node
certificates, agrees datagram keys with a real server through ncctl's own wire code,
then sends genuine, replayed, reordered, truncated, forged and cross-session datagrams
from several sockets and addresses, and reports which of its pings were answered, and
where. It runs inside a lab namespace with the build's Python."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from netlab import SCRIPTS, Host, Process

REPO = Path(__file__).resolve().parents[2]


def spawn_udp_node(host: Host, server_ip: str, **plan: object) -> Process:
    script = SCRIPTS / "udp_node.py"
    return host.spawn(sys.executable, str(script), str(REPO), server_ip, json.dumps(plan), name="udp-node")


def udp_node_result(process: Process) -> dict:
    lines = [line for line in process.log().splitlines() if line.startswith("{")]
    assert lines, f"the UDP node reported nothing; log:\n{process.log()}"
    return json.loads(lines[-1])
