"""Floods against a real server (bounded resources): idle and half-open
connections on all three ports from one address while a new node joins and connects,
and sessions that stop reading while traffic is sent to them."""

from __future__ import annotations

import pytest
from flood_helpers import held, start_flood, welcomed_ips
from netlab import SCRIPTS, UNDERLAY6_PREFIX, Lab, start_client, start_server, wait_for
from overlay_helpers import (
    NETWORK_PORT,
    SERVER_OVERLAY_IP,
    assert_reaches,
    build_overlay,
    network_peers,
    ping_counts,
    server_rss_kib,
    wait_connected,
)

import ncctl

PORTS = (ncctl.DEFAULT_BOOTSTRAP_PORT, ncctl.DEFAULT_GRPC_PORT, NETWORK_PORT)


@pytest.mark.parametrize("mode", ["idle", "half-open"])
def test_a_node_joins_and_connects_through_a_flood_on_every_port(lab: Lab, mode: str) -> None:
    """600 connections kept open (reopened as the server sheds them) on each port from
    one address, more than the old global limit of 512 pending handshakes: a new node
    still joins over 6439 and connects over 6441, the nodes already there keep
    talking, health answers, and no port holds more of the flood than its per-source
    limit lets in."""
    overlay = build_overlay(lab, 1, keepalive=5)
    attacker = lab.add_host("attacker")
    flood = start_flood(attacker, overlay.server_host.ip, PORTS, 600, mode)
    wait_for(lambda: held(flood) >= ncctl.MAX_PENDING_PER_SOURCE, timeout=30, what="the flood to hold connections")

    newcomer = start_client(lab.add_host("newcomer"), overlay.join)
    wait_connected(overlay.server, newcomer)
    assert_reaches(newcomer.host, SERVER_OVERLAY_IP)
    sent, received = ping_counts(overlay.hosts[0], newcomer.overlay_ip(), count=5)
    assert received == sent == 5
    assert overlay.server.healthy()
    limits = (ncctl.GRPC_MAX_PER_SOURCE, ncctl.GRPC_MAX_PER_SOURCE, ncctl.MAX_PENDING_PER_SOURCE)
    for port, limit in zip(PORTS, limits):
        established = overlay.server_host.run("ss", "-Htn", "state", "established", f"( sport = :{port} )").stdout
        from_attacker = sum(attacker.ip in line for line in established.splitlines())
        # the per-source limit, plus what a burst may have queued in the listen backlog
        assert from_attacker <= limit + 64, f"port {port} holds {from_attacker} of the flood"
    assert flood.alive(), flood.log()[-1000:]

    flood.stop()
    wait_for(
        lambda: attacker.ip not in network_peers(overlay.server_host),
        timeout=30,
        what="the flood's data-plane connections to be gone",
    )
    assert overlay.server.process.alive()
    assert_reaches(overlay.hosts[0], newcomer.overlay_ip())


def test_one_ipv6_prefix_is_one_source_and_the_log_names_it(lab: Lab) -> None:
    """24 addresses of one /64 x 64 connections to 6439 would hold more than the port's
    cap if each address counted alone: the /64 holds its one source's 64, a node on
    another host joins and connects, and the refusals name the /64, not the node."""
    server_host = lab.add_host("server")
    server_ip6 = server_host.use_ipv6_underlay(keep_ipv4=True)
    attacker = lab.add_host("attacker")
    attacker.use_ipv6_underlay()
    crowd = tuple(f"{UNDERLAY6_PREFIX}:0:1::{n:x}" for n in range(1, 25))  # one /64 of its own
    for address in crowd:
        attacker.run("ip", "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
    server_host.run("ip", "-6", "route", "add", f"{UNDERLAY6_PREFIX}:0:1::/64", "dev", "eth0")
    server = start_server(server_host, ip=server_ip6)
    join = server.join_string()
    port = ncctl.DEFAULT_BOOTSTRAP_PORT
    flood = start_flood(attacker, server_ip6, (port,), len(crowd) * 64, "idle", sources=crowd)
    wait_for(lambda: held(flood) >= ncctl.GRPC_MAX_PER_SOURCE, timeout=30, what="the flood to hold connections")

    newcomer = lab.add_host("newcomer")
    newcomer_ip6 = newcomer.use_ipv6_underlay()
    client = start_client(newcomer, join)
    wait_connected(server, client)
    established = server_host.run("ss", "-Htn", "state", "established", f"( sport = :{port} )").stdout
    from_crowd = sum(f"{UNDERLAY6_PREFIX}:0:1:" in line for line in established.splitlines())
    assert from_crowd <= ncctl.GRPC_MAX_PER_SOURCE + 64, f"the /64 holds {from_crowd}"  # + a burst in the backlog
    assert flood.alive(), flood.log()[-1000:]
    refusals = [line for line in server.process.log().splitlines() if "refusing more" in line]
    assert refusals and all(f"{UNDERLAY6_PREFIX}:0:1::/64" in line for line in refusals), refusals
    assert not any(newcomer_ip6 in line for line in refusals), refusals
    flood.stop()


def test_sessions_that_stop_reading_cost_only_their_own_packets(lab: Lab) -> None:
    """40 admitted sessions stop reading while a node blasts UDP at all of them (more
    than 40 x the per-peer queue): the others' traffic keeps flowing, the server's
    memory stays under the total send-queue cap plus overhead, and comes back once
    the slow sessions are gone."""
    overlay = build_overlay(lab, 2, keepalive=5)
    sender, bystander = overlay.clients
    slow_host = lab.add_host("slow")
    work_dirs = []
    for i in range(40):
        work_dir = lab.dir / f"slow-{i}"
        slow_host.nc("adm", "join", overlay.join, "--work-dir", str(work_dir))
        work_dirs.append(str(work_dir))
    pid = overlay.server.process.pid
    before = server_rss_kib(pid)
    slow = slow_host.spawn(
        "python3", str(SCRIPTS / "slow_readers.py"), overlay.server_host.ip, str(NETWORK_PORT), *work_dirs, name="slow"
    )
    slow.wait_for_output("all welcomed", timeout=60, what="the slow sessions to be admitted")
    ips = welcomed_ips(slow)
    assert len(ips) == 40

    blast = sender.host.spawn("python3", str(SCRIPTS / "udp_blast.py"), ",".join(ips), "1600", name="blast")
    blast.wait_for_output("sent", timeout=120, what="the blast to finish")
    during = server_rss_kib(pid)
    sent, received = ping_counts(bystander.host, sender.overlay_ip(), count=10)
    assert received == sent == 10
    sent, received = ping_counts(bystander.host, SERVER_OVERLAY_IP, count=5)
    assert received == sent == 5
    cap_kib = (ncctl.TOTAL_SEND_QUEUE_LIMIT + 40 * ncctl.FAIR_SEND_QUEUE) // 1024
    # without the total cap, 40 slow peers would hold 40 x 4 MiB = 160 MiB
    assert during - before < cap_kib + 32 * 1024, f"server RSS grew {during - before} KiB"
    assert slow.alive(), slow.log()[-1000:]

    slow.stop()  # the sessions close; what their queues held goes back to the kernel
    wait_for(
        lambda: server_rss_kib(pid) - before < 20 * 1024,
        timeout=60,
        what=f"server RSS to come back within 20 MiB of {before} KiB (it is {server_rss_kib(pid)} KiB)",
    )
