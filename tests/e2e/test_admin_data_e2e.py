"""What `nc adm` shows an operator, as one would use it for a week: tokens that say whether
they still admit anyone, JSON that scripts can read without guessing types, and errors a
script sees on stdout."""

from __future__ import annotations

import base64
import datetime
import json
import shutil
import socket
import tarfile
import time

from control_helpers import db_path, join_node, one_error_line
from ha_helpers import Replicas
from netlab import Lab, NcClient, start_client, start_server
from overlay_helpers import assert_reaches, wait_connected
from server_db import db_execute
from waiting import wait_for

import ncctl


def rfc3339(text: str) -> datetime.datetime:
    """A time from nc's JSON: RFC 3339 with a zone, or the test fails."""
    moment = datetime.datetime.fromisoformat(text)
    assert moment.tzinfo is not None, f"{text!r} has no zone"
    assert text[10] == "T", text
    return moment


def test_token_list_says_valid_used_or_expired_and_counts_uses(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    single = server.join_string("--life", "10m", "--single-use")  # a duration, as every other flag takes
    multi = server.join_string("--life", "2h")
    stale = server.join_string("--life", "30")  # a bare number: the original's minutes
    join_node(node, single, lab.dir / "a")
    join_node(node, multi, lab.dir / "b")
    join_node(node, multi, lab.dir / "c")
    db_execute(
        db_path(server),
        "UPDATE token_mgr SET expire_time = '2000-01-01 00:00:00' WHERE token = ?",
        (stale.split("@")[0],),
    )

    listed = {t["tokenId"]: t for t in server.adm_json("token", "list")}
    by_join = {
        name: listed[join.split(".")[0]] for name, join in (("single", single), ("multi", multi), ("stale", stale))
    }
    assert (by_join["single"]["state"], by_join["single"]["uses"], by_join["single"]["useLimit"]) == ("used", 1, 1)
    assert (by_join["multi"]["state"], by_join["multi"]["uses"], by_join["multi"]["useLimit"]) == ("valid", 2, 0)
    assert by_join["stale"]["state"] == "expired" and by_join["stale"]["uses"] == 0
    multi_life = rfc3339(by_join["multi"]["expireTime"]) - rfc3339(by_join["multi"]["createTime"])
    assert datetime.timedelta(minutes=119) <= multi_life <= datetime.timedelta(minutes=121), by_join["multi"]

    table = server.adm("token", "list").stdout.splitlines()
    assert table[0].split()[:4] == ["TOKEN-ID", "NETWORK", "STATE", "USES"], table
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows[single.split(".")[0]][2:4] == ["used", "1/1"]
    assert rows[multi.split(".")[0]][2:4] == ["valid", "2/unlimited"]
    assert rows[stale.split(".")[0]][2] == "expired"


def test_json_has_numbers_zoned_times_and_state_names(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    client = start_client(lab.add_host("node"), server.join_string())
    wait_connected(server, client)
    row = server.node(client.token())
    assert isinstance(row["rxBytes"], int) and isinstance(row["txBytes"], int), row
    assert row["connState"] == 3 and row["connStateName"] == "connected"
    for key in ("createTime", "updateTime", "lastSeen"):
        rfc3339(row[key])
    state = server.adm_json("node", "state", "--node-token", client.token())
    assert state["connState"] == 3 and state["connStateName"] == "connected"
    status = json.loads(client.host.nc("status", "--work-dir", str(client.work_dir), "-o", "json").stdout)
    rfc3339(status["connectedSince"])
    assert isinstance(status["rxBytes"], int)

    client.process.stop()
    idle = server.node(client.token())
    assert idle["connState"] == -1 and idle["connStateName"] == "idle"


def test_a_failing_command_under_json_prints_an_error_object(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    done = server.adm("node", "state", "--node-token", "a" * 16, "-o", "json", check=False)
    assert done.returncode != 0
    document = json.loads(done.stdout)
    assert document["code"] == done.returncode and "not registered" in document["error"], document
    assert done.stderr.startswith("nc: error: ")
    text = server.adm("node", "state", "--node-token", "a" * 16, check=False)
    assert text.stdout == "" and text.returncode == done.returncode  # only JSON output gets the object
    usage = server.adm("node", "state", "-o", "json", check=False)  # refused by the command line itself
    assert usage.returncode == 2 and json.loads(usage.stdout) == {
        "error": "nc adm node state: the following arguments are required: --node-token",
        "code": 2,
    }, usage.stdout
    assert "error: the following arguments are required: --node-token" in usage.stderr


def test_a_backup_recovers_a_lost_server_host(lab: Lab) -> None:
    """backup -> the server's work dir and server.yml destroyed -> restore on the empty
    host -> start: the node comes back on its own, same token, same address, no join."""
    server = start_server(lab.add_host("server"))
    client = start_client(lab.add_host("node"), server.join_string())
    other = start_client(lab.add_host("other"), server.join_string())
    ip, other_ip = wait_connected(server, client), wait_connected(server, other)
    token = client.token()
    backup = lab.dir / "server.ncbackup"
    started = time.monotonic()
    server.adm("backup", str(backup))
    took = time.monotonic() - started
    print(f"measured: nc adm backup of a running server took {took:.2f} s, {backup.stat().st_size} bytes")
    assert backup.stat().st_mode & 0o777 == 0o600
    before = backup.read_bytes()
    refused = server.adm("backup", str(backup), check=False)
    assert refused.returncode != 0 and "--force" in one_error_line(refused)
    assert backup.read_bytes() == before, "a refused backup leaves the file alone"
    server.adm("backup", str(backup), "--force")

    assert server.process.stop() == 0
    shutil.rmtree(server.work_dir)
    server.config.unlink()
    without_config = server.host.nc("adm", "restore", str(backup), check=False)
    assert "--config" in one_error_line(without_config)
    started = time.monotonic()
    server.adm("restore", str(backup))  # --config names the file to write back
    restored = time.monotonic() - started
    assert server.config.exists() and (server.work_dir / "tls" / "grpc" / "ca.key").exists()

    started = time.monotonic()
    server.start()
    assert wait_connected(server, client, timeout=60) == ip and wait_connected(server, other, timeout=60) == other_ip
    back = time.monotonic() - started
    row = server.node(token)
    assert row["bindIp"] == ip and row["connStateName"] == "connected"
    assert client.token() == token and client.process.alive(), "the node never joined again"
    assert_reaches(client.host, "10.1.1.1")
    assert_reaches(other.host, ip)
    assert "join again" not in client.process.log() + other.process.log()
    print(
        f"measured: restore on the emptied host took {restored:.2f} s; both nodes connected on their "
        f"addresses ({ip}, {other_ip}) {back:.1f} s after the server's start began"
    )


def test_restore_refuses_to_replace_another_ca_without_force(lab: Lab) -> None:
    first = start_server(lab.add_host("first"))
    backup = lab.dir / "first.ncbackup"
    first.adm("backup", str(backup))
    second = start_server(lab.add_host("second"))
    assert second.process.stop() == 0
    refused = second.adm("restore", str(backup), check=False)
    assert refused.returncode != 0 and "another CA" in one_error_line(refused)
    second.adm("restore", str(backup), "--force")
    ca = "tls/grpc/ca.crt"
    assert (second.work_dir / ca).read_bytes() == (first.work_dir / ca).read_bytes()


def test_nodes_have_names_unique_in_their_network_and_commands_take_them(lab: Lab) -> None:
    """A node is named by its host name (a node that sends no name, as an older one, too),
    a clash gets a suffix, --name at the join wins; a name works wherever a node-token does."""
    server = start_server(lab.add_host("server"))
    first = start_client(lab.add_host("first"), server.join_string())  # no --name: its host name
    second = start_client(lab.add_host("second"), server.join_string())  # the same host name (one UTS here)
    third_host = lab.add_host("third")
    work = lab.dir / "third-client"
    process = third_host.spawn_nc(
        "client", "--join", server.join_string(), "--work-dir", str(work), "--name", "edge-c", name="third"
    )
    third = NcClient(third_host, process, work)
    for client in (first, second, third):
        wait_connected(server, client, timeout=40)
    host = ncctl.node_name_from(socket.gethostname())
    names = wait_for(
        lambda: (found := {c.token(): server.node(c.token()).get("name") for c in (first, second, third)})
        and all(found.values())
        and found,
        what="every node to be named",
    )
    assert names == {first.token(): host, second.token(): f"{host}-2", third.token(): "edge-c"}

    table = server.adm("node", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "NODE-TOKEN", "NETWORK", "BIND-IP", "STATE", "TRANSPORT", "LAST-SEEN"]
    assert all(len(line) <= 100 for line in table), table
    row = next(line.split() for line in table if line.startswith("edge-c "))
    assert row[1] == third.token() and row[4] == "connected" and row[6] == "now", row
    wide = server.adm("node", "list", "-o", "wide").stdout.splitlines()
    assert {"HOST", "ENDPOINT", "RX", "TX", "VERSION", "MINTED-BY"} <= set(wide[0].split())

    assert server.adm_json("node", "state", "--node-token", "edge-c")["nodeToken"] == third.token()
    server.adm("node", "rename", "edge-c", "gateway")
    assert server.node(third.token())["name"] == "gateway"
    clash = server.adm("node", "rename", "gateway", host, check=False)
    assert clash.returncode != 0 and f"is named '{host}'" in one_error_line(clash)
    unknown = server.adm("node", "state", "--node-token", "nobody", check=False)
    assert unknown.returncode != 0 and "nobody" in one_error_line(unknown)
    server.adm("node", "unregister", "--node-token", "gateway")
    assert third.token() not in {n["nodeToken"] for n in server.adm_json("node", "list")}


def test_a_replica_backup_restores_into_an_empty_etcd(lab: Lab) -> None:
    """On replicas the backup holds nc's keys in etcd (the sealed PKI among them, not the
    leased heartbeat): etcd emptied and the replica's host wiped, a restore and a start
    bring the node back on its address without a join."""
    replicas = Replicas(lab, count=1)
    server = next(iter(replicas.servers.values()))
    wait_for(replicas.leader, timeout=30, what="the replica to lead")
    client = start_client(lab.add_host("node"), server.join_string())
    address = client.overlay_ip()
    backup = lab.dir / "replica.ncbackup"
    server.adm("backup", str(backup))
    with tarfile.open(backup) as archive:
        keys = [base64.b64decode(k).decode() for k, _ in json.load(archive.extractfile("etcd.json"))]
    assert f"/nc/node/{client.token()}" in keys and any(k.startswith("/nc/pki/") for k in keys), keys
    assert not any(k.startswith("/nc/replica") for k in keys), "leased keys stay out"

    assert server.process.stop() == 0
    endpoint = f"--endpoints={replicas.etcd.endpoints}"
    server.host.run("etcdctl", endpoint, "del", "--prefix", "/nc/")
    shutil.rmtree(server.work_dir)
    server.config.unlink()
    server.adm("restore", str(backup))
    assert server.host.run("etcdctl", endpoint, "get", "--prefix", "--keys-only", "/nc/node/").stdout.strip()
    again = server.adm("restore", str(backup), check=False)
    assert again.returncode != 0 and "empty" in one_error_line(again)

    server.start()
    wait_for(lambda: client.overlay_ip() == address and client.host.ping("10.1.1.1"), timeout=60, what="the node back")
    assert client.process.alive() and server.node(client.token())["bindIp"] == address
