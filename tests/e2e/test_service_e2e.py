"""nc as a system service: a unit systemd accepts, READY=1 and watchdog pings over a
fake NOTIFY_SOCKET, SIGHUP reloading without dropping sessions (server and client, and
never an exit), units that do not restart on a config error, one line per record under
journald."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from netlab import NC, SCRIPTS, Host, Lab, NcClient, NcServer, Process, start_client, start_server, wait_for
from overlay_helpers import wait_connected


def port_open(host: Host, port: int) -> bool:
    return host.run(sys.executable, str(SCRIPTS / "probe_connect.py"), str(port)).stdout.startswith("open")


def spawn_server_with_env(host: Host, env: dict[str, str], **fields: object) -> tuple[Process, Path]:
    """`nc server` with extra environment; returns the process and its server.yml."""
    config = host.lab.dir / f"{host.name}-server.yml"
    body = {"workDir": str(host.lab.dir / f"{host.name}-work"), **fields}
    config.write_text(json.dumps({"mode": "server", "server": body}))
    words = [f"{key}={value}" for key, value in env.items()]
    return host.spawn("env", *words, str(NC), "server", "--config", str(config), name="server"), config


def test_install_service_prints_units_systemd_accepts(lab: Lab, tmp_path: Path) -> None:
    server = start_server(lab.add_host("server"))
    for mode, args in (("server", ["--config", str(server.config)]), ("client", [])):
        unit = subprocess.run(
            [str(NC), "install-service", mode, *args, "--print"], capture_output=True, text=True, check=True
        ).stdout
        for line in ("Type=notify", "Restart=on-failure", "WatchdogSec=30s", "ExecReload=/bin/kill -HUP $MAINPID"):
            assert line in unit.splitlines(), (line, unit)
        assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_NET_RAW" in unit
        assert f"ExecStart=/usr/local/lib/nc/nc {mode}" in unit
        path = tmp_path / f"nc-{mode}.service"
        path.write_text(unit.replace("/usr/local/lib/nc/nc", str(NC)))  # verify wants the file it runs to exist
        verified = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
        assert verified.returncode == 0 and verified.stderr == "", verified.stderr
    assert (
        f"ReadWritePaths={server.work_dir}"
        in subprocess.run(
            [str(NC), "install-service", "server", "--config", str(server.config), "--print"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )


def test_ready_comes_once_the_data_port_listens_and_the_watchdog_is_fed(lab: Lab) -> None:
    host = lab.add_host("server")
    notify_path = lab.dir / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(45)
    try:
        env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "2000000"}
        process, _ = spawn_server_with_env(host, env)
        first = notify.recv(4096).decode()
        data_port_open = port_open(host, 6441)  # asked the moment READY arrived
        assert first.startswith("READY=1"), first
        assert data_port_open and port_open(host, 6440) and port_open(host, 6439)
        assert notify.recv(4096).decode() == "WATCHDOG=1"
        assert notify.recv(4096).decode() == "WATCHDOG=1", "fed again, at half the interval"
        process.stop()
    finally:
        notify.close()


def test_sighup_applies_what_it_can_and_keeps_sessions(lab: Lab) -> None:
    server: NcServer = start_server(lab.add_host("server"))
    client = start_client(lab.add_host("node"), server.join_string())
    ip = wait_connected(server, client)
    doc = json.loads(server.config.read_text())
    doc["server"].update({"nodeMintRate": 3, "debug": True, "mtu": 1300})
    doc["server"]["networks"] = [{"name": "edge-b", "cidr": "10.2.0.1/24"}]
    server.config.write_text(json.dumps(doc))
    server.process.send_signal(signal.SIGHUP)
    server.process.wait_for_output("SIGHUP: re-read", what="the reload line")
    line = next(line for line in server.process.log().splitlines() if "SIGHUP: re-read" in line)
    assert "applied: debug, nodeMintRate, networks (+edge-b)" in line and "needs a restart: mtu" in line, line
    networks = {n["name"]: n for n in server.adm_json("network", "list")}
    assert networks["edge-b"]["cidr"] == "10.2.0.0/24" and networks["edge-b"]["fromConfig"] is True
    assert "#sha256:" in server.join_string("--net", "edge-b")
    assert server.process.alive() and server.healthy()
    assert wait_connected(server, client) == ip
    assert "disconnected" not in server.process.log()
    doc["server"]["mtu"] = "not a number"
    server.config.write_text(json.dumps(doc))
    server.process.send_signal(signal.SIGHUP)
    server.process.wait_for_output("the running configuration stays", what="a refused reload")
    assert server.process.alive()


def test_under_journald_each_record_is_one_line_without_a_timestamp(lab: Lab) -> None:
    host = lab.add_host("server")
    log_path = lab.dir / f"server-{len(lab.processes)}.log"  # the file Host.spawn will write to
    log_path.touch()
    info = os.stat(log_path)
    process, _ = spawn_server_with_env(host, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
    assert process.log_path == log_path
    wait_for(lambda: "nc server ready" in process.log(), timeout=30, what="the server to start")
    process.stop()
    lines = [line for line in process.log().splitlines() if line.strip()]
    assert lines and all(line.startswith(("<6>", "<4>", "<3>", "<7>", "<2>")) for line in lines), lines[:5]
    assert not any("2026-" in line[:12] or line[3:7].isdigit() for line in lines), lines[:5]
    ready = [line for line in lines if "nc server ready" in line]
    assert len(ready) == 1 and ready[0].startswith("<6>INFO MainThread: nc server ready"), ready


def client_status(client: NcClient) -> dict:
    done = client.host.nc("status", "--work-dir", str(client.work_dir), "-o", "json", check=False)
    return json.loads(done.stdout) if done.stdout.strip() else {}


def test_client_sighup_applies_debug_transport_and_replicas_and_never_exits(lab: Lab) -> None:
    """`systemctl reload nc-client`: one line says what was applied and what needs a
    restart; the node stays up (TUN, status socket), and a broken file changes nothing."""
    server: NcServer = start_server(lab.add_host("server"))
    client = start_client(lab.add_host("node"), server.join_string())
    ip = wait_connected(server, client)
    wait_for(lambda: client_status(client).get("transport") == "udp", what="the UDP path to carry")
    doc = yaml.safe_load(client.config.read_text())
    doc["client"].update({"debug": True, "transport": "tcp", "mtu": 1300})
    doc["client"]["serverAddr"] = [server.host.ip, "198.18.0.99"]
    client.config.write_text(yaml.safe_dump(doc))
    client.process.send_signal(signal.SIGHUP)
    client.process.wait_for_output("SIGHUP: re-read", what="the reload line")
    line = next(line for line in client.process.log().splitlines() if "SIGHUP: re-read" in line)
    assert "applied: serverAddr, debug, transport" in line and "needs a restart: mtu" in line, line
    wait_for(lambda: client_status(client).get("transport") == "tcp", what="the node to reconnect over TLS only")
    assert wait_connected(server, client) == ip and client.host.ping("10.1.1.1", count=2)
    client.config.write_text("mode: client\nclient:\n  transport: [\n")
    client.process.send_signal(signal.SIGHUP)
    client.process.wait_for_output("the running configuration stays", what="a refused reload")
    assert client.process.alive() and client_status(client).get("state") == "connected"
    assert client.process.stop() == 0
    assert not (client.work_dir / "nc-client.sock").exists() and not client.host.has_link("nc0")


def test_server_sighup_while_starting_does_not_end_it(lab: Lab) -> None:
    host = lab.add_host("server")
    process, _ = spawn_server_with_env(host, {})
    process.wait_for_output("starting: advertised address", what="the start to begin")
    process.send_signal(signal.SIGHUP)  # still starting (or, on a fast machine, just ready)
    wait_for(lambda: "nc server ready" in process.log() or not process.alive(), timeout=30, what="the start")
    assert process.alive(), process.log()
    process.send_signal(signal.SIGHUP)
    process.wait_for_output("SIGHUP: re-read", what="the reload once running")
    assert process.alive()


def test_install_service_refuses_a_config_that_does_not_exist(tmp_path: Path) -> None:
    missing = Path("/etc/nc-test-missing") / f"server-{os.getpid()}.yml"
    for mode in ("server", "client"):
        done = subprocess.run(
            [str(NC), "install-service", mode, "--config", str(missing), "--root", str(tmp_path / "image")],
            capture_output=True,
            text=True,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and "no such file" in lines[0], done.stderr
        assert lines[0].startswith(f"nc: error: {missing}: ")
        assert not (tmp_path / "image").exists()
    shown = subprocess.run(
        [str(NC), "install-service", "server", "--config", str(missing), "--print"], capture_output=True, text=True
    )
    assert shown.returncode == 0 and "RestartPreventExitStatus=2 3" in shown.stdout.splitlines()
