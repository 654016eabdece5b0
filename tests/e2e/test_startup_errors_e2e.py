"""Start-up and user errors: each is one `nc: error:` line naming the cause and the fix,
a non-zero exit and no traceback; a server that fails half-way through its start
removes what it had already set up (TUN, ports, rules, ip_forward)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from control_helpers import db_path, one_error_line
from netlab import NC, SCRIPTS, Host, Lab, NcServer, Process, start_client, start_server, wait_for
from overlay_helpers import SERVER_OVERLAY_IP, wait_connected


def write_server_config(host: Host, **fields: object) -> Path:
    """server.yml with a workDir in the lab dir plus the given camelCase fields."""
    config = host.lab.dir / f"{host.name}-server.yml"
    body = {"workDir": str(host.lab.dir / f"{host.name}-work"), **fields}
    config.write_text(json.dumps({"mode": "server", "server": body}))
    return config


def run_server(host: Host, config: Path, prelude: str = "", env: str = "") -> subprocess.CompletedProcess:
    """`nc server` in host that must fail by itself; `prelude` runs first in a private mount
    namespace (mounts there vanish with the process), `env` prefixes the command."""
    command = f"{prelude}\nexec {env} {NC} server --config {shlex.quote(str(config))}"
    return host.run("unshare", "--mount", "--propagation", "private", "sh", "-ec", command, check=False, timeout=60)


def assert_nothing_left(host: Host) -> None:
    """What a failed start must not leave behind: its TUN, its rules, forwarding on."""
    assert not host.has_link("ncsrv0")
    assert "nc:ncsrv0" not in host.run("iptables-save").stdout
    assert host.run("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "0"


def occupy(host: Host, port: int) -> Process:
    """A listener on port inside host, held until the returned process is stopped."""
    process = host.spawn("python3", str(SCRIPTS / "occupy_port.py"), str(port), name=f"occupy-{port}")
    process.wait_for_output("listening", what=f"a listener on {port}")
    return process


def test_each_port_in_use_is_one_line_and_the_partial_start_is_undone(lab: Lab) -> None:
    host = lab.add_host("server")
    config = write_server_config(host, gateway=True)
    for port, field in ((6441, "server.port"), (6440, "server.grpcPort"), (6439, "server.bootstrapPort")):
        holder = occupy(host, port)
        line = one_error_line(run_server(host, config))
        assert f":{port}" in line and field in line, line
        assert_nothing_left(host)
        holder.stop()
    assert start_server(host, gateway=True).healthy()


def test_read_only_work_dir(lab: Lab) -> None:
    host = lab.add_host("server")
    work = host.lab.dir / "ro-work"
    work.mkdir()
    config = write_server_config(host, workDir=str(work))
    done = run_server(host, config, prelude=f"mount --bind -o ro {work} {work}")
    line = one_error_line(done)
    assert str(work) in line and "read-only" in line.lower(), line
    assert_nothing_left(host)


def test_full_work_dir(lab: Lab) -> None:
    host = lab.add_host("server")
    work = host.lab.dir / "full-work"
    work.mkdir()
    config = write_server_config(host, workDir=str(work))
    prelude = f"mount -t tmpfs -o size=256k tmpfs {work}\ndd if=/dev/zero of={work}/filler bs=4k 2>/dev/null || true"
    line = one_error_line(run_server(host, config, prelude=prelude))
    assert "no space left" in line.lower() and "free" in line, line
    assert_nothing_left(host)


def test_gateway_without_iptables(lab: Lab) -> None:
    host = lab.add_host("server")
    bin_dir = host.lab.dir / "bin"
    bin_dir.mkdir()
    python = subprocess.check_output(["python3", "-c", "import sys; print(sys.executable)"], text=True)
    (bin_dir / "python3").symlink_to(python.strip())  # the interpreter itself, not a wrapper (pyenv shims)
    (bin_dir / "ip").symlink_to(shutil.which("ip") or "/usr/sbin/ip")
    config = write_server_config(host, gateway=True)
    line = one_error_line(run_server(host, config, env=f"env PATH={bin_dir}"))
    assert "iptables" in line and "install" in line, line
    assert_nothing_left(host)


def test_no_tun_device(lab: Lab) -> None:
    host = lab.add_host("server")
    config = write_server_config(host, gateway=True)
    line = one_error_line(run_server(host, config, prelude="mount -t tmpfs tmpfs /dev/net"))
    assert "/dev/net/tun" in line, line
    assert_nothing_left(host)


def test_non_root(lab: Lab) -> None:
    host = lab.add_host("server")
    config = write_server_config(host)
    shiv = Path(tempfile.mkdtemp(prefix="nc-test-shiv-"))  # somewhere user nobody may unpack ./nc
    try:
        shiv.chmod(0o777)
        env = f"setpriv --reuid=65534 --regid=65534 --clear-groups env SHIV_ROOT={shiv}"
        line = one_error_line(run_server(host, config, env=env))
    finally:
        shutil.rmtree(shiv)
    assert "must run as root" in line, line


def test_corrupt_database_names_the_file_and_the_recovery(lab: Lab) -> None:
    host = lab.add_host("server")
    server = start_server(host)
    server.join_string()
    assert server.process.stop() == 0
    database = db_path(server)
    with database.open("r+b") as handle:  # page 2 and on; the header page stays intact
        handle.seek(4096)
        handle.write(b"\xa5" * 8192)
    line = one_error_line(run_server(host, server.config))
    assert str(database) in line and "nc adm restore" in line, line
    assert_nothing_left(host)


def test_backup_and_restore_round_trip(lab: Lab) -> None:
    host = lab.add_host("server")
    server = start_server(host)
    join = server.join_string("--life", "-1")
    backup = host.lab.dir / "nc-backup.db"
    assert server.adm("backup", "--out", str(backup)).returncode == 0
    tokens_then = server.adm_json("token", "list")
    server.adm("token", "create")
    refused = server.adm("restore", "--from", str(backup), check=False)
    assert "stop" in one_error_line(refused)
    assert server.process.stop() == 0
    database = db_path(server)
    database.write_bytes(b"this is not a database" * 100)
    assert server.adm("restore", "--from", str(backup)).returncode == 0
    server.start()
    assert server.adm_json("token", "list") == tokens_then
    assert len(tokens_then) == 1 and join.startswith(tokens_then[0]["tokenId"]), (join, tokens_then)


def test_backup_of_a_missing_file_and_restore_of_garbage_are_one_line(lab: Lab) -> None:
    host = lab.add_host("server")
    server = start_server(host)
    one_error_line(server.adm("backup", "--out", "/nonexistent-dir/x.db", check=False))
    assert server.process.stop() == 0
    garbage = host.lab.dir / "garbage.db"
    garbage.write_bytes(b"garbage" * 1000)
    one_error_line(server.adm("restore", "--from", str(garbage), check=False))
    one_error_line(server.adm("restore", "--from", str(host.lab.dir / "missing.db"), check=False))
    server.start()
    assert server.healthy()


def test_a_full_disk_keeps_no_known_node_out(lab: Lab) -> None:
    """The database sits on a small tmpfs (in the server's own mount namespace) that is
    then filled: a node that reconnects is still admitted, and the server says so once."""
    server_host, node = lab.add_host("server"), lab.add_host("node")
    db_dir = lab.dir / "db"
    db_dir.mkdir()
    config = write_server_config(server_host, dbPath=str(db_dir / "nc.db"), keepalive=2)
    command = f"mount -t tmpfs -o size=2m tmpfs {db_dir}\nexec {NC} server --config {config}"
    process = server_host.spawn("unshare", "--mount", "--propagation", "private", "sh", "-ec", command, name="server")
    server = NcServer(server_host, process, config, lab.dir / "server-work")
    wait_for(server.healthy, timeout=30, what="the server to become healthy")
    client = start_client(node, server.join_string())
    wait_connected(server, client)
    fill = f"dd if=/dev/zero of={db_dir}/filler bs=4k 2>/dev/null || true"
    server_host.run("nsenter", "--target", str(process.pid), "--mount", "sh", "-c", fill)
    for _ in range(2):
        assert client.process.stop() == 0
        client.restart()
        wait_for(client.overlay_ip, what="the node to reconnect")
        assert node.ping(SERVER_OVERLAY_IP, count=2), client.process.log()
    assert process.log().count("admitting nodes without recording their connection state") == 1, process.log()
    assert process.alive()


# -- the CLI: one line, exit 2 --------------------------------------------------


def test_cli_bad_config_is_one_line_exit_2(lab: Lab) -> None:
    """`nc server|client|adm --config bad.yml` prints one line naming file and field, exits 2, no traceback."""
    host = lab.add_host("cfg")
    server_bad = lab.dir / "bad-server.yml"
    server_bad.write_text("mode: server\nserver:\n  grpcPort: 70000\n")
    client_bad = lab.dir / "bad-client.yml"
    client_bad.write_text("mode: client\nclient:\n  colour: blue\n")
    unknown = lab.dir / "unknown.yml"
    unknown.write_text("mode: server\nserver:\n  networkAddr: 10.1.1.0/99\n")
    cases = [
        (("server", "--config", str(server_bad)), str(server_bad), "grpcPort"),
        (("server", "--config", str(unknown)), str(unknown), "networkAddr"),
        (("client", "--config", str(client_bad)), str(client_bad), "colour"),
        (("adm", "--config", str(server_bad), "health"), str(server_bad), "grpcPort"),
        (("server", "--config", str(lab.dir / "nope.yml")), str(lab.dir / "nope.yml"), "no such file"),
    ]
    for args, path, field in cases:
        done = host.nc(*args, check=False, timeout=30)
        line = one_error_line(done)
        assert done.returncode == 2, (args, done.returncode, done.stderr)
        assert path in line and field in line, line
        assert done.stdout == "", done.stdout
