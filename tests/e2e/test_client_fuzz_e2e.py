"""A node facing a hostile or broken network server. The real server of a working overlay
is swapped for a fake one that holds the real server certificate and answers every node's
hello with its own case: garbage, bad frames, bad welcomes or silence. Each client must say
what went wrong, keep retrying without a traceback, keep its path to the server intact, and
be back on the overlay, with the routes it had, once the real server returns.

One node per case, all against the same fake server at once (it tells them apart by their
underlay address): the cases wait on client timeouts and backoff, so in turn they would take
minutes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import netlab
import pytest
from netlab import NcClient, Process, wait_for
from overlay_helpers import NETWORK_PORT, SERVER_OVERLAY_IP, Overlay, assert_reaches, build_overlay, wait_connected

# case -> what its client must log about the bad server
CASES = {
    "random-bytes": "cannot connect to",
    "oversized-length": "declares 16777215 bytes, over the limit",
    "truncated-frame": "server closed the connection during the handshake",
    "invalid-json": "handshake message is not JSON",
    "wrong-types": "welcome message is incomplete or has fields of the wrong type",
    "out-of-range": "welcome message has out-of-range values",
    "error-frame-wrong-types": "server refused the session",  # "retry": "false" is not false: retry
    "nonsense-welcome": "welcome message gives the unusable address 0.0.0.0/8",
    "close-after-handshake": "server closed the connection during the handshake",
    "stall-after-hello": "no welcome from the server within 10 s",
    "keepalives-instead-of-welcome": "no welcome from the server within 10 s",
    "silent-after-welcome": "server silent for 3 s",
    "garbage-after-welcome": "disconnected: protocol error",
    "oversized-after-welcome": "protocol error: frame type 0x10 declares 16777215 bytes, over the limit",
    "oversized-with-welcome": "protocol error: frame type 0x10 declares 16777215 bytes, over the limit",
    # With a new overlay address, so the client applies the routes (it does only when the address changes).
    "duplicate-route": "routing 192.0.2.0/24 into the tunnel",
    "route-over-server": "the welcome routes 198.18.0.1/32, the server's own address, into the tunnel",
    "subnet-over-server": "the welcome routes 198.18.0.0/24, the server's own address, into the tunnel",
    "server-outside-subnet": "names 10.9.9.9 as the server, which is not another host of 10.1.1.0/24",
}


@dataclasses.dataclass
class Encounter:
    """One node's time with the fake server."""

    client: NcClient
    overlay_ip: str
    routes_before: list[dict]
    log: str = ""  # what the client logged while the fake server answered
    fake_log: list[str] = dataclasses.field(default_factory=list)  # the fake server's lines about this node
    route_to_server: str = ""  # the device of the node's route to the server's underlay address, afterwards
    watched_s: float = 0.0  # how long the fake server was up

    @property
    def connections(self) -> int:
        return sum(line.endswith(": TLS up") for line in self.fake_log)

    def story(self) -> str:
        return "fake server:\n" + "\n".join(self.fake_log[-20:]) + "\nclient:\n" + self.log[-3000:]


@dataclasses.dataclass
class HostileRun:
    overlay: Overlay
    encounters: dict[str, Encounter]


def route_device(client: NcClient, ip: str) -> str:
    found = json.loads(client.host.run("ip", "-j", "route", "get", ip).stdout)
    return found[0].get("dev", "") if found else ""


def start_fake_server(overlay: Overlay, nodes: dict[str, list[str]]) -> Process:
    """The fake server in the server's namespace, on the real server's address and port;
    nodes maps each node's underlay address to [case, overlay address]."""
    host = overlay.server_host
    tls = overlay.server.work_dir / "tls" / "network"
    fake = host.spawn(
        "python3",
        str(netlab.SCRIPTS / "fake_server.py"),
        host.ip,
        str(NETWORK_PORT),
        str(tls / "server.crt"),
        str(tls / "server.key"),
        json.dumps(nodes),
        name="fake-server",
    )
    fake.wait_for_output("listening", timeout=10, what="the fake server to listen")
    return fake


def face_fake_server(overlay: Overlay, encounters: dict[str, Encounter]) -> None:
    """Stop the real server, let every node meet the fake one until the nodes reconnected (or
    their clients died, or time ran out), record what happened, then bring the real server back."""
    by_ip = {e.client.host.ip: e for e in encounters.values()}
    assert overlay.server.process.stop() == 0, overlay.server.process.log()[-3000:]
    log_start = {ip: len(e.client.process.log()) for ip, e in by_ip.items()}
    fake = start_fake_server(overlay, {e.client.host.ip: [case, e.overlay_ip] for case, e in encounters.items()})
    started = time.monotonic()

    def settled() -> bool:
        lines = fake.log().splitlines()
        for ip, encounter in by_ip.items():
            encounter.fake_log = [line for line in lines if line.startswith(f"{ip} ")]
        return all(e.connections >= 2 or not e.client.process.alive() for e in encounters.values())

    # The slowest cases, stall-after-hello and keepalives-instead-of-welcome, take the 10 s
    # handshake deadline plus up to 1 + 2 + 4 s of backoff.
    with contextlib.suppress(AssertionError):  # a node that did not settle fails its own test
        wait_for(settled, timeout=40, interval=0.2, what="the nodes to reconnect to the fake server")
    settled()
    watched_s = time.monotonic() - started
    for ip, encounter in by_ip.items():
        encounter.log = encounter.client.process.log()[log_start[ip] :]
        encounter.route_to_server = route_device(encounter.client, overlay.server_host.ip)
        encounter.watched_s = watched_s
    fake.stop()
    overlay.server.start()


@pytest.fixture(scope="module")
def hostile_run(nc_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileRun]:
    """An overlay with one node per case (named after it), after its time with the fake server."""
    with netlab.lab(tmp_path_factory.mktemp("client-fuzz") / "lab") as lab:
        overlay = build_overlay(lab, 0, keepalive=1)
        clients = {case: overlay.add_node(case, wait=False) for case in CASES}  # joining in parallel saves time
        encounters = {}
        for case, client in clients.items():
            wait_for(client.config.exists, timeout=30, what=f"the {case} node to join")
            overlay_ip = wait_connected(overlay.server, client, timeout=30)
            encounters[case] = Encounter(client, overlay_ip, client.host.ipv4_routes())
        face_fake_server(overlay, encounters)
        yield HostileRun(overlay, encounters)


@pytest.mark.parametrize("case", CASES)
def test_client_survives_a_hostile_server(hostile_run: HostileRun, case: str) -> None:
    """The fake server answered this node with `case`: its client said why, reconnected, printed
    no traceback and kept its route to the server; with the real server back it is connected
    with its old address and routes, and reaches the server over the overlay."""
    encounter = hostile_run.encounters[case]
    client = encounter.client
    assert client.process.alive(), f"the client exited ({client.process.popen.returncode}):\n{encounter.story()}"
    assert "Traceback" not in encounter.log, encounter.story()
    assert encounter.route_to_server == "eth0", (
        f"the route to the server goes via {encounter.route_to_server}:\n{client.host.ipv4_routes()}\n{encounter.story()}"
    )
    assert encounter.connections >= 2, f"no reconnect in {encounter.watched_s:.0f} s:\n{encounter.story()}"
    assert CASES[case] in encounter.log, f"the client did not say what went wrong:\n{encounter.story()}"
    assert wait_connected(hostile_run.overlay.server, client, timeout=40) == encounter.overlay_ip
    assert client.host.ipv4_routes() == encounter.routes_before, "routes the fake server gave stayed behind"
    assert_reaches(client.host, SERVER_OVERLAY_IP)
    assert client.process.alive()
    assert "Traceback" not in client.process.log()
