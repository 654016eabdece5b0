"""The original's grpcurl recipes, unchanged, against a real nc server through server
reflection, and the standard grpc.health.v1 service on both gRPC ports."""

from __future__ import annotations

import sys

from control_helpers import admin_tls, join_node
from netlab import ROOT, SCRIPTS, Lab, start_server, wait_for
from ops_helpers import grpcurl, grpcurl_json, mtls_flags

SERVER_IP = "198.18.0.1"
CONTROL = f"{SERVER_IP}:6440"
BOOTSTRAP = f"{SERVER_IP}:6439"


def test_reflection_lists_and_describes_both_ports(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    tls = mtls_flags(admin_tls(server))
    host = server.host

    control = grpcurl(host, *tls, CONTROL, "list").stdout.split()
    assert {"pb.LiteKubeNCService", "pb.NcAdminService", "grpc.health.v1.Health"} <= set(control)
    bootstrap = grpcurl(host, "-insecure", BOOTSTRAP, "list").stdout.split()
    assert "pb.LiteKubeNCBootstrapService" in bootstrap

    methods = grpcurl(host, *tls, CONTROL, "list", "pb.LiteKubeNCService").stdout.split()
    assert "pb.LiteKubeNCService.GetRegistedIp" in methods
    described = grpcurl(host, *tls, CONTROL, "describe", "pb.LiteKubeNCService.HelloWorld").stdout
    assert "rpc HelloWorld ( .pb.HelloWorldRequest ) returns ( .pb.HelloWorldResponse )" in described
    assert "hello_text" in grpcurl(host, *tls, CONTROL, "describe", "pb.HelloWorldRequest").stdout


def test_original_tls_recipes_work_unchanged(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    node_host = lab.add_host("node")
    tls = mtls_flags(admin_tls(server))
    host = server.host

    assert grpcurl_json(host, "-d", "", "-insecure", BOOTSTRAP, "pb.LiteKubeNCBootstrapService.HealthCheck") == {
        "code": "200"
    }
    assert grpcurl_json(host, "-d", "", *tls, CONTROL, "pb.LiteKubeNCService.HealthCheck") == {"code": "200"}

    minted = grpcurl_json(host, "-d", '{"expireTime": 10}', *tls, CONTROL, "pb.LiteKubeNCService.GetBootStrapToken")
    assert minted["code"] == "200" and minted["cloudIp"] == SERVER_IP and minted["port"] == "6439"
    never = grpcurl_json(host, "-d", '{"expireTime": -1}', *tls, CONTROL, "pb.LiteKubeNCService.GetBootStrapToken")
    assert never["code"] == "200"

    joined = grpcurl_json(
        node_host,
        "-d",
        f'{{"bootStrapToken": "{minted["bootStrapToken"]}"}}',
        "-insecure",
        BOOTSTRAP,
        "pb.LiteKubeNCBootstrapService.GetToken",
    )
    assert joined["code"] == "200" and len(joined["token"]) == 16
    assert joined["GrpcServerIp"] == "10.1.1.1", "the control port answers on the server's overlay address"
    assert joined["networkServerIp"] == SERVER_IP
    token = joined["token"]

    state = grpcurl_json(host, "-d", f'{{"token": "{token}"}}', *tls, CONTROL, "pb.LiteKubeNCService.CheckConnState")
    assert state == {"code": "200", "message": "ok", "connState": -1}
    ip = grpcurl_json(host, "-d", f'{{"token": "{token}"}}', *tls, CONTROL, "pb.LiteKubeNCService.GetRegistedIp")
    assert ip == {"code": "200", "message": "ok"}, "a node that never connected has no ip yet: 200, empty ip"
    gone = grpcurl_json(host, "-d", f'{{"token": "{token}"}}', *tls, CONTROL, "pb.LiteKubeNCService.UnRegister")
    assert gone == {"code": "200", "message": "ok", "result": True}


def test_standard_health_on_both_ports(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    tls = mtls_flags(admin_tls(server))
    host = server.host
    for flags, address in ((["-insecure"], BOOTSTRAP), (tls, CONTROL)):
        whole = grpcurl_json(host, *flags, address, "grpc.health.v1.Health/Check")
        assert whole == {"status": "SERVING"}
    named = grpcurl_json(
        host, "-d", '{"service": "pb.LiteKubeNCService"}', *tls, CONTROL, "grpc.health.v1.Health/Check"
    )
    assert named == {"status": "SERVING"}
    unknown = grpcurl(host, "-d", '{"service": "no.Such"}', *tls, CONTROL, "grpc.health.v1.Health/Check", check=False)
    assert unknown.returncode != 0 and "NotFound" in unknown.stderr
    join_node(lab.add_host("node"), server.join_string(), lab.dir / "node-work")  # the services still answer


def test_health_flips_to_not_serving_when_the_data_plane_stops(lab: Lab) -> None:
    host = lab.add_host("probe")
    down = lab.dir / "data-plane-down"
    process = host.spawn(sys.executable, str(SCRIPTS / "health_server.py"), str(ROOT), str(down), name="health-server")
    process.wait_for_output("listening")

    def status() -> str:
        return grpcurl_json(host, "-plaintext", "127.0.0.1:7440", "grpc.health.v1.Health/Check").get("status", "")

    assert wait_for(lambda: status() == "SERVING", what="SERVING")
    down.touch()
    assert status() == "NOT_SERVING"
    down.unlink()
    assert status() == "SERVING"
    process.stop()
