"""Hostile nodes for end-to-end tests and benchmarks. One is a raw TLS client that holds a real
node certificate, speaks the frame protocol by hand, announces the gso capability, and
then sends what no real node sends (garbage, GSO bombs, checksum-offset spoofs); the
other floods control frames (REKEY, TRANSPORT) with ncctl's own wire code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from netlab import SCRIPTS, Host, Process

NETWORK_PORT = 6441
SPOOF_PORT = 7777  # UDP port the spoofed and the genuine test datagrams go to


def spawn_hostile_node(host: Host, server_ip: str, cert_dir: Path, token: str, **plan: object) -> Process:
    """The hostile node in host's namespace (background); its log ends with one JSON line."""
    script = SCRIPTS / "hostile_node.py"
    return host.spawn(sys.executable, str(script), server_ip, str(cert_dir), token, json.dumps(plan), name="hostile")


def hostile_result(process: Process) -> list[dict]:
    """The rounds the hostile node reported (it prints them last, as one JSON line)."""
    lines = [line for line in process.log().splitlines() if line.startswith("[")]
    assert lines, f"the hostile node printed no result:\n{process.log()[-3000:]}"
    return json.loads(lines[-1])


def spawn_control_flood(host: Host, server_ip: str, cert_dir: Path, token: str, **plan: object) -> Process:
    """A node flooding REKEY or TRANSPORT frames over its TLS session (plan: kind, seconds,
    rounds), in host's namespace with the test interpreter; its log ends with one JSON line."""
    script = SCRIPTS / "control_flood.py"
    repo = str(Path(__file__).resolve().parents[2])
    return host.spawn(
        sys.executable, str(script), repo, server_ip, str(cert_dir), token, json.dumps(plan), name="flood"
    )
