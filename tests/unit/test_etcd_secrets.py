"""What etcd holds for replicas, read as an attacker with access to etcd would: no usable
secret (bootstrap tokens under keyed hashes, net-tokens sealed), no record accepted
without its MAC, and a layout-1 tree migrated in place (resumably) with every node,
address, certificate and token kept.

A single-member etcd on loopback; each test writes under its own key prefix, reading
and writing raw keys with the store's own Etcd client."""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_member import LocalEtcd

import ncctl

CLUSTER_TOKEN = "the-replicas-shared-secret"
LAYOUT1 = json.loads((Path(__file__).resolve().parents[1] / "data" / "etcd_layout1.json").read_text())
CERT = ncctl.CertRecord(0xC1, "grpc", "2999-01-01T00:00:00+00:00")


class Tree:
    """One key prefix of the etcd: stores opened on it, and its raw keys and values."""

    def __init__(self, etcd: LocalEtcd) -> None:
        self.prefix = f"/nc-test-{secrets.token_hex(4)}/"
        self.endpoint = etcd.endpoint
        self.raw = ncctl.Etcd(etcd.endpoint, prefix=self.prefix)
        self.opened: list[ncctl.EtcdStore] = []

    def open(self, cluster_token: str = CLUSTER_TOKEN) -> ncctl.EtcdStore:
        store = ncctl.EtcdStore(self.endpoint, cluster_token, prefix=self.prefix)
        self.opened.append(store)
        return store

    def put(self, name: str, value: bytes) -> None:
        self.raw.txn([], [self.raw.put_op(self.raw.key(name), value)])

    def get(self, name: str) -> bytes | None:
        kv = self.raw.get(self.raw.key(name))
        return None if kv is None else kv.value

    def everything(self) -> list[tuple[bytes, bytes]]:
        """Every (key, value) under the prefix, as anyone with read access sees them."""
        return [(kv.key, kv.value) for kv in self.raw.range(self.prefix.encode()).kvs]

    def load_layout1(self) -> None:
        for entry in LAYOUT1["keys"]:
            value = base64.b64decode(entry["base64"]) if "base64" in entry else json.dumps(entry["json"]).encode()
            self.put(entry["key"], value)

    def close(self) -> None:
        for store in self.opened:
            store.close()
        self.raw.close()


@pytest.fixture
def tree(etcd: LocalEtcd) -> Iterator[Tree]:
    the_tree = Tree(etcd)
    try:
        yield the_tree
    finally:
        the_tree.close()


def assert_no_secret_in(tree: Tree, secrets_: list[str]) -> None:
    for key, value in tree.everything():
        for secret in secrets_:
            assert secret.encode() not in key + value, (key, value)


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "has no valid MAC" in r.getMessage()]


# -- no usable secret ---------------------------------------------------------------------


def test_etcd_holds_no_bootstrap_token_or_net_token_yet_the_admin_lists_them(tree: Tree) -> None:
    store = tree.open()
    store.put_config_network(ncctl.NetworkSpec("default", "10.1.0.0/16", True), ncctl.random_token())
    net_token = ncctl.random_token()
    store.add_network(ncctl.NetworkSpec("lab", "10.9.0.0/24", True), net_token)
    admin_token, lab_token, minted = (ncctl.new_bootstrap_token() for _ in range(3))
    store.add_bootstrap_token(admin_token, -1, False)
    store.add_bootstrap_token(lab_token, 60, True, "lab")
    store.admit_node(lab_token, "a" * 16, (CERT,))
    store.bind("a" * 16, "10.9.0.2", None)
    store.add_bootstrap_token(minted, 60, True, "lab", minted_by="a" * 16, hourly_limit=3)
    tokens = [admin_token, lab_token, minted]
    assert_no_secret_in(tree, [*tokens, *(t.split(".")[1] for t in tokens), net_token])
    for key, value in tree.everything():
        assert "mac" in json.loads(value), key  # every record is authenticated
    # What the admin and the replicas need still reads back whole.
    assert [row.token for row in store.list_bootstrap_tokens()] == tokens
    assert [row.token for row in store.bootstrap_tokens_with_id(ncctl.token_id(minted))] == [minted]
    assert {row.name: row.net_token for row in store.networks()}["lab"] == net_token
    assert tree.open().node("a" * 16).bind_ip == "10.9.0.2"  # another replica reads it too


def test_another_cluster_token_reads_nothing_and_refuses_to_start(tree: Tree) -> None:
    store = tree.open()
    store.add_bootstrap_token(ncctl.new_bootstrap_token(), -1, False)
    with pytest.raises(ncctl.ConfigError, match="clusterToken does not authenticate"):
        tree.open("another-cluster-secret")


# -- no forged record -------------------------------------------------------------------


def test_a_forged_token_key_admits_no_join_and_is_logged_once(tree: Tree, caplog: pytest.LogCaptureFixture) -> None:
    """A key put straight into etcd, as layout 1 named tokens or under the id with a made-up
    hash: neither admits a node, neither is listed, each is logged once, by id only."""
    caplog.set_level(logging.WARNING, logger="nc")
    store = tree.open()
    forged = ncctl.new_bootstrap_token()
    public, secret = forged.split(".")
    value = {"expire_time": ncctl.NEVER_EXPIRES, "create_time": "2026-01-01 00:00:00", "update_time": ""}
    value.update(single_use=False, uses=0, network="default", minted_by="")
    tree.put(f"token/{forged}", json.dumps(value).encode())
    tree.put(f"token/{public}/{'0' * 64}", json.dumps({**value, "mac": "1" * 64, "sealed": ""}).encode())
    for _ in range(3):
        with pytest.raises(ncctl.BadRequest, match="unknown"):
            store.admit_node(forged, "f" * 16)
        assert store.bootstrap_tokens_with_id(public) == []
    assert store.list_bootstrap_tokens() == [] and store.node("f" * 16) is None
    lines = refusal_lines(caplog)
    assert len(lines) == 2, lines
    assert any(f"/token/{public} has no valid MAC" in line for line in lines), lines
    assert all(secret not in line for line in lines)


def test_a_value_moved_to_another_key_or_edited_is_refused(tree: Tree, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nc")
    store = tree.open()
    used = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(used, -1, True)
    store.admit_node(used, "a" * 16, (CERT,))
    forever = ncctl.new_bootstrap_token()
    store.add_bootstrap_token(forever, -1, False)
    node_value = tree.get(f"node/{'a' * 16}")
    tree.put(f"node/{'b' * 16}", node_value)  # a second node under a copied record
    tree.put(f"cert/{ncctl.serial_key(0xC2)}", tree.get(f"cert/{ncctl.serial_key(0xC1)}"))  # another serial
    used_key = store._token_key(used).decode()[len(tree.prefix) :]
    forever_key = store._token_key(forever).decode()[len(tree.prefix) :]
    tree.put(used_key, tree.get(forever_key))  # the used single-use token made multi-use
    assert store.node("b" * 16) is None and not store.node_token_exists("b" * 16)
    assert store.cert_owner(0xC2) is None and store.cert_owner(0xC1) == ("a" * 16, False)
    with pytest.raises(ncctl.BadRequest, match="unknown"):
        store.admit_node(used, "c" * 16)
    edited = json.loads(tree.get(forever_key))
    tree.put(forever_key, json.dumps({**edited, "network": "elsewhere"}).encode())  # MAC kept, value changed
    with pytest.raises(ncctl.BadRequest, match="unknown"):
        store.admit_node(forever, "d" * 16)
    assert [r.token for r in store.nodes()] == ["a" * 16]
    assert len(refusal_lines(caplog)) >= 4


def test_many_forged_records_cost_a_few_log_lines(tree: Tree, caplog: pytest.LogCaptureFixture) -> None:
    """Thirty forged node keys read again and again: one line per key at most, and no
    more than REFUSED_LOG_BURST lines in a minute; the records are counted all the same."""
    caplog.set_level(logging.WARNING, logger="nc")
    store = tree.open()
    for i in range(30):
        tree.put(f"node/{i:016d}", b'{"state": 0, "bind_ip": "", "network": "default"}')
    for _ in range(5):
        assert store.nodes() == []
    assert len(refusal_lines(caplog)) == ncctl.REFUSED_LOG_BURST
    assert store.records.refused == 150


# -- layout 1, migrated in place -------------------------------------------------------------


def assert_layout1_kept(tree: Tree, store: ncctl.EtcdStore) -> None:
    """Everything the layout-1 tree held, as the new layout serves it; no secret left in etcd."""
    tokens, net_tokens = LAYOUT1["bootstrapTokens"], LAYOUT1["netTokens"]
    assert json.loads(tree.get("layout"))["version"] == ncctl.ETCD_LAYOUT_VERSION
    assert_no_secret_in(tree, [*tokens.values(), *net_tokens.values()])
    nodes = {row.token: row for row in store.nodes()}
    for node, ip in LAYOUT1["nodes"].items():
        assert nodes[node].bind_ip == ip
    assert nodes["nodebbbbbbbbbbbb"].network == "lab"
    assert store.cert_owner(0xA1) == ("nodeaaaaaaaaaaaa", False) and store.cert_owner(0xB1)[0] == "nodebbbbbbbbbbbb"
    assert store.is_legacy_node(LAYOUT1["legacyNode"])
    assert {row.name: row.net_token for row in store.networks()} == net_tokens
    listed = {row.token: row for row in store.list_bootstrap_tokens()}
    assert set(listed) == set(tokens.values())
    assert listed[tokens["mintedByB"]].minted_by == "nodebbbbbbbbbbbb"
    with pytest.raises(ncctl.BadRequest, match="already been used"):
        store.admit_node(tokens["singleUsed"], "x" * 16)
    assert store.admit_node(tokens["forever"], "y" * 16) == "default"
    assert store.admit_node(tokens["lab"], "z" * 16) == "lab"
    with pytest.raises(ncctl.AddressTaken):
        store.bind("y" * 16, "10.1.0.2", None)  # still nodeaaaa's


def test_a_layout1_tree_is_migrated_in_place(tree: Tree, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nc")
    tree.load_layout1()
    store = tree.open(LAYOUT1["clusterToken"])
    assert any("migrating key layout 1 to 2" in r.getMessage() for r in caplog.records)
    assert refusal_lines(caplog) == []
    assert_layout1_kept(tree, store)
    before = tree.everything()
    tree.open(LAYOUT1["clusterToken"])  # the next replica finds nothing to do
    assert tree.everything() == before


def test_an_interrupted_migration_is_finished_by_the_next_start(
    tree: Tree, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed after some families were rewritten: older builds already refuse the tree,
    and the next start rewrites the rest and keeps what was done."""
    tree.load_layout1()
    monkeypatch.setattr(ncctl, "LAYOUT_RECORD_FAMILIES", ("token", "node"))
    real_put = ncctl.EtcdLayout._put

    def killed_before_the_end(layout: ncctl.EtcdLayout, value: dict, mod_revision: int) -> bool:
        if not value.get("migrating"):
            raise RuntimeError("killed")
        return real_put(layout, value, mod_revision)

    monkeypatch.setattr(ncctl.EtcdLayout, "_put", killed_before_the_end)
    with pytest.raises(RuntimeError, match="killed"):
        tree.open(LAYOUT1["clusterToken"])
    layout = json.loads(tree.get("layout"))
    assert layout["version"] == 2 and layout["migrating"]  # what an older build reads: newer, refused
    assert json.loads(tree.get("addr/default/10.1.0.2")) == {"token": "nodeaaaaaaaaaaaa"}  # not rewritten yet
    monkeypatch.undo()
    caplog.set_level(logging.WARNING, logger="nc")
    store = tree.open(LAYOUT1["clusterToken"])
    assert "migrating" not in json.loads(tree.get("layout"))
    assert refusal_lines(caplog) == []
    assert_layout1_kept(tree, store)


def test_replicas_starting_together_on_a_layout1_tree_migrate_it_once(tree: Tree) -> None:
    """Each may find the other's work half done: neither takes it for a rolled-back layout."""
    tree.load_layout1()
    opened: list[object] = []

    def start() -> None:
        try:
            opened.append(tree.open(LAYOUT1["clusterToken"]))
        except BaseException as e:
            opened.append(e)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(store, ncctl.EtcdStore) for store in opened), opened
    assert_layout1_kept(tree, opened[0])


def test_a_replica_that_finds_the_migration_done_meanwhile_joins_in(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It read layout 1; before it looked further, another replica migrated the tree and
    put its heartbeat: neither is an objection, the layout key moved on."""
    tree.load_layout1()
    real_begin = ncctl.EtcdLayout._begin

    def another_replica_first(layout: ncctl.EtcdLayout, mod_revision: int) -> None:
        monkeypatch.setattr(ncctl.EtcdLayout, "_begin", real_begin)
        tree.open(LAYOUT1["clusterToken"])
        tree.put("replica/198.18.0.1", b'{"address": "198.18.0.1"}')
        real_begin(layout, mod_revision)

    monkeypatch.setattr(ncctl.EtcdLayout, "_begin", another_replica_first)
    assert_layout1_kept(tree, tree.open(LAYOUT1["clusterToken"]))


def test_a_layout1_tree_is_not_migrated_with_another_cluster_token(tree: Tree) -> None:
    tree.load_layout1()
    before = tree.everything()
    with pytest.raises(ncctl.ConfigError, match="clusterToken does not open the PKI"):
        tree.open("another-cluster-secret")
    assert tree.everything() == before


def test_a_layout1_tree_waits_for_older_replicas_to_stop(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree.load_layout1()
    tree.put("replica/198.18.0.2", b'{"address": "198.18.0.2"}')
    monkeypatch.setattr(ncctl, "OLDER_REPLICAS_WAIT_S", 0.5)
    with pytest.raises(ncctl.StoreError, match=r"replica\(s\) 198.18.0.2 of an older nc still run"):
        tree.open(LAYOUT1["clusterToken"])
    assert json.loads(tree.get("layout")) == {"version": 1}


def test_a_newer_or_rolled_back_layout_is_refused(tree: Tree) -> None:
    tree.load_layout1()
    tree.open(LAYOUT1["clusterToken"])
    tree.put("layout", b'{"version": 1}')  # rolled back by someone who can write to etcd
    with pytest.raises(ncctl.StoreError, match="records of layout 2 are there"):
        tree.open(LAYOUT1["clusterToken"])
    tree.put("layout", b'{"version": 3}')
    with pytest.raises(ncctl.StoreError, match="key layout 3 is newer than this nc knows"):
        tree.open(LAYOUT1["clusterToken"])
