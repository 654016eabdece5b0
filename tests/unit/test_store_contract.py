"""One contract for every store: the same tests against sqlite and a real etcd.

The etcd store is a single-member etcd on loopback, started by the session; each
test gets its own key prefix, so tests never see each other's keys."""

from __future__ import annotations

import inspect
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_member import LocalEtcd

import ncctl

CLUSTER_TOKEN = "the-replicas-shared-secret"
CERT_A = ncctl.CertRecord(0xA1, "grpc", "2999-01-01T00:00:00+00:00")
CERT_B = ncctl.CertRecord(0xA2, "network", "2999-01-01T00:00:00+00:00")


class Stores:
    """Opens the store under test; open() again gives a second handle on the same data
    (a second replica for etcd, a second connection for sqlite)."""

    def __init__(self, kind: str, tmp_path: Path, etcd: LocalEtcd | None) -> None:
        self.kind, self.opened = kind, []
        self.db = str(tmp_path / "nc.db")
        self.prefix = f"/nc-test-{secrets.token_hex(4)}/"
        self.etcd = etcd

    def open(self) -> ncctl.Datastore:
        if self.kind == "sqlite":
            store = ncctl.Store(self.db)
        else:
            store = ncctl.EtcdStore(self.etcd.endpoint, CLUSTER_TOKEN, prefix=self.prefix)
        self.opened.append(store)
        return store

    def campaign(self, store: ncctl.Datastore) -> tuple[bytes, int]:
        """A fence to lead with: on etcd a campaign key as the replica role writes one (its
        create revision is the fence); sqlite has no other writer and takes any."""
        if not isinstance(store, ncctl.EtcdStore):
            return b"leader", 1
        key = store.etcd.key("leader")
        store.etcd.txn([], [store.etcd.put_op(key, b"{}")])
        return key, store.etcd.get(key).create_revision


@pytest.fixture(params=["sqlite", "etcd"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    etcd = request.getfixturevalue("etcd") if request.param == "etcd" else None
    the_stores = Stores(request.param, tmp_path, etcd)
    try:
        yield the_stores
    finally:
        for store in the_stores.opened:
            store.close()


@pytest.fixture
def store(stores: Stores) -> ncctl.Datastore:
    return stores.open()


def admitted(store: ncctl.Datastore, node: str, network: str = ncctl.DEFAULT_NETWORK, **token_args: object) -> str:
    """A node admitted (and heard from) with a fresh multi-use token; returns the bootstrap token."""
    token = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(token, 60, False, network, **token_args)
    store.admit_node(token, node)
    assert store.confirm_node(node)
    return token


# -- the contract itself ------------------------------------------------------------


@pytest.mark.parametrize("implementation", [ncctl.Store, ncctl.EtcdStore])
def test_both_stores_implement_every_operation_of_the_contract(implementation: type) -> None:
    """Each Datastore member exists on both stores with the same parameters and defaults."""
    members = [name for name in vars(ncctl.Datastore) if not name.startswith("_")]
    assert {"shared", "leads", "lead", "follow", "admit_node", "bind"} <= set(members)
    for name in members:
        declared = getattr(ncctl.Datastore, name)
        implemented = getattr(implementation, name)
        if isinstance(declared, property):
            assert isinstance(implemented, (property, bool)), name
            continue
        wanted = [(p.name, p.default) for p in inspect.signature(declared).parameters.values()]
        assert [(p.name, p.default) for p in inspect.signature(implemented).parameters.values()] == wanted, name


# -- bootstrap tokens ---------------------------------------------------------


def test_token_lifecycle(store: ncctl.Datastore) -> None:
    token = ncctl.new_bootstrap_token()
    expire = store.add_bootstrap_token(token, 60, single_use=False)
    assert not ncctl.token_expired(expire)
    [row] = store.bootstrap_tokens_with_id(ncctl.token_id(token))
    assert (row.token, row.single_use, row.uses, row.network) == (token, False, 0, ncctl.DEFAULT_NETWORK)
    assert [r.token for r in store.list_bootstrap_tokens()] == [token]
    assert store.delete_bootstrap_token(token)
    assert not store.delete_bootstrap_token(token)
    assert store.list_bootstrap_tokens() == []


def test_tokens_are_found_by_their_whole_id_only(store: ncctl.Datastore) -> None:
    """A part of an id, or none, finds nothing (a delete by id must never take more)."""
    token = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(token, 60, single_use=False)
    public = ncctl.token_id(token)
    assert [row.token for row in store.bootstrap_tokens_with_id(public)] == [token]
    for partial in ("", public[:3], public + "x", token):
        assert store.bootstrap_tokens_with_id(partial) == [], partial


def test_never_expiring_and_listing_order(store: ncctl.Datastore) -> None:
    tokens = [ncctl.new_bootstrap_token() for _ in range(3)]
    for token in tokens:
        store.add_bootstrap_token(token, -1, single_use=True)
    rows = store.list_bootstrap_tokens()
    assert [r.token for r in rows] == tokens
    assert {r.expire_time for r in rows} == {ncctl.NEVER_EXPIRES}


def test_single_use_token_admits_once(store: ncctl.Datastore) -> None:
    token = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(token, 60, single_use=True)
    assert store.admit_node(token, "a" * 16) == ncctl.DEFAULT_NETWORK
    assert store.confirm_node("a" * 16)
    with pytest.raises(ncctl.BadRequest, match="already been used"):
        store.admit_node(token, "b" * 16)
    assert not store.node_token_exists("b" * 16)


def test_a_lost_join_is_retried_with_its_single_use_token(store: ncctl.Datastore) -> None:
    """A join whose reply was lost (never heard from) is superseded by the retry: the token
    stays unused until the retry's node confirms, the lost node's certificates go with it."""
    token = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(token, 60, single_use=True)
    lost = ncctl.CertRecord(0x10, "grpc", "2999-01-01T00:00:00+00:00")
    store.admit_node(token, "a" * 16, (lost,))
    assert store.node("a" * 16).pending
    assert store.bootstrap_tokens_with_id(ncctl.token_id(token))[0].uses == 0
    store.admit_node(token, "b" * 16)
    assert not store.node_token_exists("a" * 16) and store.cert_owner(0x10) is None
    assert not store.confirm_node("a" * 16), "the lost reply's node can never connect"
    assert store.confirm_node("b" * 16) and not store.node("b" * 16).pending
    assert store.bootstrap_tokens_with_id(ncctl.token_id(token))[0].uses == 1
    with pytest.raises(ncctl.BadRequest, match="already been used"):
        store.admit_node(token, "c" * 16)
    assert [n.token for n in store.nodes()] == ["b" * 16]


def test_unconfirmed_joins_are_reclaimed_and_count_for_nothing(store: ncctl.Datastore) -> None:
    token = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(token, 60, single_use=False)
    store.admit_node(token, "a" * 16)
    store.admit_node(token, "b" * 16)
    assert store.confirm_node("b" * 16)
    assert store.bootstrap_tokens_with_id(ncctl.token_id(token))[0].uses == 1, "only the node heard from counts"
    assert store.reclaim_unconfirmed_nodes(3600) == [], "a fresh join is left to arrive"
    assert store.reclaim_unconfirmed_nodes(-1) == ["a" * 16]
    assert [n.token for n in store.nodes()] == ["b" * 16]
    assert store.bootstrap_tokens_with_id(ncctl.token_id(token))[0].uses == 1


def test_single_use_token_under_concurrency_across_handles(stores: Stores) -> None:
    """Two replicas race for one single-use token, each node confirming at once: exactly one gets in."""
    first, second = stores.open(), stores.open()
    token = ncctl.new_bootstrap_token()
    first.add_bootstrap_token(token, 60, single_use=True)
    results: list[str] = []

    def join(store: ncctl.Datastore, node: str) -> None:
        try:
            store.admit_node(token, node)
            results.append("ok" if store.confirm_node(node) else "refused")
        except ncctl.BadRequest:
            results.append("refused")

    threads = [threading.Thread(target=join, args=(first if i % 2 else second, f"{i:016d}")) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["ok"] + ["refused"] * 7
    assert len(first.nodes()) == 1
    assert first.bootstrap_tokens_with_id(ncctl.token_id(token))[0].uses == 1


def test_multi_use_token_counts_uses(store: ncctl.Datastore) -> None:
    token = admitted(store, "a" * 16)
    store.admit_node(token, "b" * 16)
    assert store.bootstrap_tokens_with_id(ncctl.token_id(token))[0].uses == 1, "b not heard from yet"
    assert store.confirm_node("b" * 16) and store.confirm_node("b" * 16), "confirming twice counts once"
    assert store.bootstrap_tokens_with_id(ncctl.token_id(token))[0].uses == 2


def test_expired_unknown_and_sweep(store: ncctl.Datastore) -> None:
    token = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(token, 0, single_use=False)  # expires now
    with pytest.raises(ncctl.BadRequest, match="expired"):
        store.admit_node(token, "a" * 16)
    with pytest.raises(ncctl.BadRequest, match="unknown"):
        store.admit_node(ncctl.new_bootstrap_token(), "a" * 16)
    keep = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(keep, 60, single_use=False)
    assert store.delete_expired_bootstrap_tokens() == 1
    assert [r.token for r in store.list_bootstrap_tokens()] == [keep]


def test_duplicate_node_token_is_a_conflict(store: ncctl.Datastore) -> None:
    """The store's own exception, the same from both: no driver error leaks out."""
    token = admitted(store, "a" * 16)
    with pytest.raises(ncctl.Conflict, match="this node-token exists already"):
        store.admit_node(token, "a" * 16)
    assert store.bootstrap_tokens_with_id(ncctl.token_id(token))[0].uses == 1


def test_duplicate_bootstrap_token_is_a_conflict(store: ncctl.Datastore) -> None:
    token = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(token, 60, False)
    with pytest.raises(ncctl.Conflict, match="this bootstrap token exists already"):
        store.add_bootstrap_token(token, 5, True)
    [row] = store.list_bootstrap_tokens()
    assert (row.single_use, row.uses) == (False, 0), "the first one is left as it was"


def test_a_taken_address_is_a_conflict_too(store: ncctl.Datastore) -> None:
    """AddressTaken is a Conflict, and both are StoreErrors: a caller may catch either."""
    assert issubclass(ncctl.AddressTaken, ncctl.Conflict) and issubclass(ncctl.Conflict, ncctl.StoreError)
    admitted(store, "a" * 16)
    admitted(store, "b" * 16)
    store.bind("a" * 16, "10.1.0.2", None)
    with pytest.raises(ncctl.Conflict):
        store.bind("b" * 16, "10.1.0.2", None)


# -- the shared rules, kept by both stores -------------------------------------------


def test_token_lives_follow_the_one_rule(store: ncctl.Datastore) -> None:
    """Expiry is now + life in the stores' time format; over ten years is refused with the
    control plane's sentence; a negative life never expires."""
    before = ncctl.local_time(60 * 60)
    expire = store.add_bootstrap_token(ncctl.new_bootstrap_token(), 60, False)
    assert before <= expire <= ncctl.local_time(60 * 60)
    with pytest.raises(ncctl.BadRequest, match="over ten years; use a negative life for never"):
        store.add_bootstrap_token(ncctl.new_bootstrap_token(), ncctl.MAX_ADMIN_TOKEN_LIFE_MIN + 1, False)
    assert len(store.list_bootstrap_tokens()) == 1
    assert store.add_bootstrap_token(ncctl.new_bootstrap_token(), -5, False) == ncctl.NEVER_EXPIRES


def test_an_expired_multi_use_token_admits_nobody(store: ncctl.Datastore) -> None:
    token = admitted(store, "a" * 16)
    store.admit_node(token, "b" * 16)
    expired = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(expired, 0, False)
    for node in ("c" * 16, "d" * 16):
        with pytest.raises(ncctl.BadRequest, match="bootstrap token has expired"):
            store.admit_node(expired, node)
    assert store.bootstrap_tokens_with_id(ncctl.token_id(expired))[0].uses == 0


def test_a_refused_mint_is_not_counted(store: ncctl.Datastore) -> None:
    """The limit counts the node's mints of the last hour; a refused one adds neither a
    token nor a count, so a raised limit lets exactly one more through."""
    minter = "m" * 16
    for _ in range(2):
        store.add_bootstrap_token(ncctl.new_bootstrap_token(), 10, True, minted_by=minter, hourly_limit=2)
    for _ in range(3):
        with pytest.raises(ncctl.BadRequest, match=r"already minted 2 bootstrap token\(s\) in the last hour"):
            store.add_bootstrap_token(ncctl.new_bootstrap_token(), 10, True, minted_by=minter, hourly_limit=2)
    store.add_bootstrap_token(ncctl.new_bootstrap_token(), 10, True, minted_by=minter, hourly_limit=3)
    with pytest.raises(ncctl.BadRequest, match="already minted 3"):
        store.add_bootstrap_token(ncctl.new_bootstrap_token(), 10, True, minted_by=minter, hourly_limit=3)
    assert sum(row.minted_by == minter for row in store.list_bootstrap_tokens()) == 3
    store.add_bootstrap_token(ncctl.new_bootstrap_token(), 10, True, minted_by=minter)  # no limit: the admin's call


def test_mint_rate_limit(store: ncctl.Datastore) -> None:
    minter = "m" * 16
    for _ in range(3):
        store.add_bootstrap_token(ncctl.new_bootstrap_token(), 10, True, minted_by=minter, hourly_limit=3)
    with pytest.raises(ncctl.BadRequest, match="already minted 3"):
        store.add_bootstrap_token(ncctl.new_bootstrap_token(), 10, True, minted_by=minter, hourly_limit=3)
    store.add_bootstrap_token(ncctl.new_bootstrap_token(), 10, True, minted_by="n" * 16, hourly_limit=3)


def test_token_for_unknown_network_is_refused(store: ncctl.Datastore) -> None:
    with pytest.raises(ncctl.BadRequest, match="no network named 'nope'"):
        store.add_bootstrap_token(ncctl.new_bootstrap_token(), 10, True, network="nope")


# -- certificates ---------------------------------------------------------------


def test_cert_owner_and_switch(store: ncctl.Datastore) -> None:
    node = "a" * 16
    token = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(token, 60, False)
    store.admit_node(token, node, (CERT_A, CERT_B))
    assert store.cert_owner(CERT_A.serial) == (node, False)
    assert store.cert_owner(0xFFFF) is None
    renewed = ncctl.CertRecord(0xA3, "grpc", "2999-01-01T00:00:00+00:00")
    store.record_certs(node, (renewed,))
    assert store.has_older_live_certs(node, "grpc", renewed.serial)
    assert not store.has_older_live_certs(node, "network", CERT_B.serial)
    assert store.switch_to_cert(node, "grpc", renewed.serial) == 1
    assert store.cert_owner(CERT_A.serial) == (node, True)
    assert store.cert_owner(renewed.serial) == (node, False)
    assert not store.has_older_live_certs(node, "grpc", renewed.serial)
    assert store.switch_to_cert(node, "grpc", renewed.serial) == 0


def test_a_renewal_revokes_the_renewals_never_used(store: ncctl.Datastore) -> None:
    """Renewals the node never switched to are revoked by the next one: of each kind the
    certificate in use (the oldest live) and the newest stay, at most two."""
    node = "a" * 16
    token = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(token, 60, False)
    store.admit_node(token, node, (CERT_A, CERT_B))
    renewals = [
        (
            ncctl.CertRecord(0xC0 + 2 * i, "grpc", "2999-01-01T00:00:00+00:00"),
            ncctl.CertRecord(0xC1 + 2 * i, "network", "2999-01-01T00:00:00+00:00"),
        )
        for i in range(4)
    ]
    assert store.record_renewal(node, renewals[0]) == 0
    for renewal in renewals[1:]:
        assert store.record_renewal(node, renewal) == 2
    live = [r for r in (CERT_A, CERT_B, *sum(renewals, ())) if store.cert_owner(r.serial) == (node, False)]
    assert live == [CERT_A, CERT_B, *renewals[-1]]
    assert store.switch_to_cert(node, "grpc", renewals[-1][0].serial) == 1  # the one in use, once the node switches


def test_prune_expired_certs(store: ncctl.Datastore) -> None:
    old = ncctl.CertRecord(0xB1, "grpc", "2000-01-01T00:00:00+00:00")
    store.record_certs("a" * 16, (old, CERT_B))
    assert store.prune_expired_certs("2001-01-01T00:00:00+00:00") == 1
    assert store.cert_owner(old.serial) is None
    assert store.cert_owner(CERT_B.serial) is not None


# -- nodes and bindings ---------------------------------------------------------------


def test_bind_state_and_lru_order(store: ncctl.Datastore) -> None:
    nodes = [f"{i:016d}" for i in range(3)]
    for node in nodes:
        admitted(store, node)
    for i, node in enumerate(nodes):
        store.bind(node, f"10.1.0.{i + 2}", None, ncctl.STATE_INIT)
    assert store.node(nodes[1]).bind_ip == "10.1.0.3"
    assert store.node(nodes[1]).state == ncctl.STATE_INIT
    assert [r.token for r in store.bindings_oldest_first()] == nodes
    assert store.set_state(nodes[0], ncctl.STATE_CONNECTED)
    assert not store.set_state("z" * 16, ncctl.STATE_CONNECTED)
    assert store.node(nodes[0]).state == ncctl.STATE_CONNECTED
    assert [r.token for r in store.nodes()] == nodes


def test_bind_evicts_the_victim_whole(store: ncctl.Datastore) -> None:
    victim, winner = "v" * 16, "w" * 16
    store.add_bootstrap_token(ncctl.new_bootstrap_token(), 60, False)
    token = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(token, 60, False)
    store.admit_node(token, victim, (CERT_A,))
    store.add_bootstrap_token(ncctl.new_bootstrap_token(), 60, True, minted_by=victim)
    admitted(store, winner)
    store.bind(victim, "10.1.0.2", None)
    store.bind(winner, "10.1.0.2", victim, ncctl.STATE_INIT)
    assert store.node(victim) is None
    assert store.cert_owner(CERT_A.serial) is None
    assert all(r.minted_by != victim for r in store.list_bootstrap_tokens())
    assert store.node(winner).bind_ip == "10.1.0.2"


def test_an_address_is_bound_once(store: ncctl.Datastore) -> None:
    admitted(store, "a" * 16)
    admitted(store, "b" * 16)
    store.bind("a" * 16, "10.1.0.2", None)
    with pytest.raises(ncctl.AddressTaken):
        store.bind("b" * 16, "10.1.0.2", None)
    assert store.node("b" * 16).bind_ip == ""
    store.bind("a" * 16, "10.1.0.9", None)  # moving frees the old address
    store.bind("b" * 16, "10.1.0.2", None)
    with pytest.raises(ncctl.BadRequest, match="not registered"):
        store.bind("z" * 16, "10.1.0.5", None)


def test_delete_node_purges(store: ncctl.Datastore) -> None:
    node = "a" * 16
    token = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(token, 60, False)
    store.admit_node(token, node, (CERT_A,))
    store.bind(node, "10.1.0.2", None)
    assert store.delete_node(node)
    assert not store.delete_node(node)
    assert store.cert_owner(CERT_A.serial) is None
    admitted(store, "b" * 16)
    store.bind("b" * 16, "10.1.0.2", None)  # the address is free again


def test_reserved_node_and_reset_states(store: ncctl.Datastore) -> None:
    admitted(store, "a" * 16)
    store.bind("a" * 16, "10.1.0.1", None)
    assert store.ensure_reserved_node("10.1.0.1")
    assert not store.ensure_reserved_node("10.1.0.1")
    assert store.node(ncctl.RESERVED_NODE_TOKEN).bind_ip == "10.1.0.1"
    assert store.node("a" * 16).bind_ip == ""
    store.set_state("a" * 16, ncctl.STATE_CONNECTED)
    assert store.reset_states(ncctl.STATE_CONNECTED) == 1
    assert store.node("a" * 16).state == ncctl.STATE_IDLE
    assert store.node(ncctl.RESERVED_NODE_TOKEN).state == ncctl.STATE_CONNECTED


def test_concurrent_claims_across_handles_bind_no_address_twice(stores: Stores) -> None:
    """Two replicas' Bindings claim addresses for different nodes at once: every node
    gets an address and no address is bound twice, in the store or in the pools."""
    first, second = stores.open(), stores.open()
    nodes = [f"{i:016d}" for i in range(24)]
    for node in nodes:
        admitted(first, node)
    network = ncctl.ipaddress.IPv4Network("10.1.0.0/24")
    bindings = [ncctl.Bindings(first, network), ncctl.Bindings(second, network)]
    got: dict[str, str] = {}
    errors: list[BaseException] = []

    def claim(index: int) -> None:
        try:
            got[nodes[index]] = str(bindings[index % 2].claim(nodes[index]))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(nodes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(got.values())) == len(nodes)
    stored = {r.token: r.bind_ip for r in first.bindings_oldest_first()}
    assert stored == got


# -- networks -----------------------------------------------------------------


def test_node_names_are_unique_within_a_network(store: ncctl.Datastore) -> None:
    """A node takes the name it asks for, with a suffix when its network has it already
    (another network may have it too); it keeps it; a rename to a taken name is refused."""
    store.add_network(ncctl.NetworkSpec("ops", "10.8.0.0/16", True), "o" * 16)
    for token, network in (("a" * 16, ncctl.DEFAULT_NETWORK), ("b" * 16, ncctl.DEFAULT_NETWORK), ("c" * 16, "ops")):
        admitted(store, token, network=network)
    assert store.claim_node_name("a" * 16, "edge") == "edge"
    assert store.claim_node_name("a" * 16, "other") == "edge", "a node keeps its name"
    assert store.claim_node_name("b" * 16, "edge") == "edge-2"
    assert store.claim_node_name("c" * 16, "edge") == "edge", "names are per network"
    assert store.claim_node_name("d" * 16, "edge") == "", "no node, no name"
    assert [store.node(t).name for t in ("a" * 16, "b" * 16, "c" * 16)] == ["edge", "edge-2", "edge"]
    with pytest.raises(ncctl.BadRequest, match="is named 'edge'"):
        store.rename_node("b" * 16, "edge")
    store.rename_node("b" * 16, "gateway")
    store.rename_node("a" * 16, "edge")  # its own name again: no clash with itself
    assert store.node("b" * 16).name == "gateway"
    with pytest.raises(ncctl.BadRequest, match="cannot name a node"):
        store.rename_node("b" * 16, "Bad_Name")
    with pytest.raises(ncctl.BadRequest, match="not registered"):
        store.rename_node("d" * 16, "new")
    assert store.claim_node_name("b" * 16, "") == "gateway"


def test_networks(store: ncctl.Datastore) -> None:
    spec = ncctl.NetworkSpec("lab", "10.7.0.0/16", True)
    store.put_config_network(spec, "t" * 16)
    store.put_config_network(ncctl.NetworkSpec("lab", "10.7.0.0/16", False), "u" * 16)
    store.add_network(ncctl.NetworkSpec("ops", "10.8.0.0/16", True), "o" * 16)
    with pytest.raises(ncctl.BadRequest, match="already exists"):
        store.add_network(ncctl.NetworkSpec("ops", "10.9.0.0/16", True), "p" * 16)
    rows = store.networks()
    assert [(r.name, r.interconnection, r.net_token, r.from_config) for r in rows] == [
        ("lab", False, "t" * 16, True),
        ("ops", True, "o" * 16, False),
    ]
    assert rows[0].id < rows[1].id
    store.forget_config_network("lab")
    assert not store.networks()[0].from_config
    admitted(store, "a" * 16, network="ops")
    assert store.node_tokens_in("ops") == ["a" * 16]
    assert store.delete_network("ops") == ["a" * 16]
    assert not store.node_token_exists("a" * 16)
    with pytest.raises(ncctl.BadRequest, match="no network named"):
        store.delete_network("ops")


def test_deleting_a_network_of_many_nodes(store: ncctl.Datastore) -> None:
    """More nodes than one etcd Txn may touch: every node, certificate and token goes."""
    store.add_network(ncctl.NetworkSpec("big", "10.9.0.0/16", True), "b" * 16)
    nodes = [f"{i:016d}" for i in range(40)]
    for i, node in enumerate(nodes):
        token = ncctl.new_bootstrap_token()
        store.add_bootstrap_token(token, 60, True, network="big")
        store.admit_node(token, node, (ncctl.CertRecord(0x1000 + i, "grpc", "2999-01-01T00:00:00+00:00"),))
        store.bind(node, f"10.9.0.{i + 2}", None)
    store.add_bootstrap_token(ncctl.new_bootstrap_token(), 60, False, network="big")
    assert sorted(store.delete_network("big")) == nodes
    assert store.nodes() == [] and store.list_bootstrap_tokens() == [] and store.networks() == []
    assert all(store.cert_owner(0x1000 + i) is None for i in range(40))


def test_etcd_over_mutual_tls(tmp_path: Path) -> None:
    """https endpoints: the store presents datastoreCertFile/KeyFile and checks etcd
    against datastoreCAFile; without a client certificate etcd refuses it."""
    authority = ncctl.CertAuthority(tmp_path / "ca", "etcd test")
    authority.load_or_create()
    files = {}
    for name, kind in (("server", {"server": True, "ips": ("127.0.0.1",)}), ("client", {"client": True})):
        pair, _ = authority.issue(f"etcd-{name}", **kind)
        files[name] = (tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        files[name][0].write_bytes(pair.cert_pem)
        files[name][1].write_bytes(pair.key_pem)
    member = LocalEtcd(tmp_path / "etcd", (authority.ca_path, *files["server"]))
    try:
        tls = ncctl.EtcdTls(str(authority.ca_path), str(files["client"][0]), str(files["client"][1]))
        store = ncctl.EtcdStore(member.endpoint, CLUSTER_TOKEN, tls)
        try:
            admitted(store, "a" * 16)
            assert [r.token for r in store.nodes()] == ["a" * 16]
        finally:
            store.close()
        with pytest.raises(ncctl.StoreError, match=r"etcd at https://127\.0\.0\.1"):
            ncctl.EtcdStore(member.endpoint, CLUSTER_TOKEN, ncctl.EtcdTls(str(authority.ca_path)))
    finally:
        member.stop()


# -- leading and following ------------------------------------------------------------


def reserved_ip(store: ncctl.Datastore) -> str:
    row = store.node(ncctl.RESERVED_NODE_TOKEN)
    return row.bind_ip if row is not None else ""


def test_shared_says_whether_others_write(stores: Stores) -> None:
    assert stores.open().shared is (stores.kind == "etcd")


def test_a_follower_makes_no_leader_only_write(stores: Stores) -> None:
    """A store leads from opening; after follow() its leader-only writes (the reserved
    node, the sweep) raise NotLeader and change nothing, while every other write works;
    after lead() they commit again."""
    store = stores.open()
    assert store.leads
    assert store.ensure_reserved_node("10.1.0.1")
    expired = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(expired, 0, False)
    store.follow()
    assert not store.leads
    with pytest.raises(ncctl.NotLeader):
        store.ensure_reserved_node("10.1.0.9")
    with pytest.raises(ncctl.NotLeader):
        store.delete_expired_bootstrap_tokens()
    assert reserved_ip(store) == "10.1.0.1"
    assert [r.token for r in store.list_bootstrap_tokens()] == [expired]
    admitted(store, "a" * 16)  # everything else is any replica's
    store.lead(stores.campaign(store))
    assert store.leads
    assert store.ensure_reserved_node("10.1.0.9")
    assert store.delete_expired_bootstrap_tokens() == 1
    assert reserved_ip(store) == "10.1.0.9"


def test_following_is_per_handle(stores: Stores) -> None:
    """One replica following does not stop another that leads."""
    follower, leader = stores.open(), stores.open()
    follower.follow()
    leader.lead(stores.campaign(leader))
    assert leader.ensure_reserved_node("10.1.0.1")
    with pytest.raises(ncctl.NotLeader):
        follower.ensure_reserved_node("10.1.0.2")
    assert reserved_ip(follower) == "10.1.0.1"


def test_etcd_a_lost_fence_stops_leader_only_writes(etcd: LocalEtcd) -> None:
    """On etcd the fence is checked in the Txn: once the campaign key is gone (the lease
    expired, another replica won), a leader-only write raises NotLeader and writes nothing."""
    stores = Stores("etcd", Path("/nonexistent"), etcd)
    store = stores.open()
    try:
        fence = stores.campaign(store)
        store.lead(fence)
        assert store.ensure_reserved_node("10.1.0.1")
        store.etcd.txn([], [store.etcd.delete_op(fence[0])])
        with pytest.raises(ncctl.NotLeader, match="lost the leadership"):
            store.ensure_reserved_node("10.1.0.2")
        assert reserved_ip(store) == "10.1.0.1"
        stores.campaign(store)  # a new campaign key: a later revision, not this handle's fence
        with pytest.raises(ncctl.NotLeader):
            store.ensure_reserved_node("10.1.0.2")
    finally:
        store.close()


def test_etcd_snapshot_loads_into_an_empty_etcd_whole(etcd: LocalEtcd) -> None:
    """`nc adm backup` on replicas: nc's keys at one revision, without leased ones (a
    replica's heartbeat); `nc adm restore` puts them back into an emptied etcd (the MACs
    are bound to the key names, so to the same prefix) and refuses one that holds nc's keys."""
    stores = Stores("etcd", Path("/nonexistent"), etcd)
    source = stores.open()
    prefix = source.etcd.prefix
    try:
        admitted(source, "a" * 16)
        before = source.node("a" * 16)
        lease = source.etcd.grant(30)
        source.etcd.txn([], [source.etcd.put_op(source.etcd.key("replica", "x"), b"{}", lease=lease)])
        pairs = ncctl.etcd_snapshot(source.etcd)
        assert pairs and all(key.startswith(prefix) for key, _ in pairs)
        assert source.etcd.key("replica", "x") not in dict(pairs)
        source.etcd.txn([], [source.etcd.delete_op(prefix, whole_prefix=True)])  # the lost cluster
    finally:
        source.close()
    empty = ncctl.Etcd(etcd.endpoint, prefix=prefix.decode())  # no store opened on it yet
    try:
        assert ncctl.etcd_load(empty, pairs) == len(pairs)
        restored = ncctl.EtcdStore(etcd.endpoint, CLUSTER_TOKEN, prefix=prefix.decode())
        try:
            assert restored.node("a" * 16) == before
        finally:
            restored.close()
        with pytest.raises(ncctl.StoreError, match="only into an empty one"):
            ncctl.etcd_load(empty, pairs)
    finally:
        empty.close()


def test_a_pending_join_stays_pending_through_a_migration_into_etcd(etcd: LocalEtcd, tmp_path: Path) -> None:
    """`nc adm datastore migrate`: a join not yet heard from keeps counting for nothing, and a
    retry with its single-use token still supersedes it, on etcd as it would have on sqlite."""
    source = ncctl.Store(str(tmp_path / "nc.db"))
    target = ncctl.EtcdStore(etcd.endpoint, CLUSTER_TOKEN, prefix=f"/nc-test-{secrets.token_hex(4)}/")
    try:
        token = ncctl.new_bootstrap_token()
        source.add_bootstrap_token(token, 60, single_use=True)
        source.admit_node(token, "a" * 16)
        target.import_store(source)
        assert target.node("a" * 16).pending
        assert target.bootstrap_tokens_with_id(ncctl.token_id(token))[0].uses == 0
        target.admit_node(token, "b" * 16)
        assert not target.node_token_exists("a" * 16)
        assert target.confirm_node("b" * 16)
        assert target.bootstrap_tokens_with_id(ncctl.token_id(token))[0].uses == 1
    finally:
        source.close()
        target.close()
