"""The server's sqlite database from outside, as an operator with the sqlite3 shell would use
it: one statement, several in one transaction, and a database as nc with schema version 1
left it. Pure: no processes, no namespaces."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import ncctl


def db_execute(path: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """A statement on the server's database from outside, as an operator with sqlite3 would."""
    db = sqlite3.connect(path, timeout=10)
    try:
        with db:
            return db.execute(sql, args).fetchall()
    finally:
        db.close()


# -- a database as nc with schema version 1 left it ---------------------------------------------


def write_v1_database(path: Path, bindings: dict[str, tuple[int, str]], bootstrap_token: str) -> None:
    """The design schema plus migration 1 at user_version 1 (one network, no network columns),
    with node rows {token: (state, bind_ip)}, the reserved row on 10.1.1.1 and one bootstrap
    token that never expires."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    try:
        with db:
            for statement in ncctl.split_sql(ncctl.DESIGN_SCHEMA):
                db.execute(statement)
            for statement in ncctl.MIGRATIONS[0]:
                db.execute(statement)
            db.execute("INSERT INTO network_mgr (token, state, bind_ip) VALUES ('reserverd', 3, '10.1.1.1')")
            for token, (state, ip) in bindings.items():
                db.execute("INSERT INTO network_mgr (token, state, bind_ip) VALUES (?, ?, ?)", (token, state, ip))
            db.execute(
                "INSERT INTO token_mgr (token, expire_time) VALUES (?, '9999-12-31 23:59:59')", (bootstrap_token,)
            )
        db.execute("PRAGMA user_version = 1")
    finally:
        db.close()


def db_script(path: Path, statements: list[str]) -> None:
    """Statements in one transaction, as an operator with the sqlite3 shell would run them."""
    db = sqlite3.connect(path, timeout=10, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        for statement in statements:
            db.execute(statement)
        db.execute("COMMIT")
    finally:
        db.close()
