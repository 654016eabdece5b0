"""Trust, end to end with the real ./nc in namespaces: every caller is a live
identity (revocation holds on both ports), least privilege for nodes, bounded and
visible minting, certificates that age and renew, bounded input, and one atomic
pool claim under concurrency."""

from __future__ import annotations

import datetime
import json
import signal
import sys
import time
from pathlib import Path

from control_helpers import admin_tls, db_path, grpc_call, join_node, node_tls, one_error_line
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from netlab import ROOT, SCRIPTS, Lab, NcServer, start_client, start_server, wait_for
from overlay_helpers import scrape, value, wait_connected, wait_exit
from server_db import db_execute
from trust_helpers import (
    BOOTSTRAP,
    CONTROL,
    hello_answer,
    keep_copy,
    node_call,
    swarm_args,
    swarm_script,
)

import ncctl

WELCOME, ERROR = 0x02, 0x03


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def mint_as_node(server: NcServer, work: Path, minutes: int) -> dict:
    """GetBootStrapToken with the node's own gRPC certificate, as the original ncadm calls it."""
    return node_call(server.host, work, "GetBootStrapToken", "GetBootStrapTokenRequest", expireTime=minutes)


def token_ids(server: NcServer) -> dict[str, dict]:
    return {t["tokenId"]: t for t in server.adm_json("token", "list")}


# -- every caller is a live identity ---------------------------------------------------


def test_unregistered_node_is_refused_on_both_ports_and_its_minted_tokens_go(lab: Lab) -> None:
    """After unregister: the live session ends, the node's certificates fail on 6440 and 6441,
    a token it minted and nobody used is deleted, and a restart of its client is refused."""
    server = start_server(lab.add_host("server"))
    host = lab.add_host("node")
    client = start_client(host, server.join_string())
    wait_connected(server, client)
    token = client.token()
    minted = mint_as_node(server, client.work_dir, 5)
    assert minted["ok"] and minted["response"]["code"] == "200", minted
    minted_id = minted["response"]["bootStrapToken"].split(".")[0]
    assert token_ids(server)[minted_id]["mintedBy"] == token

    server.adm("node", "unregister", "--node-token", token)
    assert wait_exit(client.process, timeout=10) != 0  # told not to come back
    assert "unregistered" in client.process.log()

    for method, request, fields in (
        ("GetBootStrapToken", "GetBootStrapTokenRequest", {"expireTime": 5}),
        ("CheckConnState", "CheckConnStateRequest", {"token": token}),
        ("HelloWorld", "HelloWorldRequest", {"hello_text": "hi"}),
    ):
        refused = node_call(host, client.work_dir, method, request, **fields)
        assert refused["ok"] is False and refused["status"] == "UNAUTHENTICATED", (method, refused)
        assert "no registered node" in refused["details"]
    answer = hello_answer(host, node_tls(client.work_dir, "network")["cert"].parent, token)
    assert answer["kind"] == ERROR and "no registered node" in answer["message"]["reason"], answer
    assert minted_id not in token_ids(server), "the unused token the node minted must be deleted"
    again = client.restart()
    assert wait_exit(again.process, timeout=15) != 0
    assert "no registered node" in again.process.log()


def test_reclaimed_node_loses_its_certificates(lab: Lab) -> None:
    """LRU reclaim in a full /30 network: the evicted node's certificates are refused afterwards."""
    server = start_server(lab.add_host("server"), networks=[{"name": "tiny", "cidr": "10.7.0.1/30"}])
    host = lab.add_host("node")
    join = server.join_string("--net", "tiny")
    first = start_client(host, join)
    wait_connected(server, first)
    first_token = first.token()
    first.process.stop()
    wait_for(lambda: server.node(first_token).get("connState") == -1, what="the first node to go idle")
    second_work = lab.dir / "second"
    second_token = join_node(host, join, second_work)
    saved = ncctl.load_config(str(second_work / "client.yml"), "client")
    answer = hello_answer(host, second_work / "tls" / "network", second_token, saved.net_token)
    assert answer["kind"] == WELCOME, answer
    assert first_token not in {n["nodeToken"] for n in server.adm_json("node", "list")}
    refused = node_call(host, first.work_dir, "CheckConnState", "CheckConnStateRequest", token=first_token)
    assert refused["status"] == "UNAUTHENTICATED", refused


# -- least privilege ----------------------------------------------------------------------


def test_a_node_acts_only_within_its_own_network(lab: Lab) -> None:
    """A node in edge-b mints tokens that join edge-b only, reads no node of the default network
    (not found), unregisters no one but itself, and calls no admin method."""
    server = start_server(lab.add_host("server"), networks=[{"name": "edge-b", "cidr": "10.2.0.1/24"}])
    host = lab.add_host("node")
    b_work, d_work = lab.dir / "b", lab.dir / "d"
    b_token = join_node(host, server.join_string("--net", "edge-b"), b_work)
    d_token = join_node(host, server.join_string(), d_work)

    minted = mint_as_node(server, b_work, 5)
    assert minted["ok"] and minted["response"]["code"] == "200", minted
    pin = ncctl.spki_pin(x509.load_pem_x509_certificate((b_work / "tls" / "grpc" / "ca.crt").read_bytes()))
    newcomer_join = f"{minted['response']['bootStrapToken']}@{BOOTSTRAP}#{pin}"  # the minter knows the CA
    newcomer = join_node(host, newcomer_join, lab.dir / "newcomer")
    row = server.node(newcomer)
    assert (row["network"], row["mintedBy"]) == ("edge-b", b_token), row

    own = node_call(host, b_work, "CheckConnState", "CheckConnStateRequest", token=b_token)
    assert own["response"]["code"] == "200", own
    for method, request in (("CheckConnState", "CheckConnStateRequest"), ("GetRegistedIp", "GetRegistedIpRequest")):
        other = node_call(host, b_work, method, request, token=d_token)
        assert other["response"]["code"] == "400" and "not registered" in other["response"]["message"], other
    removal = node_call(host, b_work, "UnRegister", "UnRegisterRequest", token=d_token)
    assert removal["response"]["code"] == "400" and "only itself" in removal["response"]["message"], removal
    assert server.node(d_token), "the other node must still be registered"
    creds = node_tls(b_work, "grpc")
    denied = grpc_call(host, CONTROL, "NcAdminService", "ListNodes", "ListNodesRequest", **creds)
    assert denied["status"] == "PERMISSION_DENIED", denied
    itself = node_call(host, b_work, "UnRegister", "UnRegisterRequest", token=b_token)
    assert itself["response"]["code"] == "200", itself
    assert not server.node(b_token)


# -- minting is bounded and visible -------------------------------------------------------


def test_node_minting_is_capped_rate_limited_and_can_be_turned_off(lab: Lab) -> None:
    """nodeTokenMaxLife caps a node's token life, never-expiring and over-a-year lives are refused,
    the (nodeMintRate+1)th mint in an hour is refused, and nodesMayMint: false refuses all."""
    server = start_server(lab.add_host("server"), nodeMintRate=3, nodeTokenMaxLife=5)
    host = lab.add_host("node")
    work = lab.dir / "node"
    token = join_node(host, server.join_string(), work)
    for minutes, why in ((-1, "never-expiring"), (600_000, "over a year")):
        refused = mint_as_node(server, work, minutes)
        assert refused["response"]["code"] == "400" and why in refused["response"]["message"], refused
    ids = []
    for _ in range(3):
        minted = mint_as_node(server, work, 120)
        assert minted["response"]["code"] == "200", minted
        ids.append(minted["response"]["bootStrapToken"].split(".")[0])
    fourth = mint_as_node(server, work, 5)
    assert fourth["response"]["code"] == "400" and "nodeMintRate" in fourth["response"]["message"], fourth
    listed = token_ids(server)
    for token_id in ids:
        row = listed[token_id]
        assert row["mintedBy"] == token
        life = datetime.datetime.fromisoformat(row["expireTime"]) - datetime.datetime.fromisoformat(row["createTime"])
        assert life <= datetime.timedelta(minutes=5), row
    text = server.adm("token", "list").stdout
    assert "MINTED-BY" in text and token in text

    server.process.stop()
    server.config.write_text(server.config.read_text().replace('"nodeMintRate": 3', '"nodesMayMint": false'))
    server.start()
    off = mint_as_node(server, work, 5)
    assert off["response"]["code"] == "400" and "nodesMayMint" in off["response"]["message"], off


# -- bounded input ---------------------------------------------------------------------


def test_token_lives_and_network_ranges_are_bounded(lab: Lab) -> None:
    """Admin token lives over ten years, and network CIDRs that hold the server's underlay
    address, overlap a host route or are public (without --allow-public), are refused with a
    message saying what to change; the same rules stop a server.yml network at start."""
    host = lab.add_host("server")
    server = start_server(host)
    assert "ten years" in one_error_line(server.adm("token", "create", "--life", "6000000", check=False))
    host.run("ip", "link", "add", "side0", "type", "veth", "peer", "name", "side1")
    host.run("ip", "addr", "add", "172.31.5.1/24", "dev", "side0")
    host.run("ip", "link", "set", "side0", "up")
    for cidr, why in (
        ("198.18.0.1/24", "server's own address"),
        ("172.31.0.1/16", "route 172.31.5.0/24"),
        ("8.8.8.1/24", "--allow-public"),
    ):
        done = server.adm("network", "create", "--name", "bad", "--cidr", cidr, check=False)
        assert why in one_error_line(done), (cidr, done.stderr)
    assert "bad" not in {n["name"] for n in server.adm_json("network", "list")}
    server.adm("network", "create", "--name", "pub", "--cidr", "8.8.8.1/24", "--allow-public")
    assert "pub" in {n["name"] for n in server.adm_json("network", "list")}

    server.process.stop()
    server.config.write_text(
        json.dumps(
            {
                "mode": "server",
                "server": {"workDir": str(server.work_dir), "networks": [{"name": "wide", "cidr": "9.9.9.1/24"}]},
            }
        )
    )
    done = host.nc("server", "--config", str(server.config), check=False, timeout=30)
    assert "allowPublic" in one_error_line(done)


# -- certificates age and renew ------------------------------------------------------------


def test_renewals_keep_the_node_connected_with_its_ip_and_revoke_the_old_certificates(lab: Lab) -> None:
    """With a 20 s nodeCertLife the client renews over the control port three times, keeps its
    overlay IP and reaches the server after each; once it switched, the certificates it had
    before are refused on both ports while still within their validity."""
    server = start_server(lab.add_host("server"), nodeCertLife="20s")
    host = lab.add_host("node")
    client = start_client(host, server.join_string())
    wait_connected(server, client)
    token = client.token()
    ip = client.overlay_ip()
    network, grpc = node_tls(client.work_dir, "network"), node_tls(client.work_dir, "grpc")
    first = {"network": keep_copy(network, lab.dir / "first-network"), "grpc": keep_copy(grpc, lab.dir / "first-grpc")}
    serials = [serial_of(network["cert"])]
    deadline = time.monotonic() + 90
    while len(serials) < 4 and time.monotonic() < deadline:
        serial = serial_of(network["cert"])
        if serial != serials[-1]:
            serials.append(serial)
            wait_for(lambda: host.ping("10.1.1.1"), timeout=15, what="the server over the overlay after a renewal")
            assert client.overlay_ip() == ip
            if len(serials) == 2:  # the first renewal: the original certificates have seconds left to live
                old = node_call(
                    host, client.work_dir, "CheckConnState", "CheckConnStateRequest", first["grpc"], token=token
                )
                assert old["status"] == "UNAUTHENTICATED" and "revoked" in old["details"], old
                answer = hello_answer(host, first["network"]["cert"].parent, token)
                assert answer["kind"] == ERROR and "revoked" in answer["message"]["reason"], answer
        time.sleep(0.2)
    assert len(serials) >= 4, f"expected three renewals, saw {len(serials) - 1}; log:\n{client.process.log()[-3000:]}"
    assert client.process.alive()
    assert server.node(token)["bindIp"] == ip
    current = node_call(host, client.work_dir, "CheckConnState", "CheckConnStateRequest", token=token)
    assert current["response"]["code"] == "200", current


def test_renewals_in_a_loop_are_refused_past_the_budget_and_keep_two_live_certificates(lab: Lab) -> None:
    """A node calling RenewCertificates over and over (never using what it gets) is refused
    past a few renewals, counted in /metrics; each renewal revokes the earlier ones it never
    used, so it holds at most two live certificates per kind, and the ones it uses still work."""
    server = start_server(lab.add_host("server"))
    host = lab.add_host("node")
    work = lab.dir / "node"
    token = join_node(host, server.join_string(), work)
    count = ncctl.RENEWAL_BURST + 4
    script = SCRIPTS / "renew_loop.py"
    done = host.run(sys.executable, str(script), str(ROOT), CONTROL, str(work / "tls" / "grpc"), token, str(count))
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert [a.get("code") for a in answers] == ["200"] * ncctl.RENEWAL_BURST + ["400"] * 4, answers
    assert "renewed too often" in answers[-1]["message"], answers
    live = db_execute(
        db_path(server),
        "SELECT kind, count(*) FROM nc_cert WHERE node_token = ? AND revoked = 0 GROUP BY kind",
        (token,),
    )
    assert dict(live) == {"grpc": 2, "network": 2}, live
    assert samples_value(server, "renewal-budget") == 4
    still = node_call(host, work, "CheckConnState", "CheckConnStateRequest", token=token)
    assert still["response"]["code"] == "200", still


def samples_value(server: NcServer, reason: str) -> float:
    return value(scrape(server.host), "nc_refusals_total", reason=reason)


def test_an_expired_node_certificate_says_to_join_again(lab: Lab) -> None:
    """A node whose certificate expired while it was off gets one clear line naming the fix."""
    server = start_server(lab.add_host("server"), nodeCertLife="10s")
    host = lab.add_host("node")
    work = lab.dir / "node"
    join_node(host, server.join_string(), work)
    expiry = x509.load_pem_x509_certificate(node_tls(work, "network")["cert"].read_bytes()).not_valid_after_utc
    time.sleep(max(0.0, (expiry - datetime.datetime.now(datetime.timezone.utc)).total_seconds()) + 1)
    done = host.nc("client", "--config", str(work / "client.yml"), check=False, timeout=30)
    line = [line for line in done.stderr.splitlines() if line.startswith("nc: error:")]
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert len(line) == 1 and "expired" in line[0] and "join again" in line[0], done.stderr


def test_admin_identity_renews_at_start_and_ca_status_shows_expiry(lab: Lab) -> None:
    """An admin certificate with 10 days left is replaced at server start and refused after;
    `nc adm ca status` lists both CAs and the admin certificate with their expiry."""
    server = start_server(lab.add_host("server"))
    admin = admin_tls(server)
    grpc_dir = server.work_dir / "tls" / "grpc"
    ca_cert = x509.load_pem_x509_certificate((grpc_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((grpc_dir / "ca.key").read_bytes(), password=None)
    short = ncctl.build_cert(
        "reserverd", ncctl.load_key_file(admin["key"]), ca_cert, ca_key, client=True, life=datetime.timedelta(days=10)
    )
    server.process.stop()
    ncctl.write_private(admin["cert"], ncctl.cert_pem(short))
    kept = keep_copy(admin, lab.dir / "short-admin")
    server.start()
    renewed = x509.load_pem_x509_certificate(admin["cert"].read_bytes())
    assert renewed.serial_number != short.serial_number
    assert renewed.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) > datetime.timedelta(days=300)
    refused = node_call(server.host, lab.dir, "HelloWorld", "HelloWorldRequest", kept, hello_text="hi")
    assert refused["status"] == "UNAUTHENTICATED", refused
    status = server.adm_json("ca", "status")
    assert {r["name"] for r in status} >= {"gRPC CA", "network CA", "admin identity"}
    assert all(r["daysLeft"] > 300 for r in status), status


# -- upgrades ---------------------------------------------------------------------------------


def test_a_node_from_before_serials_keeps_working_until_unregistered(lab: Lab) -> None:
    """A node whose certificates the store never recorded (joined under an older nc) still
    connects and calls the control port; after unregister it is refused like any other."""
    server = start_server(lab.add_host("server"))
    host = lab.add_host("node")
    work = lab.dir / "node"
    token = join_node(host, server.join_string(), work)
    server.process.stop()
    db_execute(db_path(server), "DELETE FROM nc_cert WHERE node_token = ?", (token,))
    db_execute(db_path(server), "INSERT INTO nc_legacy_node (token) VALUES (?)", (token,))
    server.start()
    assert node_call(host, work, "CheckConnState", "CheckConnStateRequest", token=token)["response"]["code"] == "200"
    assert hello_answer(host, work / "tls" / "network", token)["kind"] == WELCOME
    server.adm("node", "unregister", "--node-token", token)
    refused = node_call(host, work, "CheckConnState", "CheckConnStateRequest", token=token)
    assert refused["status"] == "UNAUTHENTICATED", refused


# -- one atomic pool claim ---------------------------------------------------------------------


def test_fifty_concurrent_joins_and_connects_into_a_27(lab: Lab) -> None:
    """50 joins at once into a /27 (25 from each of two hosts, within the server's per-address
    handshake limit), then 50 sessions at once that stay up: 29 distinct addresses, 21 refusals
    as full, and no connected node loses its address; a join into the full network is refused
    with a clear message."""
    server = start_server(lab.add_host("server"), networks=[{"name": "small", "cidr": "10.4.0.1/27"}])
    join = server.join_string("--net", "small", "--life", "30")
    token, net = join.split("@")[0], join.rsplit("net=", 1)[1]
    ca = server.work_dir / "tls" / "grpc" / "ca.crt"
    script = swarm_script()
    swarms = []
    for name in ("swarm-a", "swarm-b"):
        out = lab.dir / name
        out.mkdir()
        host = lab.add_host(name)
        swarms.append((out, host.spawn(sys.executable, str(script), *swarm_args(ca, token, net, 25, out), name=name)))
    try:
        joined, sessions = {}, {}
        for out, swarm in swarms:
            swarm.wait_for_output('"sessions"', timeout=120, what="the swarm's joins and sessions")
            result = json.loads(swarm.log().strip().splitlines()[-1])
            joined.update({f"{out.name}-{n}": j for n, j in result["joined"].items()})
            sessions.update(result["sessions"])
        assert len(joined) == 50 and all("token" in j for j in joined.values()), joined
        welcomed = {t: s["message"]["ip"] for t, s in sessions.items() if s["kind"] == WELCOME}
        refused = [s for s in sessions.values() if s["kind"] == ERROR]
        assert len(welcomed) == 29 and len(set(welcomed.values())) == 29, sessions
        assert len(refused) == 21 and all(s["message"]["code"] == "overlay-full" for s in refused), refused
        rows = {n["nodeToken"]: n for n in server.adm_json("node", "list")}
        assert all(rows[t]["bindIp"] == ip for t, ip in welcomed.items()), "a connected node lost its address"
        late = server.host.nc(
            "adm", "--config", str(server.config), "join", join, "--work-dir", str(lab.dir / "late"), check=False
        )
        assert "is full" in one_error_line(late)
    finally:
        for out, swarm in swarms:
            (out / "release").touch()
            swarm.stop(signal.SIGTERM)
