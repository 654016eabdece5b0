"""The command line as scripts use it: `nc --version`, `adm` flags before or after the
command, the original ncadm's own invocations (its global flags, get-token's flags), the
exit codes in `--help`, and `nc adm config check` (a file validated, nothing started)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from control_helpers import JOIN_RE, NODE_TOKEN_RE, admin_tls, one_error_line
from netlab import Lab, start_client, start_server

SERVER_IP = "198.18.0.1"


def test_version_and_the_exit_codes_are_in_the_help(lab: Lab) -> None:
    host = lab.add_host("host")
    assert host.nc("--version").stdout.strip() == host.nc("version").stdout.splitlines()[0]
    epilog = host.nc("--help").stdout.split("exit codes:", 1)[1]
    codes = [line.split()[0] for line in epilog.strip().splitlines()]
    assert codes == ["0", "1", "2", "3", "130"], epilog


def test_adm_flags_go_before_or_after_the_command(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    start_client(lab.add_host("node"), server.join_string())
    config = str(server.config)
    before = server.host.nc("adm", "--config", config, "-o", "json", "node", "list").stdout
    after = server.host.nc("adm", "node", "list", "--config", config, "-o", "json").stdout
    tokens = [{node["nodeToken"] for node in json.loads(listed)} for listed in (before, after)]
    assert tokens[0] == tokens[1] and len(tokens[1]) == 2, tokens  # the node and the reserved one
    health = server.host.nc("adm", "health", "--config", config, "--server", f"{SERVER_IP}:6440", "-o", "json")
    assert json.loads(health.stdout)["control"]["address"] == f"{SERVER_IP}:6440"
    unknown = server.host.nc("adm", "node", "list", "--config", config, "--colour", check=False)
    assert unknown.returncode == 2 and "unrecognized arguments: --colour" in unknown.stderr


def test_the_original_ncadm_invocations_work_as_written(lab: Lab) -> None:
    """Its global flags (--ip --port --bootport --cacert --cert --key) before its command
    names, `--flag=value` as its documentation writes them, and get-token's flags."""
    server = start_server(lab.add_host("server"))
    tls = admin_tls(server)
    ncadm = ("adm", "--ip", SERVER_IP, "--port", "6440", "--bootport", "6439")
    creds = (f"--cacert={tls['ca']}", f"--cert={tls['cert']}", f"--key={tls['key']}")
    assert server.host.nc(*ncadm, *creds, "check-health").returncode == 0
    join = server.host.nc(*ncadm, *creds, "create-bootstrap-token", "--life=10").stdout.strip()
    token = JOIN_RE.match(join)["token"]  # type: ignore[index]
    node = lab.add_host("node")
    ca_copy = lab.dir / "node-ca.pem"  # what the original's --cacert names on a node: the gRPC CA
    shutil.copy(tls["ca"], ca_copy)
    network_dir, grpc_dir = lab.dir / "certs" / "network", lab.dir / "certs" / "grpc"
    got = node.nc(
        "adm",
        "--ip",
        SERVER_IP,
        f"--cacert={ca_copy}",
        "get-token",
        f"--bootstrap-token={token}",
        f"--network-certs-dir={network_dir}",
        f"--grpc-certs-dir={grpc_dir}",
        "--work-dir",
        str(lab.dir / "node-work"),
    )
    node_token = got.stdout.strip()
    assert NODE_TOKEN_RE.match(node_token), got.stdout
    for directory in (network_dir, grpc_dir):
        assert sorted(p.name for p in directory.iterdir()) == ["ca.pem", "client-key.pem", "client.pem"]
    state = server.host.nc(*ncadm, *creds, "check-conn-state", f"--node-token={node_token}", "-o", "json").stdout
    assert json.loads(state)["connState"] == -1, state  # joined, never connected
    assert server.host.nc(*ncadm, *creds, "unregister", f"--node-token={node_token}").returncode == 0
    unpinned = node.nc(
        "adm",
        "--ip",
        SERVER_IP,
        "--cacert",
        str(lab.dir / "absent.pem"),
        "get-token",
        f"--bootstrap-token={token}",
        "--work-dir",
        str(lab.dir / "w2"),
        check=False,
    )
    assert unpinned.returncode == 2 and "--unsafe-skip-ca-pin" in one_error_line(unpinned)


def test_config_check_validates_a_file_without_starting_anything(lab: Lab, tmp_path: Path) -> None:
    host = lab.add_host("host")
    good = tmp_path / "server.yml"
    good.write_text("mode: server\nserver:\n  workDir: /var/lib/nc-never-made\n  networkAddr: 10.9.0.1/24\n")
    done = host.nc("adm", "config", "check", "--config", str(good))
    assert done.stdout.strip() == f"ok: {good} is a valid server config"
    assert not Path("/var/lib/nc-never-made").exists()
    client = tmp_path / "client.yml"
    client.write_text("mode: client\nclient:\n  serverAddr: 198.18.0.1\n  transprot: tcp\n")
    done = host.nc("adm", "--config", str(client), "config", "check", check=False)
    line = one_error_line(done)
    assert done.returncode == 2 and line.endswith("client.transprot: unknown field; did you mean transport?"), line
    good.write_text(
        "mode: server\nserver:\n  networkAddr: 10.9.0.1/24\n  networks:\n  - {name: b, cidr: 10.9.0.1/16}\n"
    )
    line = one_error_line(host.nc("adm", "config", "check", "--config", str(good), check=False))
    assert "overlaps network 'default'" in line, line
