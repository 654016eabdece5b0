"""One overlay, end to end with the real ./nc in namespaces: nodes reach each other
and the server over the overlay, keep their addresses across restarts and
underlay changes, and a hostile or forging node cannot disturb the others."""

from __future__ import annotations

import contextlib
import shutil
import signal
import time

import pytest
from netlab import SCRIPTS, Lab, start_client, wait_for
from overlay_helpers import (
    FUZZ_CASES,
    SERVER_OVERLAY_IP,
    assert_blocked,
    assert_full_mesh,
    assert_reaches,
    build_overlay,
    change_underlay,
    network_peers,
    node_state,
    ping_counts,
    run_fuzz,
    server_rss_kib,
    spawn_tcpdump,
    stop_client,
    tcp_transfer,
    wait_connected,
    wait_exit,
    wait_state,
)


def test_every_node_reaches_every_other_node_and_the_server(lab: Lab) -> None:
    """Three nodes: all six node pairs ping, each node pings 10.1.1.1 and the server pings each
    node; every node is connected (3) with the bindIp that its nc0 carries."""
    overlay = build_overlay(lab, 3, keepalive=2)
    assert_full_mesh(overlay)
    for client in overlay.clients:
        state = node_state(overlay.server, client.token())
        assert state["connState"] == 3
        assert state["bindIp"] == client.overlay_ip()
        assert state["bindIp"].startswith("10.1.1.") and state["bindIp"] != SERVER_OVERLAY_IP
    assert overlay.server_host.has_link("ncsrv0")


def test_client_sigterm_cleans_up_and_restart_keeps_the_address(lab: Lab) -> None:
    """SIGTERM on a client removes its nc0 and the server marks it idle (-1) within seconds;
    the others keep talking; restarted from its config each node gets its old address back."""
    overlay = build_overlay(lab, 3, keepalive=1)
    before = [client.overlay_ip() for client in overlay.clients]
    for n, client in enumerate(overlay.clients):
        stopped = time.monotonic()
        assert stop_client(client) == 0, client.process.log()
        wait_for(lambda c=client: not c.host.has_link("nc0"), timeout=5, what="nc0 to be removed")
        wait_state(overlay.server, client.token(), -1, timeout=5)
        assert time.monotonic() - stopped < 6
        others = [c for c in overlay.clients if c is not client]
        assert_reaches(others[0].host, others[1].overlay_ip())
        client.restart()
        assert wait_connected(overlay.server, client) == before[n], "the node's overlay address changed"
    assert [client.overlay_ip() for client in overlay.clients] == before
    assert_full_mesh(overlay)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_server_restart_keeps_every_address(lab: Lab, sig: signal.Signals) -> None:
    """The server stops (cleanly or killed): ncsrv0 goes away, clients keep retrying, and after a
    restart every node reconnects with its old address and the mesh works again."""
    overlay = build_overlay(lab, 3, keepalive=1)
    before = [client.overlay_ip() for client in overlay.clients]
    code = overlay.server.process.stop(sig)
    if sig == signal.SIGTERM:
        assert code == 0, overlay.server.process.log()[-3000:]
    wait_for(lambda: not overlay.server_host.has_link("ncsrv0"), timeout=5, what="ncsrv0 to be removed")
    assert not overlay.hosts[0].ping(overlay.clients[1].overlay_ip(), count=2, timeout=1)
    time.sleep(2)
    assert all(client.process.alive() for client in overlay.clients), "a client gave up while the server was down"
    overlay.server.start()
    for client, ip in zip(overlay.clients, before):
        assert wait_connected(overlay.server, client, timeout=30) == ip
    assert all(client.process.alive() for client in overlay.clients)
    assert_full_mesh(overlay)


def test_underlay_address_change_keeps_the_overlay_address(lab: Lab) -> None:
    """Each node moves to a new underlay address: its client notices the dead session, reconnects
    from the new address, gets the same overlay address, and the mesh works again."""
    overlay = build_overlay(lab, 3, keepalive=1)
    before = [client.overlay_ip() for client in overlay.clients]
    new_ips = [f"198.18.0.{100 + n}" for n in range(len(overlay.hosts))]
    assert not set(new_ips) & network_peers(overlay.server_host)
    for host, new_ip in zip(overlay.hosts, new_ips):
        change_underlay(host, new_ip)
    wait_for(
        lambda: set(new_ips) <= network_peers(overlay.server_host),
        timeout=20,
        interval=0.3,
        what="every node to reconnect from its new underlay address",
    )
    for client, ip in zip(overlay.clients, before):
        assert wait_connected(overlay.server, client) == ip
        assert client.process.alive()
    assert_full_mesh(overlay)


def test_unregister_cuts_the_node_off(lab: Lab) -> None:
    """`nc adm node unregister` disconnects the node within about a second: its client exits
    non-zero saying so, its pings stop, and a restart with its config is refused too."""
    overlay = build_overlay(lab, 3, keepalive=2)
    victim, *others = overlay.clients
    assert_reaches(victim.host, others[0].overlay_ip())
    token = victim.token()
    overlay.server.adm("node", "unregister", "--node-token", token)
    done = time.monotonic()
    code = wait_exit(victim.process, timeout=3)
    assert time.monotonic() - done < 1.5, "the client was not cut off within about a second"
    assert code != 0
    assert "unregistered" in victim.process.log(), victim.process.log()[-2000:]
    assert_blocked(victim.host, others[0].overlay_ip())
    assert_blocked(victim.host, SERVER_OVERLAY_IP)
    assert token not in {n["nodeToken"] for n in overlay.server.adm_json("node", "list")}
    assert node_state(overlay.server, token) == {}
    victim.restart()
    code = wait_exit(victim.process, timeout=20)
    assert code != 0
    assert "unregistered" in victim.process.log() or "not registered" in victim.process.log()
    assert victim.overlay_ip() is None
    assert_reaches(others[0].host, others[1].overlay_ip())


def test_full_overlay_reclaims_the_address_idle_longest(lab: Lab) -> None:
    """networkAddr 10.9.9.1/29 holds five nodes. Stopped in the order 3, 1, 5, their addresses go
    to three new nodes in that order; connected nodes keep theirs; a ninth node's join is refused."""
    overlay = build_overlay(lab, 5, keepalive=1, networkAddr="10.9.9.1/29")
    ips = [client.overlay_ip() for client in overlay.clients]
    assert sorted(ips) == [f"10.9.9.{n}" for n in range(2, 7)]
    stop_order = [overlay.clients[2], overlay.clients[0], overlay.clients[4]]
    for client in stop_order:
        assert stop_client(client) == 0
        wait_state(overlay.server, client.token(), -1)
        time.sleep(1.1)  # distinct update_time seconds, so the LRU order survives a cache reload
    stopped_tokens = [client.token() for client in stop_order]
    for n, old in enumerate(stop_order):
        newcomer = overlay.add_node(f"new{n}")
        expected = ips[overlay.clients.index(old)]
        assert wait_connected(overlay.server, newcomer) == expected, f"new{n} did not get the longest-idle address"
    listed = {n["nodeToken"]: n for n in overlay.server.adm_json("node", "list")}
    assert not set(stopped_tokens) & set(listed), "evicted nodes must be deleted"
    for keeper in (overlay.clients[1], overlay.clients[3]):
        assert listed[keeper.token()]["bindIp"] == keeper.overlay_ip() == ips[overlay.clients.index(keeper)]
        assert_reaches(keeper.host, "10.9.9.1")
    before = set(listed)
    late = overlay.add_node("late", wait=False)
    assert wait_exit(late.process) != 0, "a join into a network of connected nodes must be refused"
    assert "is full" in late.process.log()
    assert not late.config.exists()
    assert set(n["nodeToken"] for n in overlay.server.adm_json("node", "list")) == before, "the refused join left a row"
    assert_reaches(overlay.hosts[1], overlay.clients[3].overlay_ip())


def test_interconnection_false_blocks_node_to_node_only(lab: Lab) -> None:
    """With interconnection=false nodes still reach the server (and back) but not each other."""
    overlay = build_overlay(lab, 2, keepalive=2, interconnection=False)
    (a, b), (ip_a, ip_b) = overlay.hosts, [c.overlay_ip() for c in overlay.clients]
    for host, ip in ((a, ip_a), (b, ip_b)):
        assert_reaches(host, SERVER_OVERLAY_IP)
        assert_reaches(overlay.server_host, ip)
    assert_blocked(a, ip_b)
    assert_blocked(b, ip_a)


def test_forged_source_addresses_get_nothing_through(lab: Lab) -> None:
    """A node that sends from an overlay address it was not given reaches neither another node
    nor the server, and they see none of it; its own address keeps working."""
    overlay = build_overlay(lab, 3, keepalive=2)
    forger, target = overlay.hosts[0], overlay.hosts[1]
    forger_ip, target_ip = overlay.clients[0].overlay_ip(), overlay.clients[1].overlay_ip()
    forged = "10.1.1.77"
    forger.run("ip", "addr", "add", f"{forged}/32", "dev", "nc0")
    at_target = spawn_tcpdump(target, "nc0", "tcpdump-target")
    at_server = spawn_tcpdump(overlay.server_host, "ncsrv0", "tcpdump-server")
    for destination in (target_ip, SERVER_OVERLAY_IP, overlay.clients[2].overlay_ip()):
        done = forger.run("ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", "-I", forged, destination, check=False)
        assert done.returncode != 0, f"a ping from the forged {forged} to {destination} was answered"
    assert_reaches(forger, target_ip)
    assert_reaches(forger, SERVER_OVERLAY_IP)
    for capture in (at_target, at_server):
        capture.stop(signal.SIGINT)
        log = capture.log()
        assert f"{forger_ip} > " in log, f"tcpdump saw not even the genuine ping:\n{log}"
        assert forged not in log, f"a forged packet came through:\n{log}"


def test_hostile_streams_do_not_disturb_other_nodes(lab: Lab) -> None:
    """From node1's namespace, with and without node1's certificate: garbage, oversized and
    truncated frames, bad hellos. Pings between node2 and node3 keep working during and after
    each case, the server stays up, and node1's own client stays connected."""
    overlay = build_overlay(lab, 3, keepalive=2)
    attacker, victims = overlay.clients[0], overlay.hosts[1:]
    target_ip = overlay.clients[2].overlay_ip()
    cert_dir = attacker.work_dir / "tls" / "network"
    assert (cert_dir / "client.crt").exists()
    for case in FUZZ_CASES:
        fuzz = run_fuzz(attacker.host, overlay.server_host.ip, cert_dir, attacker.token(), case, rounds=6)
        sent, answered = ping_counts(victims[0], target_ip, count=15, interval=0.1)
        with contextlib.suppress(AssertionError):
            wait_exit(fuzz, timeout=8)
        server_log = overlay.server.process.log()
        assert "network loop failed" not in server_log, f"{case} broke the server's network loop:\n{server_log[-3000:]}"
        assert answered >= sent - 1, f"during {case}: {answered}/{sent} pings answered between node2 and node3"
        assert overlay.server.process.alive(), f"the server died during {case}"
        after = ping_counts(victims[0], target_ip, count=3, interval=0.1)
        assert after[1] == after[0], f"after {case}: node2 -> node3 {after[1]}/{after[0]}"
        assert_reaches(victims[1], SERVER_OVERLAY_IP, timeout=3)
        assert not fuzz.alive(), f"fuzzer {case} hung:\n{fuzz.log()}"
        assert fuzz.popen.returncode == 0, f"fuzzer {case} failed:\n{fuzz.log()}"
    assert overlay.server.healthy()
    assert attacker.process.alive()
    assert node_state(overlay.server, attacker.token())["connState"] == 3
    assert_full_mesh(overlay)
    # A node that joins after the onslaught is served as usual.
    late = start_client(lab.add_host("late"), overlay.join)
    assert_reaches(late.host, target_ip)


def test_a_second_session_with_the_same_token_replaces_the_first(lab: Lab) -> None:
    """A node that comes back (say, rebooted with its old session still open on the server)
    takes over: the newer session gets the address, the older client is told and exits."""
    overlay = build_overlay(lab, 2, keepalive=5)
    first, peer = overlay.clients
    address = first.overlay_ip()
    twin_host = lab.add_host("twin")
    twin_dir = lab.dir / "twin-client"
    shutil.copytree(
        first.work_dir, twin_dir, ignore=shutil.ignore_patterns("*.sock")
    )  # the running client's status socket
    config = twin_dir / "client.yml"
    config.write_text(config.read_text().replace(str(first.work_dir), str(twin_dir)))
    twin = twin_host.spawn_nc("client", "--config", str(config), name="twin-client")
    assert wait_exit(first.process, timeout=15) != 0
    assert "replaced" in first.process.log()
    wait_for(
        lambda: twin.alive() and twin_host.run("ip", "-4", "-o", "addr", "show", "dev", "nc0", check=False).stdout,
        what="the twin to connect",
    )
    assert f"{address}/" in twin_host.run("ip", "-4", "-o", "addr", "show", "dev", "nc0").stdout
    assert_reaches(peer.host, address)
    assert node_state(overlay.server, first.token())["connState"] == 3


def test_thousands_of_half_open_connections_cost_bounded_memory(lab: Lab) -> None:
    """2000 connections that never finish a handshake: the server sheds what exceeds its
    pending limit, times out the rest, keeps the nodes' traffic flowing, and its memory
    stays bounded."""
    overlay = build_overlay(lab, 2, keepalive=5)
    first, second = overlay.clients
    pid = overlay.server.process.pid
    before = server_rss_kib(pid)
    attacker = lab.add_host("attacker")
    flood = attacker.spawn(
        "python3", str(SCRIPTS / "half_open.py"), overlay.server_host.ip, "2000", "14", name="half-open"
    )
    flood.wait_for_output("opened", timeout=60, what="the flood to open its connections")
    sent, received = ping_counts(first.host, second.overlay_ip(), count=10)
    assert received == sent == 10
    during = server_rss_kib(pid)
    assert during - before < 64 * 1024, f"server RSS grew {during - before} KiB under 2000 half-open connections"
    wait_for(
        lambda: network_peers(overlay.server_host) <= {first.host.ip, second.host.ip},
        timeout=30,
        what="half-open connections to be closed",
    )
    assert overlay.server.process.alive()
    assert_reaches(first.host, second.overlay_ip())


def test_peers_with_and_without_offload_exchange_tcp_streams(lab: Lab) -> None:
    """One node turns offload off: the server cuts the other side's 64 KiB segments for it
    and completes checksums, so TCP streams between every pair arrive whole."""
    overlay = build_overlay(lab, 2, keepalive=5)
    plain, gso = overlay.clients
    stop_client(plain)
    plain.config.write_text(plain.config.read_text().replace("offload: true", "offload: false"))
    plain.restart()
    wait_connected(overlay.server, plain)
    server_host = overlay.server_host
    tcp_transfer(gso.host, plain.host, plain.overlay_ip())
    tcp_transfer(plain.host, gso.host, gso.overlay_ip())
    tcp_transfer(plain.host, server_host, SERVER_OVERLAY_IP)
    tcp_transfer(server_host, plain.host, plain.overlay_ip())


def test_sigterm_while_connecting_to_an_unreachable_server_exits_at_once(lab: Lab) -> None:
    """A client stuck connecting (its server's address answers nothing) still stops at once
    on SIGTERM, with exit 0, instead of finishing a connect timeout first."""
    overlay = build_overlay(lab, 1, keepalive=2)
    (client,) = overlay.clients
    stop_client(client)
    client.config.write_text(client.config.read_text().replace(overlay.server_host.ip, "198.18.0.250"))
    client.restart()
    wait_for(lambda: "client: node" in client.process.log(), what="the client to start connecting")
    time.sleep(1.0)
    started = time.monotonic()
    assert stop_client(client) == 0
    assert time.monotonic() - started < 3.0
