"""A hostile node against a real server: one node's certificate in the hands of
a raw TLS client that announces the gso capability and sends garbage frames, GSO bombs
(gso_size 1) and checksum-offset spoofs (csum_start/csum_offset over the IP source),
while two real nodes keep pinging each other through the server. One of them runs
without offload, so the server would have to segment and checksum for it in software."""

from __future__ import annotations

import json
import re
import threading

from gso_frames import hostile_gso_frames
from hostile_helpers import SPOOF_PORT, hostile_result, spawn_hostile_node
from hypothesis import HealthCheck, Phase, given, settings
from netlab import Host, Lab, NcClient, Process
from overlay_helpers import (
    SERVER_OVERLAY_IP,
    Overlay,
    assert_full_mesh,
    assert_reaches,
    build_overlay,
    ping_counts,
    stop_client,
    wait_connected,
    wait_exit,
)

import ncctl

# Hello.decode keeps 32 characters of the version: enough for a line that looks like nc's own.
FORGED_VERSION = "1\nINFO node FORGEDFORGED joined"


def spawn_udp_capture(host: Host, device: str, name: str) -> Process:
    process = host.spawn("tcpdump", "-n", "-l", "--immediate-mode", "-i", device, f"udp port {SPOOF_PORT}", name=name)
    process.wait_for_output("listening on", timeout=10, what=f"tcpdump on {host.name} {device}")
    return process


def udp_sources(capture: Process) -> list[str]:
    return re.findall(rf"IP (\d+\.\d+\.\d+\.\d+)\.\d+ > [\d.]+\.{SPOOF_PORT}:", capture.log())


def hostile_sender_and_plain(overlay: Overlay) -> tuple[NcClient, NcClient, NcClient, str]:
    """The overlay's three nodes as the attack tests use them: the first's real client
    steps aside (its certificate now belongs to the raw hostile client), the third runs
    without offload (the plain packets a GSO frame must be cut into); the third's address."""
    hostile, sender, plain = overlay.clients
    assert stop_client(hostile) == 0
    stop_client(plain)
    plain.config.write_text(plain.config.read_text().replace("offload: true", "offload: false"))
    plain.restart()
    return hostile, sender, plain, wait_connected(overlay.server, plain)


def test_a_hostile_node_cannot_hurt_the_others(lab: Lab) -> None:
    overlay = build_overlay(lab, 3, keepalive=2, debug=True)
    hostile, sender, plain, plain_ip = hostile_sender_and_plain(overlay)
    assert_reaches(sender.host, plain_ip)
    at_plain = spawn_udp_capture(plain.host, "nc0", "udp-plain")
    at_server = spawn_udp_capture(overlay.server_host, "ncsrv0", "udp-server")

    attacker = spawn_hostile_node(
        hostile.host,
        overlay.server_host.ip,
        hostile.work_dir / "tls" / "network",
        hostile.token(),
        victim=plain_ip,
        version=FORGED_VERSION,
        pace=0.02,  # about 3 s of attack before the server hangs up, so the pings overlap it
    )
    pings: dict[str, tuple[int, int]] = {}
    pinger = threading.Thread(target=lambda: pings.update(run=ping_counts(sender.host, plain_ip, 30, 0.1)))
    pinger.start()
    assert wait_exit(attacker, timeout=60) == 0, attacker.log()[-3000:]
    pinger.join()
    (result,) = hostile_result(attacker)

    server_log = overlay.server.process.log()
    assert overlay.server.process.alive(), server_log[-3000:]
    assert overlay.server.healthy()
    assert "gso" in result["caps"], f"the server did not agree on gso: {result}"
    sent, answered = pings["run"]
    assert answered >= sent - 1, f"{answered}/{sent} pings between the real nodes during the attack"
    assert result["closed"], f"the server never closed the hostile session: {result}"
    assert result["refusal"] and result["refusal"]["code"] == "protocol", result
    assert "malformed frames" in result["refusal"]["reason"], result
    # No packet with a forged source reached the victim node or the server's kernel; the genuine ones did.
    for capture, who in ((at_plain, "the plain node"), (at_server, "the server")):
        capture.stop()
        sources = udp_sources(capture)
        assert sources, f"{who} saw not even the genuine datagram:\n{capture.log()}"
        assert set(sources) == {result["ip"]}, f"{who} got datagrams from forged sources {set(sources)}"
    # The newline in the hello's version did not start a line of its own in the server log.
    forged = [line for line in server_log.splitlines() if "FORGEDFORGED" in line]
    assert forged, "the hello was not logged at all (debug is on)"
    assert all("hello from" in line for line in forged), f"a forged log line:\n{forged}"
    assert "Traceback" not in server_log
    # Afterwards the overlay is whole: the hostile node's own client comes back and everyone meets.
    hostile.restart()
    wait_connected(overlay.server, hostile)
    assert_full_mesh(overlay)
    assert_reaches(plain.host, SERVER_OVERLAY_IP)


def fuzzer_frames(count: int) -> list[tuple[int, str]]:
    """[kind, hex] of GSO frames from the wire fuzzer's strategy (every field at and around
    its bounds, truncations, odd protocols), every third also sent bare as a PACKET frame."""
    made: list[tuple[int, str]] = []

    @given(payload=hostile_gso_frames())
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def collect(payload: bytes) -> None:
        made.append((ncctl.FRAME_GSO_PACKET, payload.hex()))
        if len(made) % 3 == 0:
            made.append((ncctl.FRAME_PACKET, payload[ncctl.VNET_HDR_LEN :].hex()))

    collect()
    return made


def test_fuzzed_frames_through_a_real_server(lab: Lab) -> None:
    """Hundreds of frames from the wire fuzzer, sent by a node with the gso capability and
    addressed to a node without offload, to the server, to another node and out of the
    overlay: the server stays up and healthy, the real nodes keep pinging each other, and
    the server logs no traceback."""
    overlay = build_overlay(lab, 3, keepalive=2)
    hostile, sender, _plain, plain_ip = hostile_sender_and_plain(overlay)
    frames = fuzzer_frames(600)
    fuzz_file = lab.dir / "fuzzed-frames.json"
    fuzz_file.write_text(json.dumps(frames))
    attacker = spawn_hostile_node(
        hostile.host,
        overlay.server_host.ip,
        hostile.work_dir / "tls" / "network",
        hostile.token(),
        victim=plain_ip,
        targets=[sender.overlay_ip(), "192.0.2.1"],
        fuzz_file=str(fuzz_file),
        rounds=1000,
        pace=0.002,
    )
    pings: dict[str, tuple[int, int]] = {}
    pinger = threading.Thread(target=lambda: pings.update(run=ping_counts(sender.host, plain_ip, 30, 0.1)))
    pinger.start()
    assert wait_exit(attacker, timeout=120) == 0, attacker.log()[-3000:]
    pinger.join()
    rounds = hostile_result(attacker)
    assert rounds[-1].get("exhausted"), f"the fuzzer's frames were not all sent: {rounds[-3:]}"
    assert sum(r.get("sent", 0) for r in rounds) >= len(frames) - len(rounds), rounds[-3:]
    server_log = overlay.server.process.log()
    assert overlay.server.process.alive(), server_log[-3000:]
    assert overlay.server.healthy()
    assert "Traceback" not in server_log, server_log[-3000:]
    sent, answered = pings["run"]
    assert answered >= sent - 1, f"{answered}/{sent} pings between the real nodes during the fuzzing"
    hostile.restart()
    wait_connected(overlay.server, hostile)
    assert_full_mesh(overlay)
