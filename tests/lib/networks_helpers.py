"""Helpers for the several-networks tests (issue 5): networks and nodes through
`nc adm`, clients started in parallel, pings that must get through or must be
sent into the tunnel and lost, and a schema-version-1 database built by hand."""

from __future__ import annotations

import ipaddress
import json
import re

from netlab import Host, Lab, NcClient, NcServer, Process, start_client, wait_for
from network_helpers import wait_exit

DEFAULT_CIDR = "10.1.1.0/24"
DEFAULT_SERVER_IP = "10.1.1.1"
NET_TOKEN_RE = re.compile(r"^[a-z0-9]{16}$")
NETWORK_KEYS = {"name", "cidr", "interconnection", "netToken", "serverIp", "nodes", "fromConfig"}


# -- the admin view ---------------------------------------------------------------------------


def networks(server: NcServer) -> dict[str, dict]:
    """`nc adm network list -o json`, by network name."""
    listed = server.adm_json("network", "list")
    assert isinstance(listed, list), listed
    return {n["name"]: n for n in listed}


def create_network(server: NcServer, name: str, cidr: str, *flags: str) -> dict:
    """`nc adm network create -o json` that must succeed; returns the new network."""
    created = server.adm_json("network", "create", "--name", name, "--cidr", cidr, *flags)
    assert isinstance(created, dict) and set(created) == NETWORK_KEYS, created
    assert created["name"] == name and NET_TOKEN_RE.match(created["netToken"]), created
    return created


def nodes(server: NcServer) -> dict[str, dict]:
    """`nc adm node list -o json`, by node-token."""
    listed = server.adm_json("node", "list")
    assert isinstance(listed, list), listed
    return {n["nodeToken"]: n for n in listed}


# -- nodes ------------------------------------------------------------------------------------


def start_clients(lab: Lab, joins: list[tuple[str, str]]) -> list[NcClient]:
    """One host per (name, join string), each `nc client --join`, all started before waiting for any."""
    clients = [start_client(lab.add_host(name), join, wait=False) for name, join in joins]
    for client in clients:
        try:
            wait_for(client.overlay_ip, timeout=30, what=f"{client.host.name} to get an overlay address")
        except AssertionError:
            raise AssertionError(f"{client.host.name} did not connect; log:\n{client.process.log()[-3000:]}") from None
    return clients


def set_net_token(client: NcClient, net_token: str) -> None:
    """Rewrite client.netToken in the node's client.yml, as an operator with an editor would."""
    import yaml

    doc = yaml.safe_load(client.config.read_text())
    doc["client"]["netToken"] = net_token
    client.config.write_text(yaml.safe_dump(doc, sort_keys=False))


def saved_net_token(client: NcClient) -> str:
    import yaml

    return yaml.safe_load(client.config.read_text())["client"]["netToken"]


# -- reachability -----------------------------------------------------------------------------


def route_into_tunnel(host: Host, cidr: str) -> None:
    """Send cidr into the node's nc0, so a ping there really enters the overlay instead of
    failing with `network unreachable` in the node's own kernel."""
    host.run("ip", "route", "replace", cidr, "dev", "nc0")


def assert_all_lost(probes: list[tuple[Host, str]], count: int = 3) -> None:
    """All probes at once, `count` pings from host to ip each: every ping is sent (ping exits 1,
    not 2 for `unreachable`) and none is answered."""
    running = [
        (
            host,
            ip,
            host.spawn("ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1", ip, name=f"ping-{host.name}"),
        )
        for host, ip in probes
    ]
    for host, ip, process in running:
        code = wait_exit(process, timeout=count + 10)
        found = re.search(r"(\d+) packets transmitted, (\d+) received", process.log())
        assert found, f"{host.name} -> {ip}: ping sent nothing (exit {code}): {process.log()}"
        sent, received = int(found.group(1)), int(found.group(2))
        assert received == 0, f"{host.name} reached {ip} ({received}/{sent} answered), which must be isolated"
        assert sent == count and code == 1, f"{host.name} -> {ip}: exit {code}, {process.log()}"


def icmp_sources(capture: Process) -> set[str]:
    """Source addresses of the ICMP echo requests a tcpdump saw."""
    return set(re.findall(r"IP (\d+\.\d+\.\d+\.\d+) > [\d.]+: ICMP echo request", capture.log()))


def server_tun_with(host: Host, ip: str) -> str | None:
    """The name of the interface in host's namespace that holds ip, if any."""
    shown = json.loads(host.run("ip", "-j", "-4", "addr", "show").stdout or "[]")
    for link in shown:
        if any(info.get("local") == ip for info in link.get("addr_info", [])):
            return link["ifname"]
    return None


def links(host: Host) -> set[str]:
    return {link["ifname"] for link in json.loads(host.run("ip", "-j", "link", "show").stdout or "[]")}


def in_cidr(ip: str, cidr: str) -> bool:
    return ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(cidr, strict=False)
