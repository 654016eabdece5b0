"""Control-frame floods against a real server: a node holding real certificates floods
REKEY frames (each would cost the packet loop an X25519 exchange, HKDF and two AEAD
objects) or TRANSPORT udp/tcp flips (each a log line) over its TLS session. Its
control-frame budget refuses it within a few dozen frames, and at its hello when it
comes back, while another pair of nodes keeps pinging through the server and the server's log
stays short."""

from __future__ import annotations

import threading

import pytest
from hostile_helpers import hostile_result, spawn_control_flood
from netlab import Lab
from overlay_helpers import (
    assert_reaches,
    build_overlay,
    percentile,
    ping_rtts,
    scrape,
    stop_client,
    value,
    wait_exit,
)

import ncctl


@pytest.mark.parametrize("kind", ["rekey", "transport"])
def test_a_control_frame_flood_is_refused_and_costs_the_others_nothing(lab: Lab, kind: str) -> None:
    overlay = build_overlay(lab, 3, keepalive=5)
    flooder, a, b = overlay.clients
    assert stop_client(flooder) == 0  # its certificate now belongs to the flooding script
    b_ip = b.overlay_ip()
    assert b_ip is not None
    assert_reaches(a.host, b_ip)
    server_log = overlay.server.process
    lines_before = len(server_log.log().splitlines())

    pings: dict[str, tuple[int, list[float]]] = {}
    pinger = threading.Thread(target=lambda: pings.update(run=ping_rtts(a.host, b_ip, 60, 0.05)))
    pinger.start()
    attacker = spawn_control_flood(
        flooder.host,
        overlay.server_host.ip,
        flooder.work_dir / "tls" / "network",
        flooder.token(),
        kind=kind,
        seconds=10,
        rounds=2,
    )
    assert wait_exit(attacker, timeout=60) == 0, attacker.log()[-3000:]
    pinger.join()
    rounds = hostile_result(attacker)
    assert rounds[0].get("refusal"), f"the flooding session was never refused: {rounds}"
    assert len(rounds) == 2, rounds
    first, again = rounds
    for session in (first, again):  # refused for good, in its first session and when it came back
        assert session.get("refusal"), f"the flooding session was never refused: {session}"
        assert session["refusal"]["code"] == "protocol" and not session["refusal"]["retry"], session
        assert "control frames" in session["refusal"]["reason"], session
    assert first["answers"] <= ncctl.CONTROL_FRAME_BURST, first  # REKEY answered only within the budget
    assert again.get("at_hello") and again["answers"] == 0, again  # the budget is the node's, not the session's
    sent, rtts = pings["run"]
    assert len(rtts) >= sent * 0.98, f"{len(rtts)}/{sent} pings between the other nodes answered"
    assert percentile(rtts, 0.99) <= 50, f"p99 {percentile(rtts, 0.99)} ms between the other nodes"
    logged = server_log.log().splitlines()[lines_before:]
    assert len(logged) <= 200, f"{len(logged)} server log lines for one flood:\n" + "\n".join(logged[-20:])
    samples = scrape(overlay.server_host)
    assert value(samples, "nc_refusals_total", reason="control-budget") >= 2
    assert overlay.server.healthy()
    assert_reaches(a.host, b_ip)
