"""Joining as kubeadm users expect: a printed join command that works as printed, a CA pin
that may be skipped only on purpose, and token lives that say what they mean."""

from __future__ import annotations

import shlex

from control_helpers import JOIN_RE, admin_tls, one_error_line
from netlab import NC, Lab, start_server
from ops_helpers import grpcurl_json, mtls_flags

CONTROL = "198.18.0.1:6440"


def test_print_join_command_prints_a_line_that_joins_as_printed(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    line = server.adm("token", "create", "--print-join-command").stdout.strip()
    words = shlex.split(line)
    assert words[:3] == ["nc", "client", "--join"] and words[4:] == ["--work-dir", "/var/lib/nc-client"], line
    assert JOIN_RE.match(words[3]), words[3]
    # The printed command, with this lab's binary and work dir: it joins and connects.
    work_dir = lab.dir / "node-work"
    client = node.spawn(str(NC), *words[1:4], "--work-dir", str(work_dir), name="node-client")
    client.wait_for_output("connected to ", timeout=30, what="the node to connect")
    as_json = server.adm_json("token", "create", "--print-join-command")
    assert as_json["joinCommand"].startswith("nc client --join '") and JOIN_RE.match(as_json["joinString"])


def test_a_life_of_zero_is_refused_with_a_message(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    line = one_error_line(server.adm("token", "create", "--life", "0", check=False))
    assert "0 minutes is not allowed" in line and "negative" in line
    original = grpcurl_json(
        server.host,
        "-d",
        '{"expireTime": 0}',
        *mtls_flags(admin_tls(server)),
        CONTROL,
        "pb.LiteKubeNCService.GetBootStrapToken",
    )
    assert original["code"] == "400" and "0 minutes is not allowed" in original["message"], original
    assert server.adm("token", "create", "--life", "-1").returncode == 0
