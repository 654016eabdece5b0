"""`nc adm node list` with the columns operators look for, and pruning nodes that never
came back."""

from __future__ import annotations

import socket

from control_helpers import db_path, join_node, one_error_line
from netlab import Lab, start_client, start_server
from overlay_helpers import assert_reaches, wait_connected
from server_db import db_execute

import ncctl


def test_node_list_shows_host_endpoint_transport_traffic_and_version(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    client = start_client(lab.add_host("node"), server.join_string())
    wait_connected(server, client)
    assert_reaches(client.host, "10.1.1.1")
    row = server.node(client.token())
    hostname = client.host.run("hostname").stdout.strip()
    assert row["hostName"] == hostname == socket.gethostname()  # a namespace shares the UTS name here
    assert row["endpoint"].startswith(f"{client.host.ip}:") and row["transport"] in ("udp", "tcp")
    assert row["nodeVersion"] == ncctl.VERSION and row["lastSeen"]
    assert int(row["rxBytes"]) > 0 and int(row["txBytes"]) > 0
    assert row["reserved"] is False
    reserved = server.node("reserverd")
    assert reserved["reserved"] is True
    table = server.adm("node", "list", "-o", "wide").stdout.splitlines()
    assert table[0].split()[:9] == [
        "NAME",
        "NODE-TOKEN",
        "NETWORK",
        "BIND-IP",
        "STATE",
        "HOST",
        "ENDPOINT",
        "TRANSPORT",
        "LAST-SEEN",
    ]
    assert any(line.split()[1] == "reserverd" and " reserved " in line for line in table[1:]), table

    client.process.stop()
    gone = server.node(client.token())
    assert gone["endpoint"] == row["endpoint"] and gone["lastSeen"], "the last session's details stay"


def test_prune_removes_nodes_idle_longer_than_asked(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    host = lab.add_host("node")
    old = join_node(host, server.join_string(), lab.dir / "old")
    fresh = join_node(host, server.join_string(), lab.dir / "fresh")
    # The old node was last active two days ago, as an operator's clock would have it.
    db_execute(
        db_path(server),
        "UPDATE network_mgr SET update_time = datetime(CURRENT_TIMESTAMP, 'localtime', '-2 days') WHERE token = ?",
        (old,),
    )
    dry = server.adm_json("node", "prune", "--idle-for", "1d", "--dry-run")
    assert dry == {"nodeTokens": [old], "dryRun": True}
    assert old in {n["nodeToken"] for n in server.adm_json("node", "list")}
    done = server.adm("node", "prune", "--idle-for", "1d").stdout
    assert "removed 1 node(s)" in done and old in done
    left = {n["nodeToken"] for n in server.adm_json("node", "list")}
    assert old not in left and {fresh, "reserverd"} <= left
    assert "--idle-for" in one_error_line(server.adm("node", "prune", "--idle-for", "soon", check=False))
