"""The address pool (section 4 of ncctl.py): AddressPool as a hypothesis state
machine against a plain model, and Bindings over a real sqlite Store."""

from __future__ import annotations

import ipaddress
import random
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import ncctl

PREFIXES = ["10.0.0.0/8", "172.16.0.0/16", "10.1.1.0/24", "10.9.9.0/29", "10.9.9.0/30"]


def host_addresses(network: ipaddress.IPv4Network) -> set[int]:
    """What a node may get: every host address but the server's (the first)."""
    return set(range(int(network.network_address) + 2, int(network.broadcast_address)))


def assert_node_address(network: ipaddress.IPv4Network, ip: ipaddress.IPv4Address) -> None:
    assert ip in network, f"{ip} is outside {network}"
    assert ip != network.network_address, f"{ip} is the network address"
    assert ip != network.broadcast_address, f"{ip} is the broadcast address"
    assert ip != network.network_address + 1, f"{ip} is the server's address"


# -- AddressPool against a model ------------------------------------------------------------------


class PoolMachine(RuleBasedStateMachine):
    """Random bind / connect / go-idle / release sequences; the model says which
    address is free and which token is the longest idle."""

    network: ClassVar[ipaddress.IPv4Network]

    def __init__(self) -> None:
        super().__init__()
        self.pool = ncctl.AddressPool(self.network)
        self.bound: dict[str, int] = {}
        self.idle: list[str] = []  # oldest first
        self.serial = 0
        self.hosts = int(self.network.broadcast_address) - int(self.network.network_address) - 2

    def new_token(self) -> str:
        self.serial += 1
        return f"node{self.serial:012d}"

    @initialize(data=st.data(), count=st.integers(0, 4))
    def load_from_store(self, data: st.DataObject, count: int) -> None:
        """Bindings loaded at start: idle ones join the LRU order in load order."""
        first, last = int(self.network.network_address) + 2, int(self.network.broadcast_address) - 1
        for _ in range(min(count, self.hosts)):
            value = data.draw(st.integers(first, last).filter(lambda v: v not in self.bound.values()), label="ip")
            idle = data.draw(st.booleans(), label="idle")
            token = self.new_token()
            assert self.pool.load(token, ipaddress.IPv4Address(value), idle)
            self.bound[token] = value
            if idle:
                self.idle.append(token)
        # Outside the range, or taken: refused.
        assert not self.pool.load(self.new_token(), self.network.network_address + 1, True)
        assert not self.pool.load(self.new_token(), self.network.broadcast_address, True)
        for token, value in list(self.bound.items())[:1]:
            assert not self.pool.load(self.new_token(), ipaddress.IPv4Address(value), True)
            assert not self.pool.load(token, ipaddress.IPv4Address(first if value != first else last), True)

    @rule()
    def bind_new_node(self) -> None:
        token = self.new_token()
        free = self.hosts - len(self.bound)
        if free == 0 and not self.idle:
            with pytest.raises(ncctl.PoolExhausted):
                self.pool.choose()
            return
        ip, victim = self.pool.choose()
        assert_node_address(self.network, ip)
        if free > 0:
            assert victim is None, "a victim was chosen while addresses were free"
            assert int(ip) not in self.bound.values(), f"{ip} handed out twice"
        else:
            assert victim == self.idle[0], f"victim {victim}, but {self.idle[0]} is idle longest"
            assert int(ip) == self.bound[victim]
        self.pool.assign(token, ip, victim)
        if victim is not None:
            del self.bound[victim]
            self.idle.remove(victim)
        self.bound[token] = int(ip)
        self.idle.append(token)  # bound, not connected yet

    @rule(data=st.data())
    def connect(self, data: st.DataObject) -> None:
        if self.bound:
            token = data.draw(st.sampled_from(sorted(self.bound)), label="connects")
            self.pool.mark_connected(token)
            if token in self.idle:
                self.idle.remove(token)

    @rule(data=st.data())
    def go_idle(self, data: st.DataObject) -> None:
        if self.bound:
            token = data.draw(st.sampled_from(sorted(self.bound)), label="goes idle")
            self.pool.mark_idle(token)
            if token in self.idle:
                self.idle.remove(token)
            self.idle.append(token)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if self.bound:
            token = data.draw(st.sampled_from(sorted(self.bound)), label="released")
            self.pool.release(token)
            del self.bound[token]
            if token in self.idle:
                self.idle.remove(token)

    @rule()
    def unknown_tokens_change_nothing(self) -> None:
        self.pool.release("never-bound")
        self.pool.mark_idle("never-bound")
        self.pool.mark_connected("never-bound")

    @invariant()
    def pool_matches_model(self) -> None:
        assert len(self.pool) == len(self.bound)
        assert self.pool.tokens() == set(self.bound)
        assert len(set(self.bound.values())) == len(self.bound)
        for token, value in self.bound.items():
            ip = ipaddress.IPv4Address(value)
            assert self.pool.ip_of(token) == ip
            assert self.pool.token_of(ip) == token
            assert_node_address(self.network, ip)


def machine_for(prefix: str) -> type[PoolMachine]:
    return type(f"PoolMachine_{prefix}", (PoolMachine,), {"network": ipaddress.IPv4Network(prefix)})


@pytest.mark.parametrize("prefix", PREFIXES)
def test_pool_state_machine(prefix: str) -> None:
    """Any sequence of operations: valid, unique addresses; longest-idle victim only when full."""
    run_state_machine_as_test(
        machine_for(prefix), settings=settings(max_examples=150, stateful_step_count=60, deadline=None)
    )


@pytest.mark.parametrize("prefix", ["172.16.0.0/16", "10.1.1.0/24", "10.9.9.0/29", "10.9.9.0/30"])
def test_filling_the_pool_hands_out_every_node_address_once(prefix: str) -> None:
    """Binding until full gives each host address but the server's exactly once, then reclaims."""
    network = ipaddress.IPv4Network(prefix)
    pool = ncctl.AddressPool(network)
    assert pool.capacity == len(host_addresses(network))
    given: list[int] = []
    for n in range(pool.capacity):
        ip, victim = pool.choose()
        assert victim is None
        pool.assign(f"t{n}", ip, None)
        given.append(int(ip))
    assert len(given) == len(set(given)) and set(given) == host_addresses(network)
    ip, victim = pool.choose()
    assert victim == "t0" and int(ip) == given[0], "full pool must reclaim the longest-idle binding"


def test_a_slash_8_pool_costs_nothing_up_front_and_skips_reserved_addresses() -> None:
    """A /8 pool allocates lazily, hands out unique node addresses, and never the broadcast one."""
    network = ipaddress.IPv4Network("10.0.0.0/8")
    tracemalloc.start()
    try:
        pool = ncctl.AddressPool(network)
        pool.choose()
        assert tracemalloc.get_traced_memory()[1] < 256 * 1024, "a /8 pool must not enumerate its addresses"
    finally:
        tracemalloc.stop()
    assert pool.capacity == 2**24 - 3
    seen = set()
    for n in range(5_000):
        ip, victim = pool.choose()
        assert victim is None
        assert_node_address(network, ip)
        pool.assign(f"t{n}", ip, None)
        seen.add(ip)
    assert len(seen) == 5_000
    # Bindings loaded from the store at the top of the range do not push the pool past it.
    last = network.broadcast_address - 1
    assert pool.load("top", last, idle=False)
    assert not pool.load("bcast", network.broadcast_address, idle=True)
    assert pool.choose()[0] not in (last, network.broadcast_address)


def full_pool(prefix: str = "10.9.9.0/29") -> tuple[ncctl.AddressPool, list[str]]:
    pool = ncctl.AddressPool(ipaddress.IPv4Network(prefix))
    tokens = [f"n{i}" for i in range(pool.capacity)]
    for token in tokens:
        ip, victim = pool.choose()
        assert victim is None
        pool.assign(token, ip, None)
        pool.mark_connected(token)
    return pool, tokens


def test_victim_is_the_first_node_marked_idle_never_a_connected_one() -> None:
    """With /29 full, reclaim takes idle nodes in the order they went idle, then refuses."""
    pool, tokens = full_pool()
    with pytest.raises(ncctl.PoolExhausted):
        pool.choose()
    order = [tokens[2], tokens[0], tokens[4]]
    for token in order:
        pool.mark_idle(token)
    connected = {tokens[1], tokens[3]}
    for n, expected in enumerate(order):
        ip, victim = pool.choose()
        assert victim == expected and ip == pool.ip_of(expected)
        pool.assign(f"new{n}", ip, victim)
        pool.mark_connected(f"new{n}")
        assert pool.ip_of(expected) is None
    assert all(pool.ip_of(t) is not None for t in connected)
    with pytest.raises(ncctl.PoolExhausted):
        pool.choose()


def test_going_idle_again_moves_a_node_to_the_back_of_the_line() -> None:
    """A node that reconnects and goes idle later is no longer the longest idle."""
    pool, tokens = full_pool()
    pool.mark_idle(tokens[0])
    pool.mark_idle(tokens[1])
    pool.mark_connected(tokens[0])
    pool.mark_idle(tokens[0])
    assert pool.choose()[1] == tokens[1]


def test_loaded_idle_bindings_keep_their_load_order() -> None:
    """After a restart the store's LRU order (load order) decides the victim; connected ones are safe."""
    network = ipaddress.IPv4Network("10.9.9.0/29")
    pool = ncctl.AddressPool(network)
    rows = [("c", 6, False), ("b", 3, True), ("a", 2, False), ("e", 5, True), ("d", 4, True)]
    for token, last_octet, idle in rows:
        assert pool.load(token, network.network_address + last_octet, idle)
    for expected in ("b", "e", "d"):
        ip, victim = pool.choose()
        assert victim == expected
        pool.assign("new-" + expected, ip, victim)
        pool.mark_connected("new-" + expected)
    with pytest.raises(ncctl.PoolExhausted):
        pool.choose()


@pytest.mark.parametrize("prefix", ["10.9.9.0/30", "10.9.9.0/29", "10.1.1.0/24"])
def test_release_makes_the_address_reusable(prefix: str) -> None:
    """When every node is connected the pool is exhausted; releasing one frees exactly its address."""
    pool, tokens = full_pool(prefix)
    with pytest.raises(ncctl.PoolExhausted):
        pool.choose()
    gone = tokens[len(tokens) // 2]
    freed = pool.ip_of(gone)
    pool.release(gone)
    assert pool.ip_of(gone) is None and pool.token_of(freed) is None
    assert pool.choose() == (freed, None)
    pool.assign("newcomer", freed, None)
    assert pool.token_of(freed) == "newcomer"


# -- Bindings over a real Store ------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ncctl.Store]:
    the_store = ncctl.Store(str(tmp_path / "nc.db"))
    the_store.add_bootstrap_token("abcdef.0123456789abcdef", -1, False)
    try:
        yield the_store
    finally:
        the_store.close()


def register(store: ncctl.Store, count: int) -> list[str]:
    """Admit count nodes the way a join does; returns their node-tokens."""
    tokens = []
    for _ in range(count):
        token = ncctl.random_token()
        store.admit_node("abcdef.0123456789abcdef", token)
        tokens.append(token)
    return tokens


def assert_pool_matches_store(bindings: ncctl.Bindings, store: ncctl.Store) -> dict[str, str]:
    rows = {row.token: row.bind_ip for row in store.nodes() if row.bind_ip}
    assert len(set(rows.values())) == len(rows), "two nodes share an address in the database"
    assert {t: str(bindings.pool.ip_of(t)) for t in bindings.pool.tokens()} == rows
    for ip in rows.values():
        assert_node_address(bindings.network, ipaddress.IPv4Address(ip))
    return rows


def run_threads(count: int, work: object) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def body(n: int) -> None:
        try:
            start.wait()
            work(n)  # type: ignore[operator]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=body, args=(n,), name=f"worker-{n}") for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, f"workers failed: {errors!r}"


def test_concurrent_claims_give_unique_addresses_that_match_the_database(store: ncctl.Store) -> None:
    """Many threads asking for the same and different tokens at once: one address per token, as stored."""
    network = ipaddress.IPv4Network("10.1.1.0/24")
    bindings = ncctl.Bindings(store, network)
    tokens = register(store, 80)
    answers: list[dict[str, ipaddress.IPv4Address]] = [{} for _ in range(16)]

    def work(n: int) -> None:
        order = tokens[:]
        random.Random(n).shuffle(order)
        for token in order:
            answers[n][token] = bindings.claim(token)

    run_threads(16, work)
    for answer in answers[1:]:
        assert answer == answers[0], "two threads got different addresses for one token"
    assert len(set(answers[0].values())) == len(tokens)
    rows = assert_pool_matches_store(bindings, store)
    assert rows == {t: str(ip) for t, ip in answers[0].items()}
    # A restart (a fresh cache over the same file) sees the same bindings.
    again = ncctl.Bindings(ncctl.Store(store.path), network)
    assert {t: again.pool.ip_of(t) for t in tokens} == answers[0]


def test_lru_eviction_deletes_the_victims_row(store: ncctl.Store) -> None:
    """A full /29: the new node takes the longest-idle node's address and that node's row is gone."""
    network = ipaddress.IPv4Network("10.9.9.0/29")
    bindings = ncctl.Bindings(store, network)
    tokens = register(store, 5)
    for token in tokens:
        bindings.claim(token)
        store.set_state(token, ncctl.STATE_CONNECTED)
        bindings.connected(token)
    for token in (tokens[3], tokens[1]):
        store.set_state(token, ncctl.STATE_IDLE)
        bindings.idle(token)
    victim_ip = bindings.pool.ip_of(tokens[3])
    (newcomer,) = register(store, 1)
    assert bindings.claim(newcomer) == victim_ip
    assert store.node(tokens[3]) is None, "the victim's row must be deleted"
    assert store.node(newcomer).bind_ip == str(victim_ip)
    assert store.node(tokens[1]).bind_ip, "only the longest-idle node is evicted"
    assert_pool_matches_store(bindings, store)


def test_exhausted_overlay_refuses_without_touching_the_database(store: ncctl.Store) -> None:
    """Every node connected: claim raises PoolExhausted and the newcomer stays unbound."""
    network = ipaddress.IPv4Network("10.9.9.0/30")
    bindings = ncctl.Bindings(store, network)
    (only,) = register(store, 1)
    bindings.claim(only)
    store.set_state(only, ncctl.STATE_CONNECTED)
    bindings.connected(only)
    (newcomer,) = register(store, 1)
    with pytest.raises(ncctl.PoolExhausted):
        bindings.claim(newcomer)
    assert store.node(newcomer).bind_ip == ""
    assert store.node(only).bind_ip == "10.9.9.2"


def test_forget_frees_the_address_for_the_next_node(store: ncctl.Store) -> None:
    """Unregistering (forget) deletes the row and the next node gets the freed address."""
    network = ipaddress.IPv4Network("10.9.9.0/30")
    bindings = ncctl.Bindings(store, network)
    first, second = register(store, 2)
    ip = bindings.claim(first)
    store.set_state(first, ncctl.STATE_CONNECTED)
    bindings.connected(first)
    assert bindings.forget(first)
    assert store.node(first) is None
    assert bindings.claim(second) == ip
    assert_pool_matches_store(bindings, store)


def test_concurrent_reclaim_keeps_pool_and_database_in_step(store: ncctl.Store) -> None:
    """Many newcomers racing for a full /29 of idle nodes: no shared address, pool equals database."""
    network = ipaddress.IPv4Network("10.9.9.0/29")
    bindings = ncctl.Bindings(store, network)
    for token in register(store, 5):
        bindings.claim(token)
        bindings.idle(token)
    newcomers = register(store, 40)
    got: dict[str, ipaddress.IPv4Address] = {}

    def work(n: int) -> None:  # five workers, one live session each: an idle address always remains
        for token in newcomers[n::5]:
            got[token] = bindings.claim(token)
            bindings.idle(token)  # its session ends: the next newcomer may reclaim the address

    run_threads(5, work)
    assert len(got) == 40
    rows = assert_pool_matches_store(bindings, store)
    assert len(rows) == 5
    survivors = set(rows)
    assert survivors <= set(newcomers)
    assert all(rows[t] == str(got[t]) for t in survivors)


def test_concurrent_claims_into_a_full_pool_never_take_a_live_nodes_address(store: ncctl.Store) -> None:
    """50 nodes claim a /27 (29 addresses) at once and stay connected: 29 get distinct addresses,
    21 are refused as exhausted, and no claimer loses its row or address to another."""
    network = ipaddress.IPv4Network("10.9.8.0/27")
    bindings = ncctl.Bindings(store, network)
    tokens = register(store, 50)
    got: dict[str, ipaddress.IPv4Address] = {}
    refused: list[str] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        try:
            ip = bindings.claim(tokens[n])
        except ncctl.PoolExhausted:
            with lock:
                refused.append(tokens[n])
            return
        with lock:
            got[tokens[n]] = ip

    run_threads(50, work)
    assert len(got) == 29 and len(refused) == 21
    assert len(set(got.values())) == 29
    rows = assert_pool_matches_store(bindings, store)
    assert rows == {t: str(ip) for t, ip in got.items()}, "a connected node lost its address"
    assert not bindings.has_room()


def test_a_node_minted_newcomer_takes_over_only_a_node_minted_idle_node(store: ncctl.Store) -> None:
    """A full /29 of idle nodes: a newcomer that joined with a node's token may take the
    longest-idle node-minted node's address, never an admin-admitted node's; with none of
    those idle it is refused, and the admin's nodes keep their addresses."""
    network = ipaddress.IPv4Network("10.9.9.0/29")
    bindings = ncctl.Bindings(store, network)
    admins = register(store, 4)
    store.add_bootstrap_token("mintd1.0123456789abcdef", -1, False, minted_by=admins[0])
    (minted_old,) = [ncctl.random_token()]
    store.admit_node("mintd1.0123456789abcdef", minted_old)
    for token in [*admins, minted_old]:
        bindings.claim(token)
        store.set_state(token, ncctl.STATE_IDLE)
        bindings.idle(token)  # the admins' nodes idle longest
    newcomers = [ncctl.random_token() for _ in range(2)]
    for token in newcomers:
        store.admit_node("mintd1.0123456789abcdef", token)
    taken = bindings.pool.ip_of(minted_old)
    assert bindings.claim(newcomers[0]) == taken and store.node(minted_old) is None
    with pytest.raises(ncctl.PoolExhausted, match="admitted by the administrator"):
        bindings.claim(newcomers[1])
    assert all(store.node(token).bind_ip for token in admins)
    (admin_newcomer,) = register(store, 1)
    assert bindings.claim(admin_newcomer) == ipaddress.IPv4Address(store.node(admin_newcomer).bind_ip)
    assert store.node(admins[0]) is None, "an admin-admitted newcomer still takes the longest-idle node"
    assert_pool_matches_store(bindings, store)
    again = ncctl.Bindings(store, network)  # a restart knows which bindings were node-minted
    assert again.pool.has_room(minted=True) and again.pool.choose(minted=True)[1] == newcomers[0]
