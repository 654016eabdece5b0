"""The replica role's election against a real etcd (one member on loopback): a campaign
whose answer was lost is recognised as won by its own lease, a lease too old to lead on
is revoked rather than kept alive, and a leader is named to nodes only once seen alive.

The data plane is replaced by a marker: these tests make no TUN and open no port."""

from __future__ import annotations

import secrets
import socket
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_member import LocalEtcd, free_port
from waiting import wait_for

import ncctl


class Elected(ncctl.Sessions):
    """Stands for the data plane a won campaign starts."""


@pytest.fixture
def role(etcd: LocalEtcd, tmp_path: Path) -> Iterator[ncctl.ReplicaRole]:
    store = ncctl.EtcdStore(etcd.endpoint, "ha-election-test-cluster-token", prefix=f"/nc-test-{secrets.token_hex(4)}/")
    config = ncctl.ServerConfig(work_dir=str(tmp_path)).resolve()
    role = ncctl.ReplicaRole(store, config, "198.18.0.1", threading.Event())

    def become_leader() -> None:
        role.network = Elected()  # type: ignore[assignment]

    role._become_leader = become_leader  # type: ignore[method-assign]
    try:
        yield role
    finally:
        store.close()


def own_lease(role: ncctl.ReplicaRole, renewed_ago: float = 0.0) -> int:
    lease = role.etcd.grant(ncctl.LEADER_LEASE_TTL_S)
    role.lease.id, role.lease.renewed_at = lease, time.monotonic() - renewed_ago
    return lease


def put_campaign_key(role: ncctl.ReplicaRole, value: bytes, lease: int) -> int:
    """What an earlier campaign's Txn did in etcd though its answer never came back."""
    role.etcd.txn([], [role.etcd.put_op(role.campaign_key, value, lease)])
    return role.etcd.get(role.campaign_key).create_revision


def test_a_campaign_applied_but_unanswered_is_won_by_its_own_lease(role: ncctl.ReplicaRole) -> None:
    lease = own_lease(role)
    revision = put_campaign_key(role, role.campaign_value, lease)
    role._campaign()
    assert role.leading and role.leader_address == "198.18.0.1"
    assert role.store._fence == (role.campaign_key, revision)  # leader-only writes fenced on that key


def test_a_campaign_key_on_another_lease_is_the_other_leader(role: ncctl.ReplicaRole) -> None:
    own_lease(role)
    other = role.etcd.grant(ncctl.LEADER_LEASE_TTL_S)
    put_campaign_key(role, b'{"address": "198.18.0.2", "port": 6441}', other)
    role._campaign()
    assert not role.leading and role.leader_address == "198.18.0.2"
    # The same address under this replica's value but another lease (an earlier run) is not its own.
    role.etcd.txn([], [role.etcd.delete_op(role.campaign_key)])
    put_campaign_key(role, role.campaign_value, other)
    role._campaign()
    assert not role.leading


def test_a_lease_too_old_to_lead_on_is_revoked_and_its_key_goes(role: ncctl.ReplicaRole) -> None:
    lease = own_lease(role, renewed_ago=ncctl.FENCE_AFTER_S + 1)
    role._campaign()  # wins the key, but will not lead on this lease
    assert not role.leading and role.lease.id == 0
    wait_for(lambda: role.etcd.get(role.campaign_key) is None, timeout=5, what="the revoked lease's key to go")
    assert role.etcd.keep_alive(lease, timeout=3.0) == 0  # gone in etcd, not kept alive
    own_lease(role)
    role._campaign()  # a fresh lease wins at once: nothing stale is left in the way
    assert role.leading


class ReleasedPlane:
    """Stands for a leader's data plane: records when its addresses and port are given up."""

    def __init__(self) -> None:
        self.released = threading.Event()

    def release(self) -> None:
        self.released.set()

    def stop(self) -> None:
        self.release()


def test_a_stopping_leader_gives_its_data_plane_up_at_once_whatever_its_loop_waits_for(
    role: ncctl.ReplicaRole,
) -> None:
    """Shutdown while the role loop hangs on an etcd call (etcd cut off): the fence watch
    gives the data plane up as soon as stop is set, not when that call times out, which
    may be after the lease lapsed and another replica took the address."""
    own_lease(role)  # fresh: nothing to fence for
    plane = ReleasedPlane()
    role.control = types.SimpleNamespace(sessions=None)  # type: ignore[assignment]
    role.network = plane  # type: ignore[assignment]
    watch = threading.Thread(target=role._fence_watch, daemon=True)
    watch.start()
    assert not plane.released.wait(0.5) and role.leading
    role.stop.set()  # the role loop itself is not running: as if stuck in etcd
    assert plane.released.wait(2.0), "the data plane was kept after stop"
    assert not role.leading
    watch.join(timeout=2.0)


def test_the_lease_renews_apart_and_abandoning_it_revokes_it(role: ncctl.ReplicaRole) -> None:
    assert role.lease.renew() and role.lease.id and role.lease.fresh()  # granted
    lease = role.lease.id
    role.lease.renewed_at -= 3.0
    assert role.lease.renew() and time.monotonic() - role.lease.renewed_at < 1.0  # renewed
    role.lease.abandon(lease + 1)  # not this lease: kept
    assert role.lease.id == lease
    role.lease.abandon()
    assert role.lease.id == 0 and not role.lease.fresh()
    wait_for(lambda: role.etcd.keep_alive(lease, timeout=3.0) == 0, timeout=5, what="the lease revoked")


def test_a_leader_is_named_only_while_its_heartbeat_is_seen_changing() -> None:
    sightings = ncctl.LeaderSightings()
    entry = {"address": "198.18.0.2"}
    sightings.observe([(entry, 10)], now=100.0)
    assert not sightings.alive("198.18.0.2", 100.0)  # a key seen once may be a mute leader's
    sightings.observe([(entry, 10)], now=101.0)
    assert not sightings.alive("198.18.0.2", 101.0)
    sightings.observe([(entry, 12)], now=102.0)
    assert sightings.alive("198.18.0.2", 102.0)
    assert sightings.alive("198.18.0.2", 102.0 + ncctl.LEADER_PROVEN_S)
    assert not sightings.alive("198.18.0.2", 102.1 + ncctl.LEADER_PROVEN_S)  # went mute
    assert not sightings.alive("198.18.0.9", 102.0)


def test_etcd_members_are_asked_one_by_one_whether_they_have_a_leader(etcd: LocalEtcd) -> None:
    """A live member with a leader, a port nobody listens on, a port that takes the
    connection and never answers: "led", "down" (no quorum there) and "silent" (proves
    nothing: a partitioned member may be in the quorum)."""
    closed = f"127.0.0.1:{free_port()}"
    mute_socket = socket.create_server(("127.0.0.1", 0))
    mute = f"127.0.0.1:{mute_socket.getsockname()[1]}"
    client = ncctl.Etcd(f"{etcd.endpoint},http://{closed},http://{mute}")
    try:
        live = etcd.endpoint.removeprefix("http://")
        assert client.members == [live, closed, mute]
        assert client.member_state(live, timeout=2.0) == "led"
        assert client.member_state(closed, timeout=2.0) == "down"
        assert client.member_state(mute, timeout=0.3) == "silent"
        probe = ncctl.QuorumProbe(client, threading.Event(), lambda: True, lambda: True)
        assert not probe.quorum_lost()  # one led member: a quorum may be elsewhere
    finally:
        client.close()
        mute_socket.close()
    down = ncctl.Etcd(f"http://{closed},http://127.0.0.1:{free_port()}")
    try:
        probe = ncctl.QuorumProbe(down, threading.Event(), lambda: True, lambda: True)
        assert not probe.quorum_lost()  # refusals alone: maybe a firewall, not dead members
        assert not probe.proves_no_quorum()
        probe.proved_at = time.monotonic()
        assert probe.proves_no_quorum()
    finally:
        down.close()


@pytest.mark.parametrize(
    ("answers", "lost"),
    [
        (["down", "leaderless", "down"], True),  # two members killed: the one left says so
        (["leaderless", "leaderless", "silent"], True),
        (["down", "down", "down"], False),  # refusals alone: a firewall's reject looks the same
        (["down", "leaderless", "silent"], True),  # the silent one alone is no majority
        (["led", "leaderless", "leaderless"], False),  # answers of different moments: trust the led one
        (["down", "silent", "silent"], False),
        (["silent", "silent", "silent"], False),  # cut off: proves nothing
        (["leaderless"], True),
    ],
)
def test_no_quorum_needs_a_majority_and_one_member_saying_so(answers: list[str], lost: bool) -> None:
    assert ncctl.no_quorum(answers, len(answers)) is lost


def test_a_replica_tells_a_leader_whether_it_reaches_etcd_and_holds_off_after_no() -> None:
    """Over UDP on loopback with the clusterToken's key: the answer follows the replica's
    lease; a wrong key gets no answer; after a "no" the replica may not campaign for a while."""
    key = ncctl.witness_key("the-cluster-token-0123456789")
    port = free_port()
    reaches, stop = [True], threading.Event()
    witness = ncctl.ReplicaWitness(port, key, lambda: reaches[0], stop)
    witness.start()
    try:
        wait_for(lambda: ncctl.ask_witnesses(key, ["127.0.0.1"], port, 0.5) == {"127.0.0.1": True}, timeout=5)
        assert not witness.holding_off()
        reaches[0] = False
        assert ncctl.ask_witnesses(key, ["127.0.0.1"], port, 2.0) == {"127.0.0.1": False}
        assert witness.holding_off()
        other = ncctl.witness_key("another-cluster-token-0123456")
        assert ncctl.ask_witnesses(other, ["127.0.0.1"], port, 0.5) == {}  # not answered
        assert ncctl.ask_witnesses(key, ["127.0.0.1", "127.0.0.2"], port + 1, 0.3) == {}  # nobody there
    finally:
        stop.set()
        witness.join(timeout=5)
