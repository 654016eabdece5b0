"""The appliance and its control plane, end to end with the real ./nc in namespaces:
first start, PKI and database reuse, bootstrap tokens and joins, mutual TLS on the
control port, crash safety of joins, the admin CLI and its original aliases."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import stat
import subprocess
from pathlib import Path

from control_helpers import (
    BOOTSTRAP_TOKEN_RE,
    JOIN_RE,
    NODE_TOKEN_RE,
    adm_join,
    admin_tls,
    command_paths,
    db_path,
    grpc_call,
    join_node,
    lost_join,
    node_tls,
    node_tokens,
    one_error_line,
)
from cryptography import x509
from netlab import NC, Host, Lab, Process, start_client, start_server, wait_for
from server_db import db_execute

import ncctl

SERVER_IP = "198.18.0.1"
CONTROL = f"{SERVER_IP}:6440"
BOOTSTRAP = f"{SERVER_IP}:6439"
NODE_KEYS = {"nodeToken", "bindIp", "connState", "createTime", "updateTime", "network", "mintedBy"}
NODE_KEYS |= {"hostName", "endpoint", "transport", "lastSeen", "rxBytes", "txBytes", "nodeVersion", "reserved"}
NODE_KEYS |= {"connStateName", "name"}  # the CLI's JSON names the state beside its code; the node's name
NODE_KEYS |= {"directPeers"}  # connected: the peers it reaches directly


def ca_pin_of(path: Path) -> str:
    return ncctl.spki_pin(x509.load_pem_x509_certificate(path.read_bytes()))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def adm_with(host: Host, creds: dict[str, Path], *args: str) -> subprocess.CompletedProcess:
    """`nc adm` from another host against the server's control port with explicit credentials."""
    flags = ["--server", CONTROL, "--ca", str(creds["ca"]), "--cert", str(creds["cert"]), "--key", str(creds["key"])]
    return host.nc("adm", *flags, *args, check=False)


def with_pin(join: str, pin_hex: str) -> str:
    return join.rsplit("#sha256:", 1)[0] + "#sha256:" + pin_hex


# -- first start ------------------------------------------------------------------


def test_first_start_with_only_workdir_creates_pki_db_and_log(lab: Lab) -> None:
    """A server.yml holding only workDir, on an empty dir: PKI (keys 0600), database and log file appear."""
    host = lab.add_host("server")
    work = lab.dir / "server-work"
    work.mkdir()
    server = start_server(host)
    assert json.loads(server.config.read_text()) == {"mode": "server", "server": {"workDir": str(work)}}
    tls = work / "tls"
    keys = [
        tls / "grpc" / "ca.key",
        tls / "grpc" / "server.key",
        tls / "network" / "ca.key",
        tls / "network" / "server.key",
        tls / "admin" / "client.key",
    ]
    certs = [tls / d / n for d in ("grpc", "network") for n in ("ca.crt", "server.crt")]
    certs += [tls / "admin" / "client.crt", tls / "admin" / "ca.crt"]
    for key in keys:
        assert key.is_file() and mode_of(key) == 0o600, (key, oct(mode_of(key)) if key.exists() else "missing")
    for cert in certs:
        assert cert.is_file(), cert
        x509.load_pem_x509_certificate(cert.read_bytes())
    assert ca_pin_of(tls / "grpc" / "ca.crt") != ca_pin_of(tls / "network" / "ca.crt")
    assert db_execute(work / "nc.db", "PRAGMA user_version") == [(len(ncctl.MIGRATIONS),)]
    assert db_execute(work / "nc.db", "SELECT token, bind_ip FROM network_mgr") == [("reserverd", "10.1.1.1")]
    log = work / "logs" / "nc-server.log"
    wait_for(lambda: "ready" in log.read_text(), timeout=5, what="the ready line in nc-server.log")
    join = server.join_string()
    match = JOIN_RE.match(join)
    assert match, join
    assert match["addr"] == BOOTSTRAP
    assert match["pin"] == ca_pin_of(tls / "grpc" / "ca.crt")


def test_server_without_config_runs_on_embedded_defaults(lab: Lab) -> None:
    """`nc server` with no --config at all (private tmpfs on /var/lib/nc) serves, and `nc adm` needs no flags."""
    host = lab.add_host("server")
    node = lab.add_host("node")
    default_dir = Path(ncctl.DEFAULT_SERVER_WORK_DIR)
    created = not default_dir.exists()
    before = sorted(os.listdir(default_dir)) if not created else []
    default_dir.mkdir(parents=True, exist_ok=True)  # the mount point; removed again below
    server: Process | None = None
    try:
        server = host.spawn(
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount -t tmpfs tmpfs {default_dir} && exec {NC} server",
            name="server",
        )

        def inside(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                ["nsenter", "-t", str(server.pid), "-m", "-n", *args], capture_output=True, text=True, timeout=60
            )

        wait_for(lambda: inside(str(NC), "adm", "health").returncode == 0, timeout=30, what="default server healthy")
        join = inside(str(NC), "adm", "token", "create").stdout.strip()
        match = JOIN_RE.match(join)
        assert match and match["addr"] == BOOTSTRAP, join
        token = join_node(node, join, lab.dir / "node")
        listed = json.loads(inside(str(NC), "adm", "node", "list", "-o", "json").stdout)
        assert token in {n["nodeToken"] for n in listed}
        modes = inside("find", str(default_dir), "-name", "*.key", "-printf", "%m %p\n").stdout.split("\n")
        modes = [line for line in modes if line]
        assert len(modes) == 5 and all(line.startswith("600 ") for line in modes), modes
        found = inside("ls", f"{default_dir}/nc.db", f"{default_dir}/logs/nc-server.log", f"{default_dir}/tls/admin")
        assert found.returncode == 0, found.stderr
        assert inside("findmnt", "-n", "-o", "FSTYPE", str(default_dir)).stdout.strip() == "tmpfs"
    finally:
        if server is not None:
            server.stop()
        if created:
            os.rmdir(default_dir)
    assert server.log().count("Traceback") == 0
    assert subprocess.run(["findmnt", "--mountpoint", str(default_dir)], capture_output=True).returncode != 0
    if not created:
        assert sorted(os.listdir(default_dir)) == before


# -- joins ----------------------------------------------------------------------------


def test_join_registers_an_idle_node_listed_in_camel_case(lab: Lab) -> None:
    """token create -> adm join from another namespace: credentials saved, node listed idle without address."""
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    join = server.join_string()
    work = lab.dir / "node"
    token = join_node(node, join, work)
    nodes = server.adm_json("node", "list")
    assert all(set(n) == NODE_KEYS for n in nodes), nodes
    by_token = {n["nodeToken"]: n for n in nodes}
    assert by_token[token]["connState"] == -1 and by_token[token]["bindIp"] == ""
    assert by_token["reserverd"]["bindIp"] == "10.1.1.1" and by_token["reserverd"]["connState"] == 3
    state = server.adm_json("node", "state", "--node-token", token)
    assert state["connState"] == -1 and state["nodeToken"] == token and "bindIp" in state
    config = ncctl.load_config(str(work / "client.yml"), "client")
    assert (config.token, config.server_addr, config.port) == (token, SERVER_IP, 6441)
    for kind in ("grpc", "network"):
        files = node_tls(work, kind)
        assert mode_of(files["key"]) == 0o600
        cert = x509.load_pem_x509_certificate(files["cert"].read_bytes())
        assert ncctl.peer_cert(files["cert"].read_bytes()).common_name == token
        ca = x509.load_pem_x509_certificate(files["ca"].read_bytes())
        cert.verify_directly_issued_by(ca)
    assert mode_of(work / "client.yml") == 0o600
    tokens = server.adm_json("token", "list")
    assert [t["tokenId"] for t in tokens] == [join.split(".")[0]]
    assert join.split("@")[0] not in server.adm("token", "list", "-o", "json").stdout  # the secret is never listed


def test_refused_tokens_are_one_line_errors(lab: Lab) -> None:
    """Expired, deleted, unknown, malformed and used-up single-use tokens are refused, adding no node."""
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    pin = JOIN_RE.match(server.join_string())["pin"]
    used = server.join_string("--single-use")
    join_node(node, used, lab.dir / "first")
    expired = server.join_string("--life", "60")
    db_execute(
        db_path(server),
        "UPDATE token_mgr SET expire_time = '2000-01-01 00:00:00' WHERE token = ?",
        (expired.split("@")[0],),
    )
    deleted = server.join_string()
    server.adm("token", "delete", deleted.split("@")[0])
    before = node_tokens(server)
    cases = {
        "expired": (expired, "expired"),
        "deleted": (deleted, "unknown or was deleted"),
        "unknown": (f"zzzzzz.0123456789abcdef@{BOOTSTRAP}#{pin}", "unknown or was deleted"),
        "single-use": (used, "single-use and has already been used"),
        "malformed": (f"short@{BOOTSTRAP}#{pin}", "malformed"),
        "not a join string": ("just-some-text", "join string must look like"),
    }
    for label, (join, needle) in cases.items():
        line = one_error_line(adm_join(node, join, lab.dir / label))
        assert needle in line, (label, line)
        assert not (lab.dir / label / "client.yml").exists(), label
    assert node_tokens(server) == before


def test_token_delete_by_id(lab: Lab) -> None:
    """`nc adm token delete ID` with the id that `token list` shows deletes the token."""
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    join = server.join_string()
    token_id = join.split(".")[0]
    assert [t["tokenId"] for t in server.adm_json("token", "list")] == [token_id]
    done = server.adm("token", "delete", token_id, check=False)
    assert done.returncode == 0, done.stderr
    assert server.adm_json("token", "list") == []
    assert "unknown or was deleted" in one_error_line(adm_join(node, join, lab.dir / "n"))


def test_wrong_pin_is_refused_before_the_token_is_sent(lab: Lab) -> None:
    """A join string whose CA pin is wrong fails before GetToken: the single-use token still works after."""
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    join = server.join_string("--single-use")
    wrong = with_pin(join, hashlib.sha256(b"someone else's CA").hexdigest())
    before = node_tokens(server)
    line = one_error_line(adm_join(node, wrong, lab.dir / "wrong"))
    assert "not the one in the join string" in line and "not sent" in line, line
    assert not (lab.dir / "wrong" / "client.yml").exists()
    assert node_tokens(server) == before
    assert "joined with bootstrap token" not in server.process.log()
    token = join_node(node, join, lab.dir / "right")
    assert node_tokens(server) == before | {token}


def test_original_join_string_without_pin_needs_the_unsafe_flag(lab: Lab) -> None:
    """The original 3-part join string token@ip:port is refused (as kubeadm refuses a join without
    a CA hash) unless --unsafe-skip-ca-pin is given; then it joins, with a warning."""
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    join = server.join_string().split("#")[0]
    assert BOOTSTRAP_TOKEN_RE.match(join.split("@")[0]) and join.endswith(f"@{BOOTSTRAP}")
    refused = adm_join(node, join, lab.dir / "node")
    assert "--unsafe-skip-ca-pin" in one_error_line(refused)
    client = node.nc("client", "--join", join, "--work-dir", str(lab.dir / "node-c"), check=False)
    assert "--unsafe-skip-ca-pin" in one_error_line(client)
    done = adm_join(node, join, lab.dir / "node", "--unsafe-skip-ca-pin")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert NODE_TOKEN_RE.match(token)
    assert "WARNING" in done.stderr and "no CA pin" in done.stderr, done.stderr
    assert token in node_tokens(server)


def test_single_use_token_raced_by_parallel_joins_admits_one(lab: Lab) -> None:
    """Six joins race one single-use token: exactly one succeeds, the others get a one-line refusal (exit 3)."""
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    join = server.join_string("--single-use")
    before = node_tokens(server)
    procs = [node.spawn_nc("adm", "join", join, "--work-dir", str(lab.dir / f"r{i}"), name=f"r{i}") for i in range(6)]
    codes = [p.popen.wait(60) for p in procs]
    assert sorted(codes) == [0, 3, 3, 3, 3, 3], [p.log() for p in procs]  # 3: refused for good
    winner = procs[codes.index(0)].log().strip()
    assert node_tokens(server) == before | {winner}
    for p, code in zip(procs, codes):
        if code:
            assert "single-use" in p.log() and "Traceback" not in p.log(), p.log()


def test_a_join_whose_reply_was_lost_is_retried_with_its_single_use_token(lab: Lab) -> None:
    """A GetToken answered but never heard of again (its reply lost): the same single-use join
    string still joins a node that connects, the lost credentials never work, the token counts
    one use, and the node list holds only the node that arrived."""
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    join = server.join_string("--single-use")
    before = node_tokens(server)
    ca = admin_tls(server)["ca"]
    lost = lost_join(node, BOOTSTRAP, join, ca, lab.dir)
    [listed] = server.adm_json("token", "list")
    assert (listed["state"], listed["uses"]) == ("valid", 0), "a join nobody confirmed spends nothing"
    client = start_client(node, join)
    assert client.overlay_ip()
    [listed] = server.adm_json("token", "list")
    assert (listed["state"], listed["uses"]) == ("used", 1)
    assert node_tokens(server) == before | {client.token()}
    refused = grpc_call(node, CONTROL, "LiteKubeNCService", "HealthCheck", "HealthCheckRequest", ca=ca, **lost)
    assert refused["ok"] is False, refused
    assert "single-use" in one_error_line(adm_join(node, join, lab.dir / "late"))


# -- mutual TLS on the control port --------------------------------------------------------


def test_control_port_needs_a_client_cert_from_the_grpc_ca(lab: Lab) -> None:
    """Port 6440 refuses no certificate and a network-CA certificate; the admin certificate works remotely."""
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    work = lab.dir / "node"
    token = join_node(node, server.join_string(), work)
    grpc_ca = node_tls(work, "grpc")["ca"]
    network = node_tls(work, "network")
    # The bootstrap port is server-side TLS only: the same probe without a certificate succeeds there.
    open_call = grpc_call(
        node, BOOTSTRAP, "LiteKubeNCBootstrapService", "HealthCheck", "HealthCheckRequest", ca=grpc_ca
    )
    assert open_call == {"ok": True, "response": {"code": "200"}}
    no_cert = grpc_call(node, CONTROL, "LiteKubeNCService", "HealthCheck", "HealthCheckRequest", ca=grpc_ca)
    assert no_cert["ok"] is False, no_cert
    wrong_ca = grpc_call(
        node,
        CONTROL,
        "LiteKubeNCService",
        "CheckConnState",
        "CheckConnStateRequest",
        ca=grpc_ca,
        cert=network["cert"],
        key=network["key"],
        token=token,
    )
    assert wrong_ca["ok"] is False, wrong_ca
    one_error_line(adm_with(node, {**network, "ca": grpc_ca}, "node", "list"))
    admin = admin_tls(server)
    done = adm_with(node, admin, "-o", "json", "node", "list")
    assert done.returncode == 0, done.stderr
    assert token in {n["nodeToken"] for n in json.loads(done.stdout)}
    # The original GetBootStrapToken over the control port, as the original ncadm calls it.
    minted = grpc_call(
        node,
        CONTROL,
        "LiteKubeNCService",
        "GetBootStrapToken",
        "GetBootStrapTokenRequest",
        ca=admin["ca"],
        cert=admin["cert"],
        key=admin["key"],
        expireTime=5,
    )
    assert minted["ok"], minted
    response = minted["response"]
    assert response["code"] == "200" and BOOTSTRAP_TOKEN_RE.match(response["bootStrapToken"])
    assert (response["cloudIp"], response["port"]) == (SERVER_IP, "6439")
    # ... and the original GetToken on the bootstrap port with that token.
    got = grpc_call(
        node,
        BOOTSTRAP,
        "LiteKubeNCBootstrapService",
        "GetToken",
        "GetTokenRequest",
        ca=grpc_ca,
        bootStrapToken=response["bootStrapToken"],
    )
    assert got["ok"] and got["response"]["code"] == "200", got
    body = got["response"]
    assert NODE_TOKEN_RE.match(body["token"])
    assert (body["networkServerIp"], body["networkServerPort"]) == (SERVER_IP, "6441")
    assert (body["GrpcServerIp"], body["GrpcServerPort"]) == ("10.1.1.1", "6440")  # the overlay, as the original
    assert b"BEGIN CERTIFICATE" in base64.b64decode(body["NetworkClientCert"])
    assert body["token"] in node_tokens(server)


def test_node_grpc_cert_reaches_the_original_service_but_not_admin(lab: Lab) -> None:
    """A node's own gRPC certificate may call LiteKubeNCService (CheckConnState), never NcAdminService."""
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    work = lab.dir / "node"
    token = join_node(node, server.join_string(), work)
    creds = node_tls(work, "grpc")
    state = grpc_call(
        node, CONTROL, "LiteKubeNCService", "CheckConnState", "CheckConnStateRequest", **creds, token=token
    )
    assert state["ok"], state
    assert state["response"]["code"] == "200" and state["response"]["connState"] == -1
    done = adm_with(node, creds, "node", "state", "--node-token", token)
    assert done.returncode == 0 and token in done.stdout, done.stderr
    tokens_before = server.adm_json("token", "list")
    for method, request in (("ListNodes", "ListNodesRequest"), ("CreateBootstrapToken", "CreateBootstrapTokenRequest")):
        denied = grpc_call(node, CONTROL, "NcAdminService", method, request, **creds)
        assert denied == {"ok": False, "status": "PERMISSION_DENIED", "details": "admin credentials required"}, denied
    line = one_error_line(adm_with(node, creds, "node", "list"))
    assert "admin credentials required" in line, line
    assert server.adm_json("token", "list") == tokens_before  # the denied CreateBootstrapToken minted nothing


def test_permission_denial_is_not_logged_as_a_server_failure(lab: Lab) -> None:
    """A node certificate refused by NcAdminService is routine: no ERROR line or traceback in nc-server.log."""
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    work = lab.dir / "node"
    join_node(node, server.join_string(), work)
    assert "admin credentials required" in one_error_line(adm_with(node, node_tls(work, "grpc"), "node", "list"))
    log = (server.work_dir / "logs" / "nc-server.log").read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


# -- restarts and crashes -----------------------------------------------------------------


def test_restart_reuses_pki_and_database(lab: Lab) -> None:
    """A second start on the same workDir keeps the CA (same pin), the database (node listed) and node certs valid."""
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    work = lab.dir / "node"
    first_pin = JOIN_RE.match(server.join_string())["pin"]
    token = join_node(node, server.join_string(), work)
    tls = server.work_dir / "tls"
    ca_bytes = {p: p.read_bytes() for p in tls.rglob("*") if p.is_file()}
    second = server.host.nc("server", "--config", str(server.config), check=False, timeout=30)
    assert "another nc server" in one_error_line(second)
    assert server.process.stop() == 0
    server.start()
    assert JOIN_RE.match(server.join_string())["pin"] == first_pin
    assert {p: p.read_bytes() for p in ca_bytes} == ca_bytes
    assert server.node(token)["connState"] == -1
    state = grpc_call(
        node,
        CONTROL,
        "LiteKubeNCService",
        "CheckConnState",
        "CheckConnStateRequest",
        **node_tls(work, "grpc"),
        token=token,
    )
    assert state["ok"] and state["response"]["code"] == "200", state


def test_sigkill_during_concurrent_joins_loses_no_committed_node(lab: Lab) -> None:
    """20 joins in parallel, the server SIGKILLed mid-way: every join that printed a node token survives restart."""
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    join = server.join_string("--life", "60")
    procs = [node.spawn_nc("adm", "join", join, "--work-dir", str(lab.dir / f"j{i}"), name=f"j{i}") for i in range(20)]

    def committed() -> int:
        return db_execute(db_path(server), "SELECT count(*) FROM network_mgr")[0][0]

    wait_for(lambda: committed() >= 4, timeout=40, interval=0.01, what="three joins committed")
    server.process.send_signal(signal.SIGKILL)
    server.process.popen.wait(10)
    codes = [p.popen.wait(60) for p in procs]
    printed: dict[str, int] = {}
    for i, (p, code) in enumerate(zip(procs, codes)):
        assert "Traceback" not in p.log(), p.log()
        if code == 0:
            lines = [line for line in p.log().splitlines() if NODE_TOKEN_RE.match(line)]
            assert len(lines) == 1, p.log()
            printed[lines[0]] = i
    assert printed, "no join finished before the kill"
    assert len(printed) < 20, "every join finished before the kill: it did not land mid-way"
    server.start()
    listed = node_tokens(server)
    assert set(printed) <= listed, f"lost: {set(printed) - listed}"
    for token, i in printed.items():
        assert ncctl.load_config(str(lab.dir / f"j{i}" / "client.yml"), "client").token == token


# -- the admin CLI ------------------------------------------------------------------------


def test_original_ncadm_aliases(lab: Lab) -> None:
    """create-bootstrap-token --life, get-token, check-conn-state, unregister and check-health work as aliases."""
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    join = server.adm("create-bootstrap-token", "--life", "5").stdout.strip()
    assert JOIN_RE.match(join), join
    forever = server.adm("create-bootstrap-token", "--life", "-1").stdout.strip()
    expiry = {t["tokenId"]: t["expireTime"] for t in server.adm_json("token", "list")}
    assert expiry[forever.split(".")[0]] == "never" and expiry[join.split(".")[0]] != "never"
    done = node.nc("adm", "get-token", join, "--work-dir", str(lab.dir / "a"))
    token = done.stdout.strip()
    assert NODE_TOKEN_RE.match(token)
    other = join_node(node, forever, lab.dir / "b")
    state = server.adm("check-conn-state", "--node-token", token).stdout
    assert token in state and "(-1)" in state, state
    assert server.adm_json("check-conn-state", "--node-token", token)["connState"] == -1
    assert server.adm("check-health").returncode == 0
    assert server.adm("unregister", "--node-token", token).returncode == 0
    assert token not in node_tokens(server)
    assert "not registered" in one_error_line(server.adm("unregister", "--node-token", token, check=False))
    assert server.adm("node", "unregister", "--node-token", other).returncode == 0
    assert node_tokens(server) == {"reserverd"}
    assert "cannot be unregistered" in one_error_line(
        server.adm("unregister", "--node-token", "reserverd", check=False)
    )
    gone = server.adm("check-conn-state", "--node-token", token, check=False)
    assert "not registered" in one_error_line(gone)


def test_every_command_has_help(nc_binary: Path) -> None:
    """`--help` exits 0 with a usage line for the program and every command, subcommand and alias."""
    paths = command_paths(ncctl.build_parser())
    expected = {
        (),
        ("server",),
        ("client",),
        ("version",),
        ("adm",),
        ("adm", "token", "create"),
        ("adm", "token", "list"),
        ("adm", "token", "delete"),
        ("adm", "join"),
        ("adm", "get-token"),
        ("adm", "node", "list"),
        ("adm", "node", "state"),
        ("adm", "node", "unregister"),
        ("adm", "health"),
        ("adm", "check-health"),
        ("adm", "create-bootstrap-token"),
        ("adm", "check-conn-state"),
        ("adm", "unregister"),
    }
    assert expected <= set(paths), expected - set(paths)
    for path in paths:
        done = subprocess.run([str(nc_binary), *path, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (path, done.stderr)
        assert done.stdout.startswith("usage: nc"), (path, done.stdout[:200])
        # an alias prints its canonical name, so only the parent path is certain
        assert done.stdout.startswith(" ".join(["usage: nc", *path[:-1]])), (path, done.stdout[:200])
        assert done.stderr == "", (path, done.stderr)


def test_health_exit_codes(lab: Lab) -> None:
    """`nc adm health` exits 0 while the server runs and non-zero, one report per port, once it is down."""
    server = start_server(lab.add_host("server"))
    done = server.adm("health")
    assert done.returncode == 0
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["control", "bootstrap", "data"]
    report = server.adm_json("health")
    assert report["healthy"] is True and report["control"]["ok"] and report["bootstrap"]["ok"] and report["data"]["ok"]
    server.process.stop()
    down = server.adm("health", check=False)
    assert down.returncode != 0
    assert down.stdout.count("FAILED") == 3, down.stdout
    down_json = json.loads(server.adm("health", "-o", "json", check=False).stdout)
    assert down_json["healthy"] is False


def test_version_prints_versions(nc_binary: Path) -> None:
    """`nc version` names nc, Python and each runtime dependency with a version."""
    done = subprocess.run([str(nc_binary), "version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["nc"] == ncctl.VERSION
    assert lines["python"].split()[0].count(".") == 2 and "(CPython, " in lines["python"]
    assert lines["packages"].startswith("set cp3") and lines["file"].startswith(str(nc_binary))
    for dist in ("grpcio", "grpcio-reflection", "grpcio-health-checking", "protobuf", "cryptography", "PyYAML"):
        assert dist in lines and lines[dist] != "missing" and lines[dist][0].isdigit(), (dist, done.stdout)
