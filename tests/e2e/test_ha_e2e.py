"""Replicas on a real three-member etcd cluster: one leader holds the data plane,
standbys point nodes at it, a killed leader is replaced and every node comes back
with its address, and never do two replicas hold the server's overlay address."""

from __future__ import annotations

import json
import signal
import time

import yaml
from control_helpers import (
    NODE_TOKEN_RE,
    adm_join,
    admin_tls,
    grpc_call,
    join_node,
    lost_join,
    node_tls,
    node_tokens,
    one_error_line,
)
from etcd_cluster import EtcdCluster
from ha_helpers import CLUSTER_TOKEN, Replicas, etcd_dump, layout1_nc, sample_holders, sample_until
from netlab import NC, Lab, start_client, start_server, wait_for


def test_failover_keeps_node_addresses_and_one_holder(lab: Lab) -> None:
    replicas = Replicas(lab, count=2)
    wait_for(replicas.leader, timeout=30, what="one replica to lead")
    leader = replicas.leader()
    standby = next(name for name in replicas.servers if name != leader)
    join = replicas.servers[standby].join_string()  # minted on the standby, from etcd
    assert join.count(":6439") == 2, join
    nodes = [start_client(lab.add_host(f"n{i}"), join) for i in range(2)]
    addresses = [node.overlay_ip() for node in nodes]
    assert len(set(addresses)) == 2
    assert nodes[0].host.ping(addresses[1], count=3)
    for node in nodes:  # client.yml lists both replicas
        listed = yaml.safe_load(node.config.read_text())["client"]["serverAddr"]
        assert sorted(listed) == sorted(h.ip for h in replicas.hosts[:2])

    killed = time.monotonic()
    replicas.servers[leader].process.stop(signal.SIGKILL)
    samples = sample_holders(replicas, seconds=0.5)
    wait_for(lambda: replicas.leader() == standby, timeout=30, what="the standby to take over")
    taken = time.monotonic() - killed
    assert taken <= 15, f"the standby led {taken:.1f} s after the leader was killed (failover target 15 s)"
    samples += sample_holders(replicas, seconds=0.5)
    assert all(len(held) <= 1 for held in samples), samples
    for node, address in zip(nodes, addresses):
        wait_for(lambda n=node, a=address: n.overlay_ip() == a, timeout=20, what="the node back on its address")
    wait_for(lambda: nodes[0].host.ping(addresses[1]), timeout=20, what="node-to-node traffic after failover")

    # The killed replica comes back as a standby; the leader keeps the data plane.
    replicas.servers[leader].start()
    samples = sample_holders(replicas, seconds=3)
    assert all(held == [standby] for held in samples), samples
    listed = json.loads(replicas.servers[leader].adm("replica", "list", "-o", "json").stdout)
    assert {(r["address"], r["role"]) for r in listed} == {
        (replicas.servers[standby].host.ip, "leader"),
        (replicas.servers[leader].host.ip, "standby"),
    }


def test_a_join_a_killed_replica_never_answered_is_retried_on_the_other(lab: Lab) -> None:
    """A standby admits a join with a single-use token and is SIGKILLed before anyone hears
    of it (the reply lost): the same join string joins a working node through the leader,
    the lost join's credentials never work, and etcd counts the token used once."""
    replicas = Replicas(lab, count=2)
    wait_for(replicas.leader, timeout=30, what="one replica to lead")
    leader = replicas.servers[replicas.leader()]
    standby = next(server for server in replicas.servers.values() if server is not leader)
    join = standby.join_string("--single-use")
    node = lab.add_host("n1")
    ca = admin_tls(leader)["ca"]
    lost = lost_join(node, f"{standby.host.ip}:6439", join, ca, lab.dir)
    standby.process.stop(signal.SIGKILL)
    client = start_client(node, join)  # the standby first in the join string: unreachable, then the leader
    assert node_tokens(leader) == {"reserverd", client.token()}
    [listed] = leader.adm_json("token", "list")
    assert (listed["state"], listed["uses"]) == ("used", 1), listed
    refused = grpc_call(
        node, f"{leader.host.ip}:6440", "LiteKubeNCService", "HealthCheck", "HealthCheckRequest", ca=ca, **lost
    )
    assert refused["ok"] is False, refused


def test_a_standby_killed_during_concurrent_joins_loses_no_delivered_join(lab: Lab) -> None:
    """Twenty `nc adm join` at once, the standby first in the join string, SIGKILLed once a
    few joins are in etcd: every join succeeds (on the leader if not on the standby), every
    delivered node's credentials work, and the token counts exactly the nodes heard from,
    not the joins the standby admitted whose reply never left it."""
    replicas = Replicas(lab, count=2)
    wait_for(replicas.leader, timeout=30, what="one replica to lead")
    leader = replicas.servers[replicas.leader()]
    standby = next(server for server in replicas.servers.values() if server is not leader)
    join = standby.join_string("--life", "60")
    node = lab.add_host("joiner")
    works = [lab.dir / f"j{i}" for i in range(20)]
    joins = [node.spawn_nc("adm", "join", join, "--work-dir", str(w), name=f"j{i}") for i, w in enumerate(works)]

    def admitted() -> int:  # node records in etcd, the reserved one included
        done = node.run("etcdctl", f"--endpoints={replicas.etcd.endpoints}", "get", "--prefix", "/nc/node/",
                        "--keys-only")  # fmt: skip
        return sum(1 for line in done.stdout.splitlines() if line.strip())

    wait_for(lambda: admitted() >= 4, timeout=60, interval=0.05, what="a few joins admitted")
    standby.process.stop(signal.SIGKILL)
    codes = [j.popen.wait(120) for j in joins]
    assert codes == [0] * 20, [j.log()[-500:] for j, c in zip(joins, codes) if c]
    printed = [next(x for x in j.log().splitlines() if NODE_TOKEN_RE.match(x)) for j in joins]
    assert len(set(printed)) == 20, printed
    ca = admin_tls(leader)["ca"]
    for work in works:
        tls = node_tls(work, "grpc")
        checked = grpc_call(node, f"{leader.host.ip}:6440", "LiteKubeNCService", "HealthCheck", "HealthCheckRequest",
                            ca=ca, cert=tls["cert"], key=tls["key"])  # fmt: skip
        assert checked["ok"] and checked["response"]["code"] == "200", (work, checked)
    [listed] = leader.adm_json("token", "list")
    assert listed["uses"] == 20, listed  # a join whose reply was lost counts nothing


def test_standby_refusal_names_the_leader(lab: Lab) -> None:
    """A node whose client.yml lists only the standby is sent to the leader."""
    replicas = Replicas(lab, count=2)
    wait_for(replicas.leader, timeout=30, what="one replica to lead")
    leader = replicas.leader()
    standby = next(name for name in replicas.servers if name != leader)
    server = replicas.servers[standby]
    join = server.join_string()
    token, _, rest = join.partition("@")
    only_standby = f"{token}@{server.host.ip}:6439#{rest.partition('#')[2]}"
    node = start_client(lab.add_host("n1"), only_standby)
    assert node.overlay_ip() is not None
    assert "the leader is " + replicas.servers[leader].host.ip in node.process.log()

    # A network created on the standby is served by the leader's data plane, and goes with it.
    leader_host = replicas.servers[leader].host

    def leader_has(address: str) -> bool:
        return address in leader_host.run("ip", "-4", "-o", "addr").stdout

    server.adm("network", "create", "--name", "edge-b", "--cidr", "10.2.0.1/24")
    wait_for(lambda: leader_has("10.2.0.1/24"), timeout=20, what="the leader to serve the new network")
    server.adm("network", "delete", "--name", "edge-b")
    wait_for(lambda: not leader_has("10.2.0.1/24"), timeout=20, what="the leader to drop the deleted network")


def test_wrong_cluster_token_is_one_line(lab: Lab) -> None:
    replicas = Replicas(lab, count=1)
    host = replicas.hosts[1]
    config = lab.dir / "wrong.yml"
    config.write_text(
        json.dumps(
            {
                "mode": "server",
                "server": {
                    "workDir": str(lab.dir / "wrong-work"),
                    "ip": host.ip,
                    "datastoreEndpoint": replicas.etcd.endpoints,
                    "clusterToken": "not-the-cluster-token-at-all",
                },
            }
        )
    )
    done = host.nc("server", "--config", str(config), check=False, timeout=60)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "clusterToken" in lines[0], done.stderr


def test_an_etcd_member_killed_and_restarted_disconnects_no_node(lab: Lab) -> None:
    replicas = Replicas(lab, count=2)
    wait_for(replicas.leader, timeout=30, what="one replica to lead")
    leader = replicas.leader()
    join = replicas.servers[leader].join_string()
    nodes = [start_client(lab.add_host(f"n{i}"), join) for i in range(2)]
    addresses = [node.overlay_ip() for node in nodes]
    member = next(h for h in replicas.hosts if h.name != leader)  # not the leader's own member
    replicas.etcd.kill(member)
    assert nodes[0].host.ping(addresses[1], count=10)
    replicas.etcd.restart(member)
    assert nodes[1].host.ping(addresses[0], count=10)  # any answer in 2 s: once, at load 7, none came in 1 s
    assert replicas.holders() == [leader]
    for node, address in zip(nodes, addresses):
        assert node.overlay_ip() == address
        assert "disconnected" not in node.process.log()


def test_migrate_a_single_server_into_etcd_keeps_its_nodes(lab: Lab) -> None:
    """A sqlite server's store and PKI move into etcd; the node reconnects to the
    replica on its own, with its address, and a second replica serves the same CA."""
    hosts = [lab.add_host(f"s{i}") for i in range(1, 4)]
    single = start_server(hosts[0], ip=hosts[0].ip)
    node = start_client(lab.add_host("n1"), single.join_string())
    address = node.overlay_ip()
    pin = single.join_string().rpartition("#")[2]
    single.process.stop()
    etcd = EtcdCluster(hosts)
    done = single.adm("datastore", "migrate", "--to", etcd.endpoints, "--cluster-token", CLUSTER_TOKEN)
    assert "1 nodes" in done.stdout  # the reserved node-token is not a node of the overlay
    config = json.loads(single.config.read_text())
    config["server"].update(datastoreEndpoint=etcd.endpoints, clusterToken=CLUSTER_TOKEN)
    single.config.write_text(json.dumps(config))
    single.start()
    wait_for(lambda: node.overlay_ip() == address and node.host.ping("10.1.1.1"), timeout=40, what="the node back")
    second = start_server(hosts[1], ip=hosts[1].ip, datastoreEndpoint=etcd.endpoints, clusterToken=CLUSTER_TOKEN)
    assert second.join_string().rpartition("#")[2] == pin


def test_a_leader_cut_off_from_etcd_stops_its_data_plane_before_another_takes_over(lab: Lab) -> None:
    """Fencing: the leader's host loses its link (to etcd and everyone). It must drop
    the server overlay address before its lease lapses and the standby is elected."""
    replicas = Replicas(lab, count=2)
    wait_for(replicas.leader, timeout=30, what="one replica to lead")
    leader = replicas.leader()
    standby = next(name for name in replicas.servers if name != leader)
    replicas.servers[leader].host.run("ip", "link", "set", "eth0", "down")
    samples = sample_until(replicas, lambda held: held == [standby], timeout=30)
    samples += sample_holders(replicas, seconds=1)
    assert all(len(held) <= 1 for held in samples), samples
    assert [standby] in samples and samples[-1] == [standby], samples
    gap = samples.index([standby]) - max(i for i, held in enumerate(samples) if held == [leader])
    assert gap > 1, f"the standby took over {gap} samples after the leader let go"
    assert "fencing" in replicas.servers[leader].process.log()


def test_a_node_learns_a_replica_added_after_its_join(lab: Lab) -> None:
    """The join string names two replicas; a third starts later. The node's next WELCOME
    lists it, so when both first replicas are gone (no standby left to name a leader)
    the node finds the third on its own, with its address."""
    replicas = Replicas(lab, count=2)
    wait_for(replicas.leader, timeout=30, what="one replica to lead")
    node = start_client(lab.add_host("n1"), replicas.servers["s1"].join_string())
    address = node.overlay_ip()
    third = replicas.start(replicas.hosts[2])
    wait_for(
        lambda: len(json.loads(third.adm("replica", "list", "-o", "json").stdout)) == 3,
        timeout=20,
        what="three replicas listed",
    )

    third_ip = replicas.hosts[2].ip

    def learned_the_third() -> bool:
        lines = [line for line in node.process.log().splitlines() if "server replicas:" in line]
        return bool(lines) and third_ip in lines[-1]

    def restarted_and_learned() -> bool:
        """Its client.yml names the replicas s1 knew at the join; the leader's WELCOME adds
        s3 once the leader's own heartbeat (every second) saw it: a node that connected
        before learns nothing. A welcome may also teach s2 alone first (s1's view at the
        join lagged), so only a line naming s3 counts."""
        node.process.stop()
        node.restart()
        try:
            wait_for(learned_the_third, timeout=8, what="the third replica")
        except AssertionError:
            return False
        return True

    try:
        wait_for(restarted_and_learned, timeout=60, interval=0, what="the node to learn the replicas")
    except AssertionError as e:
        raise AssertionError(f"{e}; the node's log:\n{node.process.log()[-3000:]}") from None
    for name in ("s1", "s2"):
        replicas.servers[name].process.stop(signal.SIGKILL)
    wait_for(lambda: replicas.leader() == "s3", timeout=30, what="the third replica to lead")
    wait_for(lambda: node.overlay_ip() == address and node.host.ping("10.1.1.1"), timeout=30, what="the node on s3")


def test_a_leader_whose_key_is_overwritten_steps_down_and_says_so(lab: Lab) -> None:
    """Whoever can write to etcd can put /nc/leader without a lease: the leader must not go
    on holding the data plane under a key that is not its own any more."""
    replicas = Replicas(lab, count=1)
    wait_for(replicas.leader, timeout=30, what="the replica to lead")
    server = replicas.servers[replicas.leader() or ""]
    forged = '{"address": "198.18.0.99", "port": 6441}'
    server.host.run("etcdctl", f"--endpoints={replicas.etcd.endpoints}", "put", "/nc/leader", forged)
    wait_for(lambda: replicas.holders() == [], timeout=15, what="the leader to give the data plane up")
    assert "/nc/leader is not this replica's any more (lease 0, " in server.process.log()
    assert server.process.alive()


def test_replicas_upgraded_from_key_layout_1_keep_their_nodes_and_tokens(lab: Lab) -> None:
    """Two replicas of the last build with plain token names in etcd, a node joined and a
    token made; both stopped, the new build started: the first migrates the keys, the node
    comes back on its address without joining again, the old token joins a second node,
    etcd no longer shows either token, and the previous build refuses the migrated tree."""
    hosts = [lab.add_host(f"s{i}") for i in range(1, 4)]
    old_nc = layout1_nc(lab)
    for host in hosts:
        host.nc_path = old_nc
    etcd = EtcdCluster(hosts)
    fields = {"datastoreEndpoint": etcd.endpoints, "clusterToken": CLUSTER_TOKEN}
    servers = [start_server(host, ip=host.ip, **fields) for host in hosts[:2]]
    first = start_client(lab.add_host("n1"), servers[0].join_string())
    address, node_token = first.overlay_ip(), first.token()
    later = servers[1].join_string("--life=-1")
    token = later.partition("@")[0]
    assert token.encode() in etcd_dump(hosts[0], etcd.endpoints)  # what layout 1 showed anyone reading etcd

    for server in servers:
        server.process.stop()
    for host in hosts:
        host.nc_path = str(NC)
    for server in servers:
        server.start()
    assert "migrating key layout 1 to 2" in servers[0].process.log() + servers[1].process.log()
    wait_for(lambda: first.overlay_ip() == address, timeout=40, what="the old node back on its address")
    assert first.token() == node_token  # it reconnected with its credentials: no new join
    second = start_client(lab.add_host("n2"), later)  # the token made before the upgrade
    wait_for(lambda: first.host.ping(second.overlay_ip()), timeout=30, what="old and new node to talk")
    dump = etcd_dump(hosts[0], etcd.endpoints)
    assert token.split(".")[1].encode() not in dump
    assert all("no valid MAC" not in server.process.log() for server in servers)

    config = lab.dir / "s3-server.yml"
    config.write_text(json.dumps({"mode": "server", "server": {"workDir": str(lab.dir / "s3-work"), **fields}}))
    refused = hosts[2].run(old_nc, "server", "--config", str(config), check=False, timeout=60)
    assert refused.returncode != 0
    assert "key layout 2 is newer than this nc knows (1); run a newer nc" in refused.stderr, refused.stderr


def test_a_token_key_forged_in_etcd_admits_no_join_and_is_logged(lab: Lab) -> None:
    """Whoever can write to etcd (but has no clusterToken) puts a token as layout 1 named
    them, never expiring, minted by the admin: the join is refused and the replica logs the
    key once, by the token's id only."""
    replicas = Replicas(lab, count=1)
    server = next(iter(replicas.servers.values()))
    real = server.join_string()
    forged = "forged.0123456789abcdef"
    value = {"expire_time": "9999-12-31 23:59:59", "create_time": "2026-01-01 00:00:00", "update_time": ""}
    value.update(single_use=False, uses=0, network="default", minted_by="")
    etcdctl = ("etcdctl", f"--endpoints={replicas.etcd.endpoints}")
    server.host.run(*etcdctl, "put", f"/nc/token/{forged}", json.dumps(value))
    node = lab.add_host("n1")
    for attempt in range(2):
        line = one_error_line(adm_join(node, f"{forged}@{real.partition('@')[2]}", lab.dir / f"forged{attempt}"))
        assert "unknown or was deleted" in line, line
    log = server.process.log()
    assert log.count("etcd key /nc/token/forged has no valid MAC") == 1, log[-2000:]
    assert "0123456789abcdef" not in log
    join_node(node, real, lab.dir / "real")  # the replica's own tokens still join
