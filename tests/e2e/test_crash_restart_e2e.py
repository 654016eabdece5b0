"""Crash-safe system changes: a gateway server and a full-tunnel client killed with
SIGKILL and started again, ten times, leave the routing tables, the ruleset and
ip_forward exactly as one clean start does; a clean stop then restores what was
there before the first start."""

from __future__ import annotations

import dataclasses
import re
import signal

from netlab import Host, Lab, start_client, start_server, wait_for

CYCLES = 10
SERVER_OVERLAY_IP = "10.1.1.1"


@dataclasses.dataclass(frozen=True)
class SystemState:
    routes: str
    ruleset: str
    ip_forward: str


def ruleset(host: Host) -> str:
    """`iptables-save` without its timestamps, packet counters and empty tables: iptables-nft
    keeps a table once any rule was added to it, though it holds no rule afterwards."""
    tables, current = [], []
    for line in host.run("iptables-save").stdout.splitlines():
        if line.startswith("#"):
            continue
        line = re.sub(r"\[\d+:\d+\]", "[]", line)
        current.append(line)
        if line == "COMMIT":
            if any(holds_something(entry) for entry in current):
                tables.append("\n".join(current))
            current = []
    return "\n".join(tables)


def nc_tags(host: Host) -> set[str]:
    """The TUNs nc's iptables rules are tagged for."""
    return set(re.findall(r"nc:ncsrv\d+", ruleset(host)))


def holds_something(line: str) -> bool:
    """A rule, a user chain, or a built-in chain whose policy is not the default ACCEPT."""
    if line.startswith("-"):
        return True
    return line.startswith(":") and line.split()[1] != "ACCEPT"


def system_state(host: Host) -> SystemState:
    return SystemState(
        routes=host.run("ip", "route", "show", "table", "all").stdout,
        ruleset=ruleset(host),
        ip_forward=host.run("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip(),
    )


def settled_host(lab: Lab, name: str) -> Host:
    """A lab host whose eth0 link-local address is past duplicate detection: it enters the
    local routing table a moment after the link comes up, whatever nc does."""
    host = lab.add_host(name)
    wait_for(
        lambda: not host.run("ip", "-6", "addr", "show", "dev", "eth0", "tentative").stdout.strip(),
        what=f"{name}'s link-local address to settle",
    )
    return host


def test_ruleset_keeps_rules_and_policies_but_not_empty_tables(lab: Lab) -> None:
    host = lab.add_host("probe")
    assert ruleset(host) == ""
    host.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-j", "ACCEPT")
    host.run("iptables", "-t", "nat", "-D", "POSTROUTING", "-j", "ACCEPT")
    assert ruleset(host) == ""
    host.run("iptables", "-P", "FORWARD", "DROP")
    assert ":FORWARD DROP" in ruleset(host)


def test_gateway_server_killed_ten_times_leaves_one_clean_start(lab: Lab) -> None:
    """Each restart finds the rules and ip_forward a killed run left and takes them over;
    the clean stop at the end puts back the original ip_forward, not the killed run's 1."""
    host = settled_host(lab, "server")
    before = system_state(host)
    assert before.ip_forward == "0"
    server = start_server(host, gateway=True, keepalive=2)
    clean = system_state(host)
    assert clean.ip_forward == "1"
    assert clean.ruleset.count("MASQUERADE") == 1
    for cycle in range(1, CYCLES + 1):
        server.process.stop(signal.SIGKILL)
        assert "MASQUERADE" in ruleset(host), "a killed server leaves its rules (what the restart must take over)"
        server.start()
        assert system_state(host) == clean, f"after kill/restart cycle {cycle}"
    assert server.process.stop() == 0
    assert system_state(host) == before


def test_gateway_rules_left_by_a_killed_run_go_when_gateway_is_turned_off(lab: Lab) -> None:
    host = settled_host(lab, "server")
    before = system_state(host)
    server = start_server(host, gateway=True)
    server.process.stop(signal.SIGKILL)
    server.config.write_text(server.config.read_text().replace('"gateway": true', '"gateway": false'))
    server.start()
    running = system_state(host)
    assert (running.ruleset, running.ip_forward) == (before.ruleset, before.ip_forward)
    assert server.process.stop() == 0
    assert system_state(host) == before


def test_rules_of_a_network_gone_since_the_kill_are_removed(lab: Lab) -> None:
    """A backup from before a network existed, restored after a kill: the network's rules
    go at the next start, though no network owns them any more."""
    host = settled_host(lab, "server")
    before = system_state(host)
    server = start_server(host, gateway=True)
    backup = lab.dir / "before-edge-b.db"
    server.adm("backup", "--out", str(backup))
    server.adm("network", "create", "--name", "edge-b", "--cidr", "10.2.0.1/24")
    wait_for(lambda: len(nc_tags(host)) == 2, what="the new network's rules")
    server.process.stop(signal.SIGKILL)
    server.adm("restore", "--from", str(backup))
    server.start()
    assert nc_tags(host) == {"nc:ncsrv0"}
    assert ruleset(host).count("MASQUERADE") == 1
    assert server.process.stop() == 0
    assert system_state(host) == before


def test_full_tunnel_client_killed_ten_times_leaves_one_clean_start(lab: Lab) -> None:
    """A killed full-tunnel client leaves its host route to the server; the next start
    replaces it instead of failing on "File exists", and a clean stop removes it."""
    server_host, node = lab.add_host("server"), settled_host(lab, "node")
    server = start_server(server_host, keepalive=2)
    before = system_state(node)
    client = start_client(node, server.join_string())
    client.restart_with_full_tunnel()
    wait_for(lambda: fully_tunneled(node), what="the full-tunnel routes")
    clean = system_state(node)
    for cycle in range(1, CYCLES + 1):
        client.process.stop(signal.SIGKILL)
        assert f"{server_host.ip} dev eth0" in node.run("ip", "route", "show").stdout, "the host route outlives a kill"
        client.restart()
        wait_for(lambda: fully_tunneled(node), what=f"the full-tunnel routes after cycle {cycle}")
        assert system_state(node) == clean, f"after kill/restart cycle {cycle}; client log:\n{client.process.log()}"
    assert node.ping(SERVER_OVERLAY_IP), client.process.log()
    assert client.process.stop() == 0
    assert system_state(node) == before


def fully_tunneled(host: Host) -> bool:
    return any(route.get("dst") == "128.0.0.0/1" for route in host.ipv4_routes())
