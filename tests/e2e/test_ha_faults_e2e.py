"""Replicas when etcd misbehaves, on a real three-member etcd in namespaces: a leader
cut off from etcd (and only from etcd) gives the server overlay address up before
another replica takes it, so no sample every 100 ms ever finds two holders."""

from __future__ import annotations

import json
import signal
import time

from ha_helpers import (
    DELAY_PROXY_PORT,
    Replicas,
    cut_from_etcd,
    delayed_replicas,
    failovers,
    heal_etcd,
    ping_loss,
    reconnect_to_etcd,
    sample_holders,
    sample_until,
    slow_etcd,
    split_with_own_member,
    start_pings,
    two_holders,
)
from netlab import Lab, start_client, wait_for


def test_a_leader_cut_off_from_etcd_only_is_never_a_second_holder(lab: Lab) -> None:
    replicas = Replicas(lab, count=3)
    wait_for(replicas.leader, timeout=30, what="one replica to lead")
    old = replicas.leader() or ""
    nodes = [start_client(lab.add_host(f"n{i}"), replicas.servers[old].join_string()) for i in range(2)]
    addresses = [node.overlay_ip() for node in nodes]
    assert nodes[0].host.ping(addresses[1], count=3)

    logged = [len(node.process.log()) for node in nodes]
    cut = time.monotonic()
    cut_from_etcd(replicas.servers[old].host)
    samples = sample_until(replicas, lambda held: held not in ([], [old]), timeout=30)
    taken = time.monotonic() - cut
    samples += sample_holders(replicas, seconds=2)
    assert taken <= 15, f"another replica led {taken:.1f} s after the cut (failover target 15 s)"
    assert not two_holders(samples), samples
    new = samples[-1][0]
    last_old = max(i for i, held in enumerate(samples) if held == [old])
    assert samples.index([new]) > last_old + 1, "the new leader took over in the sample the old one let go"
    log = replicas.servers[old].process.log()
    assert "fencing" in log and "data plane given up" in log
    assert replicas.servers[old].process.alive()

    # etcd back: the fenced replica is a standby; the new leader keeps the data plane.
    reconnect_to_etcd(replicas.servers[old].host)
    samples = sample_holders(replicas, seconds=5)
    assert all(held == [new] for held in samples), samples
    for node, address in zip(nodes, addresses):
        wait_for(lambda n=node, a=address: n.overlay_ip() == a, timeout=30, what="the node back on its address")
    wait_for(lambda: nodes[0].host.ping(addresses[1]), timeout=30, what="node-to-node traffic on the new leader")
    # The nodes went to the standbys when the old leader let go: none named it, mute since the cut.
    muted = "the leader is " + replicas.servers[old].host.ip
    for node, since in zip(nodes, logged):
        assert muted not in node.process.log()[since:], node.process.log()[since:]


def test_a_slow_etcd_never_makes_two_holders_and_one_leads_soon_after(lab: Lab) -> None:
    """etcd answering in seconds (a slow link, large writes): renewals that time out on
    the replica but are applied in etcd, campaigns whose answer is lost. Never two
    holders; within 15 s of etcd being fast again exactly one replica leads, and stays."""
    replicas = Replicas(lab, count=3)
    wait_for(replicas.leader, timeout=30, what="one replica to lead")
    writer = slow_etcd(replicas, rate_kbit=1000)
    try:
        samples = sample_holders(replicas, seconds=30)
    finally:
        heal_etcd(replicas, writer)
    samples += sample_until(replicas, lambda held: len(held) == 1, timeout=15)
    after = sample_holders(replicas, seconds=5)
    assert not two_holders(samples + after), samples + after
    assert all(held == samples[-1] for held in after), after  # one leader, and it stays
    assert failovers(samples + after) <= 1, samples + after


def test_leadership_survives_an_etcd_answering_within_a_second(lab: Lab) -> None:
    """Every replica reaches etcd through a proxy that holds each byte 0.45 s each way:
    every call is answered about a second late. For 30 s the leader keeps its data plane
    (no fencing, no failover), and when etcd is fast again it still leads."""
    delay = lab.dir / "etcd-delay"
    replicas = delayed_replicas(lab, delay)
    wait_for(replicas.leader, timeout=30, what="one replica to lead")
    leader = replicas.leader()
    delay.write_text("0.45")
    host = replicas.servers[leader].host

    def answers_late() -> bool:  # the proxy reads the delay every 0.2 s
        started = time.monotonic()
        host.run("etcdctl", f"--endpoints=http://127.0.0.1:{DELAY_PROXY_PORT + 1}", "get", "/nc/leader", "--keys-only")
        return time.monotonic() - started >= 0.9

    wait_for(answers_late, timeout=10, what="etcd behind the proxy to answer late")
    samples = sample_holders(replicas, seconds=30)
    delay.write_text("0")
    samples += sample_holders(replicas, seconds=3)
    assert all(held == [leader] for held in samples), samples
    log = replicas.servers[leader].process.log()
    assert "fencing" not in log and "giving the leadership up" not in log, log[-3000:]


def test_node_traffic_flows_through_an_etcd_quorum_loss(lab: Lab) -> None:
    """Two of three etcd members killed for 25 s: no replica can be elected, so the
    leader keeps its data plane and node-to-node traffic goes on (no re-join, same
    addresses). Meanwhile every replica is live but not ready, and a join fails with
    one line; with the quorum back the same leader goes on."""
    replicas = Replicas(lab, count=3)
    wait_for(replicas.leader, timeout=30, what="one replica to lead")
    leader = replicas.leader()
    join = replicas.servers[leader].join_string()
    nodes = [start_client(lab.add_host(f"n{i}"), join) for i in range(2)]
    addresses = [node.overlay_ip() for node in nodes]
    assert nodes[0].host.ping(addresses[1], count=3)

    pings = start_pings(nodes[0].host, addresses[1], seconds=40)
    time.sleep(5)  # traffic flowing before the outage
    killed = [h for h in replicas.hosts if h.name != leader]  # the leader's own member is the one left
    for host in killed:
        replicas.etcd.kill(host)
    outage = time.monotonic()
    wait_for(
        lambda: "etcd has no quorum" in replicas.servers[leader].process.log(), timeout=20, what="the leader to ride it"
    )
    for server in replicas.servers.values():
        assert server.adm("health", "--live", check=False).returncode == 0, server.host.name
        ready = server.adm("health", "--ready", check=False)
        assert ready.returncode != 0
    late = lab.add_host("late")
    refused = late.nc("adm", "join", join, "--work-dir", str(lab.dir / "late"), check=False, timeout=120)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode != 0 and len(lines) == 1 and lines[0].startswith("nc: error: "), refused.stderr
    write = replicas.servers[leader].adm("token", "create", check=False)  # an admin write
    lines = [line for line in write.stderr.splitlines() if line.strip()]
    assert write.returncode != 0 and len(lines) == 1 and lines[0].startswith("nc: error: "), write.stderr
    time.sleep(max(0.0, 25 - (time.monotonic() - outage)))
    for host in killed:
        replicas.etcd.restart(host)
    pings.popen.wait(timeout=60)
    sent, lost = ping_loss(pings)
    assert lost <= sent * 0.10, f"{lost} of {sent} pings lost through a 25 s quorum loss"
    assert replicas.holders() == [leader]
    for node, address in zip(nodes, addresses):
        assert node.overlay_ip() == address
        assert "disconnected" not in node.process.log()
    assert "fencing" not in replicas.servers[leader].process.log()


def test_a_leader_left_with_a_minority_member_asks_the_others_before_riding_it_out(lab: Lab) -> None:
    """The leader keeps only its own etcd member (leaderless) and gets resets from the
    others: to it that looks like a quorum loss. The other replicas reach the majority
    and say so when asked, so it fences as in a partition: never two holders."""
    replicas = Replicas(lab, count=3)
    wait_for(replicas.leader, timeout=30, what="one replica to lead")
    old = replicas.leader() or ""
    wait_for(
        lambda: len(json.loads(replicas.servers[old].adm("replica", "list", "-o", "json").stdout)) == 3,
        timeout=20,
        what="the leader to know the other replicas",
    )
    split_with_own_member(replicas, replicas.servers[old].host)
    samples = sample_until(replicas, lambda held: held not in ([], [old]), timeout=40)
    samples += sample_holders(replicas, seconds=2)
    assert not two_holders(samples), samples
    log = replicas.servers[old].process.log()
    assert "fencing" in log and "etcd has no quorum" not in log


def test_a_leader_stopped_while_cut_off_from_etcd_gives_the_address_up_at_once(lab: Lab) -> None:
    """SIGTERM to a leader cut off from etcd, before it fenced: its role loop hangs on etcd
    calls for seconds, but the address and port go at once, long before its lease can
    lapse; another replica leads after that, and never do two hold the address."""
    replicas = Replicas(lab, count=3)
    wait_for(replicas.leader, timeout=30, what="one replica to lead")
    old = replicas.leader() or ""
    server = replicas.servers[old]
    cut = time.monotonic()
    cut_from_etcd(server.host)
    time.sleep(3)  # its etcd calls hang now; the fence is 4 s away
    server.process.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    samples = sample_until(replicas, lambda held: old not in held, timeout=10)
    released = time.monotonic() - stopped
    samples += sample_until(replicas, lambda held: len(held) == 1, timeout=30)
    taken = time.monotonic() - cut
    samples += sample_holders(replicas, seconds=2)
    assert released <= 1.5, f"the stopped leader held the address {released:.1f} s after SIGTERM"
    assert not two_holders(samples), samples
    assert taken <= 15, f"another replica led {taken:.1f} s after the cut"
    assert "fencing" not in server.process.log()
    assert server.process.popen.wait(timeout=60) == 0  # SIGTERM: a clean stop
