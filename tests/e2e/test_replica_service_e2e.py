"""A replica on etcd is the same server as a single one, with a role: it tells systemd
READY=1 and feeds its watchdog, starts with a DNS name as server.ip, applies SIGHUP,
serves /metrics with its role, and a standby answers the admin's reads as the leader."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

from dns_helpers import NAME, name_server
from ha_helpers import CLUSTER_TOKEN, Replicas
from netlab import NC, Lab, start_client, wait_for
from overlay_helpers import scrape, value, wait_connected


def test_a_replica_is_a_service_like_a_single_server(lab: Lab, hosts_files: dict[str, Path]) -> None:
    replicas = Replicas(lab, count=1)
    wait_for(replicas.leader, timeout=30, what="the first replica to lead")
    host = replicas.hosts[1]
    name_server(host, host.ip, hosts_files)  # this replica's server.ip is a name
    config = lab.dir / "replica-2.yml"
    body = {
        "workDir": str(lab.dir / "replica-2-work"),
        "ip": NAME,
        "datastoreEndpoint": replicas.etcd.endpoints,
        "clusterToken": CLUSTER_TOKEN,
    }
    config.write_text(json.dumps({"mode": "server", "server": body}))
    notify_path = lab.dir / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(45)
    try:
        process = host.spawn(
            "env",
            f"NOTIFY_SOCKET={notify_path}",
            "WATCHDOG_USEC=2000000",
            str(NC),
            "server",
            "--config",
            str(config),
            name="replica-2",
        )
        ready = notify.recv(4096).decode()
        assert ready == "READY=1\nSTATUS=standby", ready
        assert notify.recv(4096).decode() == "WATCHDOG=1"
        assert notify.recv(4096).decode() == "WATCHDOG=1", "fed again, at half the interval"
    finally:
        notify.close()
    assert "nc replica ready (standby)" in process.log()

    standby = scrape(host)
    assert value(standby, "nc_server", version=version_of(standby), role="standby") == 1
    assert value(standby, "nc_sessions", transport="tcp") == 0
    leader = scrape(replicas.hosts[0])
    assert value(leader, "nc_server", version=version_of(leader), role="leader") == 1

    body["debug"] = True
    config.write_text(json.dumps({"mode": "server", "server": body}))
    process.send_signal(signal.SIGHUP)
    process.wait_for_output("SIGHUP: re-read", what="the reload line")
    reload_line = next(line for line in process.log().splitlines() if "SIGHUP: re-read" in line)
    assert "applied: debug" in reload_line, reload_line
    assert process.alive()


def version_of(samples: dict) -> str:
    return next(dict(labels)["version"] for name, labels in samples if name == "nc_server")


def test_a_standby_answers_the_admins_reads_as_the_leader(lab: Lab) -> None:
    replicas = Replicas(lab, count=2)
    wait_for(replicas.leader, timeout=30, what="one replica to lead")
    leader = replicas.servers[replicas.leader() or ""]
    standby = next(server for server in replicas.servers.values() if server is not leader)
    client = start_client(lab.add_host("n1"), leader.join_string())
    wait_connected(leader, client)
    standby.join_string("--life", "30")  # a token for `token list` to show

    def rows(server: object, *args: str) -> object:
        return server.adm_json(*args)  # type: ignore[attr-defined]

    def nodes(server: object) -> list[tuple]:
        listed = rows(server, "node", "list")
        return sorted((n["nodeToken"], n["bindIp"], n["connState"], n["network"]) for n in listed)

    assert nodes(standby) == nodes(leader) and len(nodes(leader)) == 2  # the node and the reserved one
    token = client.token()
    state = {k: rows(standby, "node", "state", "--node-token", token)[k] for k in ("bindIp", "connState")}
    assert state == {"bindIp": client.overlay_ip(), "connState": 3}
    assert rows(standby, "token", "list") == rows(leader, "token", "list")
    assert len(rows(standby, "token", "list")) == 2
