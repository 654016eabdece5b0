"""Connection floods from one lab host, for the flood tests and tests/bench/bench_floods.py.

scripts/flood_connections.py runs inside the attacker's namespace (plain python3, stdlib only). It keeps
`count` connections open to each given port of the server: "idle" ones are bare TCP
connections that never send a byte, "half-open" ones send a TLS ClientHello and then
nothing. Whatever the server closes or resets is opened again (at most `rate`
connects a second in all), so the flood holds as many as the server lets it for as
long as it runs. It prints "opened" once every slot was tried, then "held N" lines.
"""

from __future__ import annotations

import re

from netlab import SCRIPTS, Host, Process


def start_flood(
    attacker: Host,
    server_ip: str,
    ports: tuple[int, ...],
    count: int,
    mode: str,
    rate: float = 2000.0,
    sources: tuple[str, ...] = (),
) -> Process:
    """Start the flood in the attacker's namespace and wait until it tried every slot once;
    `sources`: the attacker's addresses to connect from, in turn (default: its own)."""
    flood = attacker.spawn(
        "python3",
        str(SCRIPTS / "flood_connections.py"),
        server_ip,
        ",".join(str(p) for p in ports),
        str(count),
        mode,
        str(rate),
        ",".join(sources),
        name=f"flood-{mode}",
    )
    flood.wait_for_output("opened", timeout=60, what="the flood to open its connections")
    return flood


def held(flood: Process) -> int:
    """How many connections the flood held open at its last report."""
    counts = re.findall(r"^held (\d+)", flood.log(), re.M)
    return int(counts[-1]) if counts else 0


def welcomed_ips(process: Process) -> list[str]:
    return re.findall(r"^welcome (\S+)$", process.log(), re.M)
