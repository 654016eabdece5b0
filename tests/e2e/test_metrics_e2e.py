"""Prometheus /metrics of a real server: scraped over HTTP inside its namespace, parsed
with the Prometheus text parser, and seen to move with traffic and with a bad token."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from control_helpers import adm_join, one_error_line
from flood_helpers import held, start_flood
from netlab import SCRIPTS, Lab, NcServer, start_client, start_server, wait_for
from overlay_helpers import assert_reaches, scrape, value, wait_connected

import ncctl


def test_metrics_follow_nodes_traffic_and_refusals(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    before = scrape(server.host)
    assert value(before, "nc_nodes", network="default", state="connected") == 0
    assert value(before, "nc_pool_addresses", network="default", state="free") == 253
    assert value(before, "nc_refusals_total", reason="token") == 0
    assert ("nc_refusals_total", (("reason", "grpc-limit"),)) in before
    assert "process_resident_memory_bytes" in {name for name, _ in before}

    client = start_client(lab.add_host("node"), server.join_string())
    wait_connected(server, client)
    assert_reaches(client.host, "10.1.1.1")
    client.host.run("ping", "-c", "5", "-i", "0.2", "-q", "10.1.1.1")
    after = scrape(server.host)
    assert value(after, "nc_nodes", network="default", state="connected") == 1
    assert value(after, "nc_pool_addresses", network="default", state="bound") == 1
    assert value(after, "nc_sessions", transport="tcp") + value(after, "nc_sessions", transport="udp") == 1
    for direction in ("rx", "tx"):
        assert value(after, "nc_packets_total", direction=direction) >= 5
        assert value(after, "nc_data_bytes_total", direction=direction) > value(
            before, "nc_data_bytes_total", direction=direction
        )
    assert value(after, "nc_join_duration_seconds_count") == 1
    assert value(after, "nc_handshake_duration_seconds_count") >= 1

    token, _, rest = server.join_string().partition("@")
    bad = f"{token.split('.')[0]}.{'0' * 16}@{rest}"  # a real token id with a wrong secret
    one_error_line(adm_join(lab.add_host("intruder"), bad, lab.dir / "intruder"))
    refused = scrape(server.host)
    assert value(refused, "nc_refusals_total", reason="token") == 1


def test_empty_metrics_addr_turns_metrics_off_and_a_custom_one_is_used(lab: Lab) -> None:
    off = start_server(lab.add_host("off"), metricsAddr="")
    done = off.host.run(
        sys.executable, str(SCRIPTS / "scrape_metrics.py"), "http://127.0.0.1:9441/metrics", check=False
    )
    assert done.returncode != 0 and "Connection refused" in done.stderr
    custom: NcServer = start_server(lab.add_host("custom"), metricsAddr="0.0.0.0:9500")
    assert wait_for(lambda: value(scrape(custom.host, f"{custom.host.ip}:9500"), "nc_sessions", transport="tcp") == 0)


def test_slow_clients_on_the_metrics_port_cost_no_thread_each(lab: Lab) -> None:
    """300 clients that connect to /metrics and never send a request (reconnecting when
    closed): the server keeps its thread count, and a scrape still answers."""
    server = start_server(lab.add_host("server"))
    tasks = Path(f"/proc/{server.process.pid}/task")
    threads = len(list(tasks.iterdir()))
    flood = start_flood(server.host, "127.0.0.1", (9441,), 300, "idle", rate=300.0)
    wait_for(lambda: held(flood) >= 16, timeout=30, what="the slow clients to connect")
    time.sleep(2.0)
    assert len(list(tasks.iterdir())) <= threads + 4
    assert value(scrape(server.host), "nc_sessions", transport="tcp") == 0
    assert flood.alive(), flood.log()[-1000:]
    flood.stop()


def test_metrics_carry_the_build_certificate_expiry_and_every_drop_reason(lab: Lab) -> None:
    """nc_build_info names the version and Python; each of the server's certificates has
    an expiry gauge; every drop reason has a series, at 0, from the first scrape."""
    server = start_server(lab.add_host("server"))
    samples = scrape(server.host)
    builds = [labels for name, labels in samples if name == "nc_build_info"]
    assert len(builds) == 1 and dict(builds[0])["version"] == ncctl.VERSION and dict(builds[0])["python"], builds
    year = 365 * 86400
    for certificate, at_least in (("grpc-ca", 19 * year), ("network-ca", 19 * year), ("grpc-server", 9 * year)):
        assert value(samples, "nc_certificate_expiry_seconds", certificate=certificate) > at_least, certificate
    assert 0 < value(samples, "nc_certificate_expiry_seconds", certificate="admin") <= year
    assert ("nc_certificate_expiry_seconds", (("certificate", "network-server"),)) in samples
    for reason in ncctl.DROP_REASONS:
        assert ("nc_drops_total", (("reason", reason),)) in samples, reason
