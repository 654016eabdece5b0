"""Store: the design document's schema verbatim, migrations, triggers, tokens and transactions."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_db import db_execute

import ncctl

# The design document's SQL blocks, copied verbatim into the repository so the suite passes
# wherever it is cloned; NC_DESIGN_DOC checks against the design document itself instead.
DESIGN_DOC = Path(os.environ.get("NC_DESIGN_DOC", Path(__file__).resolve().parents[1] / "data" / "design-schema.md"))
OLD = "2000-01-01 00:00:00"
DESIGN_OBJECTS = {"network_mgr", "token_mgr", "update_time_trigger", "update_time_trigger2"}


def normalize(sql: str | None) -> str:
    return " ".join((sql or "").split())  # autoindexes have no sql


def design_statements() -> list[str]:
    """The CREATE statements of the design document's ```sql blocks, as written there."""
    assert DESIGN_DOC.is_file(), f"design document {DESIGN_DOC} is missing (set NC_DESIGN_DOC)"
    blocks = re.findall(r"```sql\n(.*?)```", DESIGN_DOC.read_text(), flags=re.DOTALL)
    lines = [line for block in blocks for line in block.splitlines() if not line.strip().startswith("//")]
    statements: list[list[str]] = []
    for line in lines:
        if re.match(r"\s*create\s+(table|trigger)\b", line, flags=re.IGNORECASE):
            statements.append([])
        if statements:
            statements[-1].append(line)
    return ["\n".join(s).strip() for s in statements]


def master(db: sqlite3.Connection | Path) -> dict[str, tuple[str, str]]:
    """name -> (type, whitespace-normalized sql) of every schema object."""
    rows = (
        db_execute(db, "SELECT type, name, sql FROM sqlite_master")
        if isinstance(db, Path)
        else db.execute("SELECT type, name, sql FROM sqlite_master")
    )
    return {name: (kind, normalize(sql)) for kind, name, sql in rows}


def reference_schema(with_migrations: bool) -> dict[str, tuple[str, str]]:
    """sqlite_master of a database made by running the design document's SQL (and the migrations)."""
    db = sqlite3.connect(":memory:")
    for statement in design_statements():
        db.execute(statement)
    if with_migrations:
        for migration in ncctl.MIGRATIONS:
            for statement in migration:
                db.execute(statement)
    return master(db)


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "state" / "nc.db"


@pytest.fixture
def store(db_file: Path) -> Iterator[ncctl.Store]:
    the_store = ncctl.Store(str(db_file))
    try:
        yield the_store
    finally:
        the_store.close()


def node_count(store: ncctl.Store) -> int:
    return len(store.nodes())


# -- schema -------------------------------------------------------------------


def test_design_document_has_the_four_objects() -> None:
    """The parser of the design document finds exactly its two tables and two triggers."""
    assert set(reference_schema(with_migrations=False)) >= DESIGN_OBJECTS
    assert len(design_statements()) == 4


def test_tables_and_triggers_are_the_design_documents(store: ncctl.Store, db_file: Path) -> None:
    """Both triggers are stored exactly as the design document writes them; both tables
    start with the document's text and columns, in order, unchanged (migrations may only
    append columns with ALTER TABLE ADD COLUMN)."""
    design = reference_schema(with_migrations=False)
    db = sqlite3.connect(db_file)
    actual = master(db)
    for name in ("update_time_trigger", "update_time_trigger2"):
        assert actual[name] == design[name], name
    design_columns = {
        "network_mgr": ["id", "token", "state", "bind_ip", "create_time", "update_time"],
        "token_mgr": ["id", "token", "expire_time", "create_time", "update_time"],
    }
    for table, expected in design_columns.items():
        kind, design_sql = design[table]
        assert actual[table][0] == kind == "table"
        assert actual[table][1].startswith(design_sql.removesuffix(")").rstrip()), actual[table][1]
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        assert columns[: len(expected)] == expected
    db.close()


def test_schema_is_design_plus_migrations_only(store: ncctl.Store, db_file: Path) -> None:
    """Everything in the database is the design document's SQL followed by MIGRATIONS, nothing else."""
    assert master(db_file) == reference_schema(with_migrations=True)


def test_user_version_and_wal(store: ncctl.Store, db_file: Path) -> None:
    """PRAGMA user_version counts the migrations; the journal is WAL (persistent, seen by other connections)."""
    assert store.schema_version() == len(ncctl.MIGRATIONS) >= 1
    assert db_execute(db_file, "PRAGMA user_version") == [(len(ncctl.MIGRATIONS),)]
    assert db_execute(db_file, "PRAGMA journal_mode") == [("wal",)]


def test_reopen_keeps_rows_and_schema(db_file: Path) -> None:
    """A second open migrates nothing again and sees what the first one committed."""
    first = ncctl.Store(str(db_file))
    first.add_bootstrap_token("aaaaaa.0123456789abcdef", 10, False)
    first.admit_node("aaaaaa.0123456789abcdef", "node0000node0000")
    first.close()
    before = master(db_file)
    second = ncctl.Store(str(db_file))
    try:
        assert second.schema_version() == len(ncctl.MIGRATIONS)
        assert [n.token for n in second.nodes()] == ["node0000node0000"]
        assert master(db_file) == before
    finally:
        second.close()


def test_garbage_file_is_a_store_error(tmp_path: Path) -> None:
    """A file that is not sqlite gives StoreError naming it, not a sqlite3 exception."""
    path = tmp_path / "nc.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(ncctl.StoreError) as info:
        ncctl.Store(str(path))
    assert str(path) in str(info.value)


def test_a_damaged_store_is_one_line_with_the_integrity_report_folded_in(tmp_path: Path) -> None:
    """quick_check reports a damaged tree over many lines: the error stays one line."""
    path = tmp_path / "nc.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT)")
        db.execute("CREATE INDEX t_b ON t (b)")
        db.executemany("INSERT INTO t VALUES (?, ?)", [(n, "x" * 50 + str(n)) for n in range(2000)])
    db.close()
    data = bytearray(path.read_bytes())
    for offset in range(4096 * 5 + 100, 4096 * 5 + 200):  # cell pointers of a page of the table's tree
        data[offset] ^= 0x55
    path.write_bytes(bytes(data))
    report = sqlite3.connect(path).execute("PRAGMA quick_check").fetchone()[0]
    assert report.count("\n") > 2  # the damage this test needs: a report of many lines
    with pytest.raises(ncctl.StoreError) as info:
        ncctl.Store(str(path))
    message = str(info.value)
    assert "\n" not in message and "more)" in message and len(message) < 400, message
    assert str(path) in message and "nc adm restore" in message and "Offset" in message, message


def test_a_full_store_is_named_full_not_damaged(store: ncctl.Store) -> None:
    """sqlite's 'full' (here its page cap) is StoreFull on every Python, also before 3.11,
    where the error carries no code and only its message names it."""
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(ncctl.StoreFull, match="no space left"):
        for _ in range(1000):
            store.add_bootstrap_token(ncctl.new_bootstrap_token(), 10, False)


def test_a_read_only_store_is_named_read_only_not_damaged(store: ncctl.Store) -> None:
    store._db.execute("PRAGMA query_only = ON")
    with pytest.raises(ncctl.StoreFull, match="cannot write the database"):
        store.add_bootstrap_token(ncctl.new_bootstrap_token(), 10, False)


def test_newer_schema_is_a_store_error(db_file: Path) -> None:
    """A database from a newer nc (user_version beyond MIGRATIONS) is refused, not downgraded."""
    ncctl.Store(str(db_file)).close()
    db_execute(db_file, f"PRAGMA user_version = {len(ncctl.MIGRATIONS) + 5}")
    with pytest.raises(ncctl.StoreError, match="newer"):
        ncctl.Store(str(db_file))


# -- triggers -------------------------------------------------------------------


def test_update_time_moves_when_node_state_changes(store: ncctl.Store, db_file: Path) -> None:
    """update_time_trigger: an UPDATE of state (or bind_ip) refreshes network_mgr.update_time."""
    store.add_bootstrap_token("bbbbbb.0123456789abcdef", 10, False)
    store.admit_node("bbbbbb.0123456789abcdef", "nodeaaaanodeaaaa")
    db_execute(db_file, "UPDATE network_mgr SET update_time = ? WHERE token = ?", (OLD, "nodeaaaanodeaaaa"))
    assert store.node("nodeaaaanodeaaaa").update_time == OLD
    assert store.set_state("nodeaaaanodeaaaa", ncctl.STATE_CONNECTED)
    after = store.node("nodeaaaanodeaaaa")
    assert after.state == ncctl.STATE_CONNECTED
    assert after.update_time != OLD
    assert (
        db_execute(db_file, "SELECT abs(strftime('%s', ?) - strftime('%s', 'now', 'localtime'))", (after.update_time,))[
            0
        ][0]
        < 120
    )
    db_execute(db_file, "UPDATE network_mgr SET update_time = ? WHERE token = ?", (OLD, "nodeaaaanodeaaaa"))
    store.bind("nodeaaaanodeaaaa", "10.1.1.7", None)
    assert store.node("nodeaaaanodeaaaa").update_time != OLD


def test_update_time_moves_when_token_expiry_changes(store: ncctl.Store, db_file: Path) -> None:
    """update_time_trigger2: an UPDATE of token_mgr.expire_time refreshes its update_time."""
    store.add_bootstrap_token("cccccc.0123456789abcdef", 10, False)
    db_execute(db_file, "UPDATE token_mgr SET update_time = ?", (OLD,))
    db_execute(db_file, "UPDATE token_mgr SET expire_time = '2999-01-01 00:00:00'")
    assert db_execute(db_file, "SELECT update_time FROM token_mgr")[0][0] != OLD


# -- bootstrap tokens ---------------------------------------------------------------


def test_single_use_token_admits_once(store: ncctl.Store) -> None:
    """A single-use token admits one node; once it was heard from, a second admit is refused and adds nothing."""
    token = "dddddd.0123456789abcdef"
    store.add_bootstrap_token(token, 10, True)
    store.admit_node(token, "first00000000000")
    assert store.confirm_node("first00000000000")
    with pytest.raises(ncctl.BadRequest, match="single-use"):
        store.admit_node(token, "second0000000000")
    assert [n.token for n in store.nodes()] == ["first00000000000"]
    assert store.bootstrap_tokens_with_id("dddddd")[0].uses == 1


def test_multi_use_token_counts_uses(store: ncctl.Store) -> None:
    """An ordinary token admits many nodes, each counted; every new node starts idle without an address."""
    token = "eeeeee.0123456789abcdef"
    store.add_bootstrap_token(token, 10, False)
    for i in range(3):
        store.admit_node(token, f"multi{i:011d}")
    assert store.bootstrap_tokens_with_id("eeeeee")[0].uses == 0, "a use counts once its node is heard from"
    for i in range(3):
        store.confirm_node(f"multi{i:011d}")
    assert store.bootstrap_tokens_with_id("eeeeee")[0].uses == 3
    assert {(n.state, n.bind_ip) for n in store.nodes()} == {(ncctl.STATE_IDLE, "")}


def test_single_use_token_under_concurrency(store: ncctl.Store) -> None:
    """Ten threads race one single-use token, each confirming at once: exactly one node stays."""
    token = "ffffff.0123456789abcdef"
    store.add_bootstrap_token(token, 10, True)
    results: list[str] = []
    barrier = threading.Barrier(10)

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            store.admit_node(token, f"race{i:012d}")
            results.append("ok" if store.confirm_node(f"race{i:012d}") else "refused")
        except ncctl.BadRequest:
            results.append("refused")

    threads = [threading.Thread(target=attempt, args=(i,), name=f"race-{i}") for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(results) == ["ok"] + ["refused"] * 9
    assert node_count(store) == 1


def test_expired_token_is_refused(store: ncctl.Store, db_file: Path) -> None:
    """admit_node refuses a token whose expire_time has passed, and changes nothing."""
    token = "gggggg.0123456789abcdef"
    store.add_bootstrap_token(token, 10, False)
    db_execute(db_file, "UPDATE token_mgr SET expire_time = ? WHERE token = ?", ("2001-01-01 00:00:00", token))
    with pytest.raises(ncctl.BadRequest, match="expired"):
        store.admit_node(token, "late000000000000")
    assert node_count(store) == 0
    assert store.bootstrap_tokens_with_id("gggggg")[0].uses == 0
    assert ncctl.token_expired("2001-01-01 00:00:00") and not ncctl.token_expired(ncctl.NEVER_EXPIRES)


def test_unknown_and_deleted_tokens_are_refused(store: ncctl.Store) -> None:
    """A token never stored, or deleted, admits nobody."""
    with pytest.raises(ncctl.BadRequest, match="unknown"):
        store.admit_node("hhhhhh.0123456789abcdef", "ghost00000000000")
    store.add_bootstrap_token("iiiiii.0123456789abcdef", 10, False)
    assert store.delete_bootstrap_token("iiiiii.0123456789abcdef")
    assert not store.delete_bootstrap_token("iiiiii.0123456789abcdef")
    with pytest.raises(ncctl.BadRequest, match="deleted"):
        store.admit_node("iiiiii.0123456789abcdef", "ghost00000000000")
    assert node_count(store) == 0


def test_token_life_and_sweep(store: ncctl.Store, db_file: Path) -> None:
    """Life N minutes expires N minutes from now, negative never; the sweep deletes only expired tokens."""
    expire = store.add_bootstrap_token("jjjjjj.0123456789abcdef", 10, False)
    delta = db_execute(db_file, "SELECT strftime('%s', ?) - strftime('%s', 'now', 'localtime')", (expire,))[0][0]
    assert 540 <= delta <= 660
    assert store.add_bootstrap_token("kkkkkk.0123456789abcdef", -1, False) == ncctl.NEVER_EXPIRES
    store.add_bootstrap_token("llllll.0123456789abcdef", 10, False)
    db_execute(db_file, "UPDATE token_mgr SET expire_time = ? WHERE token LIKE 'llllll.%'", ("2001-01-01 00:00:00",))
    assert store.delete_expired_bootstrap_tokens() == 1
    assert [t.token[:6] for t in store.list_bootstrap_tokens()] == ["jjjjjj", "kkkkkk"]


def test_token_lookup_by_id(store: ncctl.Store) -> None:
    """bootstrap_tokens_with_id matches the public id exactly, never a prefix of it."""
    store.add_bootstrap_token("abc123.0123456789abcdef", 10, False)
    assert [r.token for r in store.bootstrap_tokens_with_id("abc123")] == ["abc123.0123456789abcdef"]
    assert store.bootstrap_tokens_with_id("abc12") == []
    assert store.bootstrap_tokens_with_id("abc1234") == []


# -- nodes ----------------------------------------------------------------------------


def test_reset_states(store: ncctl.Store) -> None:
    """reset_states puts every node but the reserved one to idle and the reserved one to the given state."""
    store.ensure_reserved_node("10.1.1.1")
    store.add_bootstrap_token("mmmmmm.0123456789abcdef", -1, False)
    for token in ("conn000000000000", "init000000000000", "idle000000000000"):
        store.admit_node("mmmmmm.0123456789abcdef", token)
    store.set_state("conn000000000000", ncctl.STATE_CONNECTED)
    store.set_state("init000000000000", ncctl.STATE_INIT)
    assert store.reset_states(ncctl.STATE_CONNECTED) == 2
    states = {n.token: n.state for n in store.nodes()}
    assert states == {
        ncctl.RESERVED_NODE_TOKEN: ncctl.STATE_CONNECTED,
        "conn000000000000": ncctl.STATE_IDLE,
        "init000000000000": ncctl.STATE_IDLE,
        "idle000000000000": ncctl.STATE_IDLE,
    }
    assert store.reset_states(ncctl.STATE_IDLE) == 0
    assert store.node(ncctl.RESERVED_NODE_TOKEN).state == ncctl.STATE_IDLE


def test_ensure_reserved_node(store: ncctl.Store) -> None:
    """The reserved node-token is inserted once, bound to the server IP, and re-bound when it moves."""
    assert store.ensure_reserved_node("10.1.1.1") is True
    row = store.node(ncctl.RESERVED_NODE_TOKEN)
    assert (row.token, row.bind_ip, row.state) == ("reserverd", "10.1.1.1", ncctl.STATE_CONNECTED)
    assert store.ensure_reserved_node("10.1.1.1") is False
    assert node_count(store) == 1
    # A node holding the address the server moves to gives it up.
    store.add_bootstrap_token("nnnnnn.0123456789abcdef", 10, False)
    store.admit_node("nnnnnn.0123456789abcdef", "holder0000000000")
    store.bind("holder0000000000", "10.2.0.1", None)
    assert store.ensure_reserved_node("10.2.0.1") is True
    assert store.node(ncctl.RESERVED_NODE_TOKEN).bind_ip == "10.2.0.1"
    assert store.node("holder0000000000").bind_ip == ""
    assert [n.token for n in store.nodes()].count(ncctl.RESERVED_NODE_TOKEN) == 1


def test_bind_evicts_and_lru_order(store: ncctl.Store, db_file: Path) -> None:
    """bind() deletes the evicted node in the same transaction; bindings_oldest_first is by update_time."""
    store.add_bootstrap_token("oooooo.0123456789abcdef", 10, False)
    for token in ("lruaaaaaaaaaaaaa", "lrubbbbbbbbbbbbb", "lruccccccccccccc"):
        store.admit_node("oooooo.0123456789abcdef", token)
    store.bind("lruaaaaaaaaaaaaa", "10.1.1.2", None)
    store.bind("lrubbbbbbbbbbbbb", "10.1.1.3", None)
    db_execute(db_file, "UPDATE network_mgr SET update_time = ? WHERE token = ?", (OLD, "lrubbbbbbbbbbbbb"))
    assert [n.token for n in store.bindings_oldest_first()] == ["lrubbbbbbbbbbbbb", "lruaaaaaaaaaaaaa"]
    store.bind("lruccccccccccccc", "10.1.1.3", "lrubbbbbbbbbbbbb")
    assert store.node("lrubbbbbbbbbbbbb") is None
    assert store.node("lruccccccccccccc").bind_ip == "10.1.1.3"
    with pytest.raises(ncctl.BadRequest):
        store.bind("unknown000000000", "10.1.1.9", None)
    assert store.delete_node("lruaaaaaaaaaaaaa") and not store.delete_node("lruaaaaaaaaaaaaa")


# -- transactions ---------------------------------------------------------------------


def test_rolled_back_transaction_leaves_no_row(store: ncctl.Store, db_file: Path) -> None:
    """An exception inside transaction() rolls everything back; other connections see nothing."""
    with pytest.raises(RuntimeError):
        with store.transaction() as db:
            db.execute("INSERT INTO network_mgr (token, state, bind_ip) VALUES ('rollback00000000', -1, '')")
            assert db.execute("SELECT count(*) FROM network_mgr").fetchone()[0] == 1
            raise RuntimeError("abort")
    assert store.node("rollback00000000") is None
    assert db_execute(db_file, "SELECT count(*) FROM network_mgr") == [(0,)]
    store.ensure_reserved_node("10.1.1.1")  # the connection is usable afterwards
    assert node_count(store) == 1


def test_failed_admit_does_not_count_the_use(store: ncctl.Store) -> None:
    """admit_node is one transaction: when the node insert fails, the single-use token stays unused."""
    token = "pppppp.0123456789abcdef"
    store.add_bootstrap_token(token, 10, True)
    store.ensure_reserved_node("10.1.1.1")
    with pytest.raises(ncctl.Conflict, match="node-token exists already"):
        store.admit_node(token, ncctl.RESERVED_NODE_TOKEN)  # duplicate node-token
    assert store.bootstrap_tokens_with_id("pppppp")[0].uses == 0
    store.admit_node(token, "afterfailure0000")
    assert store.node("afterfailure0000") is not None
