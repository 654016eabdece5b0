"""The server's file descriptors near their limit (lowered with prlimit on its PID):
new data-plane connections are refused at once (a reset, not a wait in the backlog)
and a reserve stays free, so `nc adm health` still answers; with none left at all, a
spare descriptor still lets the listener refuse at once; the gRPC ports (joins) refuse
at once too, past their own smaller reserve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from netlab import SCRIPTS, Lab, start_server, wait_for

RESERVE = 64  # FD_RESERVE_DATA in ncctl.py
GRPC_RESERVE = 16  # FD_RESERVE_GRPC


def soft_limit(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max open files"))
    return int(line.split()[3])


def set_soft_limit(pid: int, soft: int) -> None:
    """RLIMIT_NOFILE of a running process, its hard limit kept (raising it again needs more)."""
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:"], check=True)


def test_out_of_descriptors_refuses_at_once_and_admin_still_answers(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    pid = server.process.popen.pid
    assert Path(f"/proc/{pid}/comm").read_text().strip() != "ip"  # ip netns exec runs nc in its place
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    original = soft_limit(pid)
    set_soft_limit(pid, in_use + RESERVE + 10)

    probe = lab.add_host("probe").spawn(sys.executable, str(SCRIPTS / "fd_probe.py"), server.host.ip, "6441", "30")
    probe.wait_for_output('"refused"', timeout=30, what="the probe's counts")
    health = server.adm("health", "-o", "json", check=False)  # while the probe holds its connections
    live = server.adm("health", "--live", check=False)
    listed = server.adm("node", "list", check=False)
    counts = json.loads(probe.log().splitlines()[0])
    assert counts["held"] >= 1 and counts["refused"] >= 10, counts
    report = json.loads(health.stdout)  # nc adm answers: the gRPC ports are fine (the data port may reset it)
    assert report["control"]["ok"] and report["bootstrap"]["ok"], report
    assert live.returncode == 0 and listed.returncode == 0, live.stdout + listed.stderr
    assert "out of file descriptors" in server.process.log()
    probe.popen.wait(timeout=30)

    # Not one descriptor left: the spare one still lets the listener refuse at once.
    wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) < in_use + 5, timeout=30, what="the held handshakes to expire")
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    set_soft_limit(pid, in_use)
    probe = lab.hosts["probe"].spawn(sys.executable, str(SCRIPTS / "fd_probe.py"), server.host.ip, "6441", "5")
    probe.wait_for_output('"refused"', timeout=30, what="the probe's counts")
    assert json.loads(probe.log().splitlines()[0]) == {"held": 0, "refused": 5}
    set_soft_limit(pid, original)
    assert server.healthy()


def test_a_grpc_port_out_of_descriptors_refuses_joins_at_once(lab: Lab) -> None:
    """The bootstrap port (joins) near the limit: a connection whose descriptor falls in
    the gRPC ports' reserve (16) is reset at once, not left waiting for a handshake."""
    server = start_server(lab.add_host("server"))
    pid = server.process.popen.pid
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    original = soft_limit(pid)
    set_soft_limit(pid, in_use + GRPC_RESERVE + 6)  # room for about two spliced connections (three each)

    probe = lab.add_host("probe").spawn(sys.executable, str(SCRIPTS / "fd_probe.py"), server.host.ip, "6439", "10")
    probe.wait_for_output('"refused"', timeout=30, what="the probe's counts")
    counts = json.loads(probe.log().splitlines()[0])
    assert counts["held"] >= 1 and counts["refused"] >= 5, counts
    assert "gRPC bootstrap port: out of file descriptors" in server.process.log()
    probe.popen.wait(timeout=30)
    set_soft_limit(pid, original)
    wait_for(server.healthy, timeout=30, what="the server to answer again")
