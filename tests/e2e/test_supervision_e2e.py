"""Fail whole, never half: a real server (ncctl.py from source, run in a lab namespace)
with one fault injected into one long-lived part. When that part dies the server logs one
line naming it and exits non-zero; when the packet loop stalls, `nc adm health` (through
the real ./nc) reports the server unhealthy. A fault fires only once a trigger file
exists, so the server first starts and answers health checks as usual."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from netlab import SCRIPTS, Host, Lab, NcServer, Process, wait_for
from overlay_helpers import wait_exit

REPO = Path(__file__).resolve().parents[2]


# fault -> the part the one log line must name
FAULTS = {
    "network-loop": "thread network-server",
    "store-worker": "thread store-worker",
    "cache-sync": "thread cache-sync",
    "token-sweeper": "thread token-sweeper",
    "grpc-bootstrap": "gRPC bootstrap server",
}


def start_faulty_server(host: Host, fault: str) -> tuple[NcServer, Path]:
    """The server from source with `fault` armed by the returned trigger path; waits until healthy."""
    lab = host.lab
    work_dir, config = lab.dir / "server-work", lab.dir / "server.yml"
    config.write_text(json.dumps({"mode": "server", "server": {"workDir": str(work_dir)}}))
    script, trigger = SCRIPTS / "faulty_server.py", lab.dir / "trigger"
    process = host.spawn(sys.executable, str(script), str(REPO), fault, str(trigger), str(config), name="server")
    server = NcServer(host, process, config, work_dir)
    try:
        wait_for(server.healthy, timeout=30, what="the server to become healthy")
    except AssertionError:
        raise AssertionError(f"server did not start; log:\n{process.log()}") from None
    return server, trigger


def lines_naming(process: Process, text: str) -> list[str]:
    return [line for line in process.log().splitlines() if text in line]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_part_that_dies_ends_the_server_with_one_line(lab: Lab, fault: str) -> None:
    server, trigger = start_faulty_server(lab.add_host("server"), fault)
    trigger.touch()
    code = wait_exit(server.process, timeout=30)
    log = server.process.log()
    assert code != 0, f"the server exited 0 after its {FAULTS[fault]} died:\n{log[-3000:]}"
    named = lines_naming(server.process, "stopped unexpectedly")
    assert len(named) == 1, f"expected one line about the dead part:\n{log[-3000:]}"
    assert FAULTS[fault] in named[0]
    if fault != "grpc-bootstrap":
        assert "injected fault" in named[0], "the line names the cause"
        assert len(lines_naming(server.process, "injected fault")) == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_a_stalled_packet_loop_makes_health_fail(lab: Lab) -> None:
    """The loop thread is alive but stuck: HealthCheck must not report the server healthy."""
    server, trigger = start_faulty_server(lab.add_host("server"), "stall")
    assert server.healthy()
    trigger.touch()
    wait_for(lambda: not server.healthy(), timeout=30, interval=0.5, what="health to report the stalled data plane")
    done = server.adm("health", "-o", "json", check=False)
    assert done.returncode != 0
    assert json.loads(done.stdout)["healthy"] is False, done.stdout
    assert server.process.alive(), "a stall is for health checks (and a service manager) to act on"


def test_a_failing_command_costs_only_itself(lab: Lab) -> None:
    """A command that raises in the packet loop is logged and skipped: the loop, and the
    server, go on, and health stays good."""
    server, trigger = start_faulty_server(lab.add_host("server"), "failing-command")
    trigger.touch()
    server.process.wait_for_output("network command failed", timeout=30, what="the failed command's log line")
    assert server.healthy()
    assert server.process.alive()
    assert not lines_naming(server.process, "stopped unexpectedly")
    assert server.process.stop() == 0, server.process.log()[-3000:]
