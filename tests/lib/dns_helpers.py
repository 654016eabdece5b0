"""Server names for lab namespaces: /etc/netns/<ns>/hosts, which `ip netns exec` mounts
over /etc/hosts. The files are collected in the `hosts_files` fixture (tests/e2e/conftest.py),
which removes them after the test, also on failure."""

from __future__ import annotations

from pathlib import Path

from netlab import Host

NAME = "nc-server.lab.test"


def name_server(host: Host, ip: str, files: dict[str, Path]) -> None:
    directory = Path("/etc/netns") / host.ns
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts").write_text(f"127.0.0.1 localhost\n{ip} {NAME}\n")
    files[host.ns] = directory
