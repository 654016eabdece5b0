"""Address pool: a full /16 overlay (65 533 node addresses) and LRU reclaim.

Two measurements of the same work, allocating an address for a node-token
that has none while every address is bound to an idle node, so each
allocation evicts the longest-idle node:

1. ncctl.Bindings over a real ncctl.Store (sqlite in a temp dir; WAL,
   synchronous=FULL as the server runs it), timed through Bindings.claim:
   pool choice + one store transaction (delete the victim, bind the new node)
   + the pool update + the server's log line (to a file, as the server does).
2. the pure in-memory ncctl.AddressPool: choose() + assign().

The table is seeded with one executemany in one transaction (inserting 65k
rows one transaction each would take minutes), then Bindings loads it.
Target: <= 1 ms per allocation (mean; the table shows p99 and max too). Prints one table on stdout.

    tests/bench.sh pool [--allocations 2000] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchlib import format_table, percentile

import ncctl

NETWORK = ipaddress.IPv4Network("10.20.0.0/16")
TARGET_US = 1000.0


def token(kind: str, index: int) -> str:
    """A 16-character node-token of the alphabet nc generates ('s' seeded, 'f' fresh)."""
    return f"{kind}{index:015d}"


def seed_store(db_path: Path, fill: Sequence[tuple[str, str]], fresh: Sequence[str]) -> None:
    """Every address bound to an idle node, plus registered nodes without one."""
    ncctl.Store(str(db_path)).close()  # schema and migrations, exactly as the server makes them
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT INTO network_mgr (token, state, bind_ip) VALUES (?, ?, ?)",
            [(t, ncctl.STATE_IDLE, ip) for t, ip in fill] + [(t, ncctl.STATE_IDLE, "") for t in fresh],
        )
        db.execute("COMMIT")
    finally:
        db.close()


def timed(operation: Callable[[str], object], tokens: Sequence[str]) -> list[float]:
    """Microseconds each call of operation(token) took."""
    samples = []
    for t in tokens:
        started = time.perf_counter_ns()
        operation(t)
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


def row(label: str, samples: Sequence[float], target: float | None = TARGET_US) -> list[str]:
    mean, p99 = statistics.fmean(samples), percentile(samples, 0.99)
    verdict = ""
    if target is not None:
        verdict = ("ok" if mean <= target else "FAIL") + (" (p99 over)" if p99 > target else "")
    return [
        label,
        f"{len(samples):,}",
        f"{mean:,.1f}",
        f"{statistics.median(samples):,.1f}",
        f"{p99:,.1f}",
        f"{max(samples):,.1f}",
        "" if target is None else f"<= {target:,.0f}",
        verdict,
    ]


def bench_bindings(work: Path, allocations: int) -> tuple[list[list[str]], list[str]]:
    """Rows for the sqlite-backed Bindings, and checks that LRU evicted the right nodes."""
    capacity = ncctl.AddressPool(NETWORK).capacity
    first = int(NETWORK.network_address) + 2  # .0.1 is the server's
    fill = [(token("s", i), str(ipaddress.IPv4Address(first + i))) for i in range(capacity)]
    fresh = [token("f", i) for i in range(allocations)]
    db_path = work / "nc.db"
    started = time.perf_counter()
    seed_store(db_path, fill, fresh)
    seed_s = time.perf_counter() - started

    store = ncctl.Store(str(db_path))
    try:
        started = time.perf_counter()
        bindings = ncctl.Bindings(store, NETWORK)
        load_s = time.perf_counter() - started
        if len(bindings.pool) != capacity:
            raise AssertionError(f"Bindings loaded {len(bindings.pool)} of {capacity} seeded bindings")
        samples = timed(bindings.claim, fresh)
        checks = [
            f"seeded {capacity:,} bound + {allocations:,} unbound rows in {seed_s:.2f} s; "
            f"Bindings loaded them in {load_s:.2f} s",
        ]
        gone = sum(1 for t, _ in fill[:allocations] if store.node(t) is None)
        kept = store.node(fill[allocations][0]) is not None if allocations < capacity else True
        bound = sum(1 for t in fresh if (n := store.node(t)) is not None and n.bind_ip)
        checks.append(
            f"LRU: {gone:,}/{allocations:,} longest-idle nodes evicted in order, next one kept: {kept}; "
            f"{bound:,}/{allocations:,} new nodes bound in sqlite; pool still full: {len(bindings.pool) == capacity}"
        )
        if gone != allocations or not kept or bound != allocations:
            raise AssertionError("LRU reclaim did not evict the longest-idle nodes: " + checks[-1])
    finally:
        store.close()
    return [row("Bindings.claim (sqlite, evicts LRU)", samples)], checks


def bench_memory(allocations: int) -> list[list[str]]:
    """Rows for the pure AddressPool: filling an empty /16, then reclaiming."""
    pool = ncctl.AddressPool(NETWORK)

    def allocate(t: str) -> None:
        ip, victim = pool.choose()
        pool.assign(t, ip, victim)

    fill = timed(allocate, [token("s", i) for i in range(pool.capacity)])
    if len(pool) != pool.capacity:
        raise AssertionError(f"AddressPool holds {len(pool)} of {pool.capacity} after filling")
    first_victim = pool.choose()[1]
    reclaim = timed(allocate, [token("f", i) for i in range(allocations)])
    if first_victim != token("s", 0) or pool.ip_of(token("s", allocations - 1)) is not None:
        raise AssertionError("AddressPool did not reclaim in LRU order")
    return [
        row("AddressPool choose+assign, filling empty", fill, target=None),
        row("AddressPool choose+assign (evicts LRU)", reclaim),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allocations", type=int, default=2000, help="timed allocations (default 2000)")
    parser.add_argument("--dir", default=None, help="where the temp sqlite file lives (default: the temp dir)")
    args = parser.parse_args()
    if args.allocations < 1:
        parser.error("--allocations must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="nc-bench-pool-", dir=args.dir))
    nc_log = logging.getLogger("nc")
    handler = logging.FileHandler(work / "nc.log")  # the server logs every eviction; so does this
    nc_log.addHandler(handler)
    nc_log.setLevel(logging.INFO)
    nc_log.propagate = False
    try:
        rows, checks = bench_bindings(work, args.allocations)
        rows += bench_memory(args.allocations)
    except (AssertionError, ncctl.NcError, sqlite3.Error) as e:
        print(f"bench_pool: {e}", file=sys.stderr)
        return 1
    finally:
        nc_log.removeHandler(handler)
        handler.close()
        shutil.rmtree(work, ignore_errors=True)
    title = f"address pool, {NETWORK} overlay full ({ncctl.AddressPool(NETWORK).capacity:,} node addresses), all idle"
    headers = ["operation", "n", "mean µs", "median µs", "p99 µs", "max µs", "target", ""]
    print(format_table(headers, rows, title))
    for line in checks:
        print(f"-- {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
