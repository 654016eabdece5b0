"""`nc status` on a real node, from its local control socket, and `nc adm health`
probing the data port too."""

from __future__ import annotations

import json
import os
import stat

from control_helpers import one_error_line
from netlab import Lab, NcClient, start_client, start_server, wait_for
from overlay_helpers import assert_reaches, wait_connected


def test_status_of_a_connected_node_and_of_one_that_lost_its_server(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    client = start_client(lab.add_host("node"), server.join_string())
    ip = wait_connected(server, client)
    assert_reaches(client.host, "10.1.1.1")
    done = client.host.nc("status", "--work-dir", str(client.work_dir), "-o", "json")
    status = json.loads(done.stdout)
    assert status["state"] == "connected" and status["overlayIp"] == ip
    assert status["server"] == "198.18.0.1:6441" and status["transport"] in ("udp", "tcp")
    assert status["nodeToken"] == client.token() and status["connectedSince"]
    assert status["rttMs"] is not None and status["rttMs"] > 0
    assert status["rxBytes"] > 0 and status["txBytes"] > 0
    sock = client.work_dir / "nc-client.sock"
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600, "root only"
    text = client.host.nc("status", "--work-dir", str(client.work_dir)).stdout
    assert "state:" in text and "connected" in text and ip in text

    server.process.stop()
    wait_for(
        lambda: client.host.nc("status", "--work-dir", str(client.work_dir), check=False).returncode == 1,
        what="status to report the node as not connected",
    )
    connecting = json.loads(
        client.host.nc("status", "--work-dir", str(client.work_dir), "-o", "json", check=False).stdout
    )
    assert connecting["state"] == "connecting" and connecting["connectedSince"] is None, connecting  # never: null
    client.process.stop()
    gone = client.host.nc("status", "--work-dir", str(client.work_dir), check=False)
    assert "no nc client is running" in one_error_line(gone)
    assert not sock.exists()


def test_adm_health_probes_the_data_port(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    health = server.adm_json("health")
    assert health["healthy"] is True and health["data"]["ok"] is True
    assert health["data"]["address"] == "127.0.0.1:6441"


def status_of(client: NcClient) -> dict:
    return json.loads(client.host.nc("status", "--work-dir", str(client.work_dir), "-o", "json", check=False).stdout)


def test_round_trip_is_timed_on_the_path_in_use(lab: Lab) -> None:
    """On the UDP path `nc status` times keepalive echoes over the datagrams themselves;
    on TLS it shows the kernel's TCP estimate; either way it says which."""
    server = start_server(lab.add_host("server"))
    client = start_client(lab.add_host("node"), server.join_string())
    wait_connected(server, client)
    on_udp = wait_for(
        lambda: (s := status_of(client)).get("transport") == "udp" and s.get("rttSource") == "udp-echo" and s,
        timeout=30,
        what="a round trip timed over UDP",
    )
    assert 0 < on_udp["rttMs"] < 500, on_udp
    pinged = client.host.run("ping", "-c", "5", "-i", "0.2", "-q", "10.1.1.1").stdout
    average = float(pinged.rsplit("=", 1)[1].split("/")[1])
    print(f"measured: nc status round trip on UDP {on_udp['rttMs']} ms (udp-echo); ping over the overlay {average} ms")
    text = client.host.nc("status", "--work-dir", str(client.work_dir)).stdout
    assert "(UDP keepalive echo)" in text, text

    tls_server = start_server(lab.add_host("tls-server"), transport="tcp", metricsAddr="")
    tls_client = start_client(lab.add_host("tls-node"), tls_server.join_string())
    wait_connected(tls_server, tls_client)
    on_tls = wait_for(lambda: (s := status_of(tls_client)).get("rttMs") and s, what="a round trip on TLS")
    assert on_tls["transport"] == "tcp" and on_tls["rttSource"] == "tcp-estimate", on_tls
    print(f"measured: nc status round trip on TLS {on_tls['rttMs']} ms (tcp-estimate)")
