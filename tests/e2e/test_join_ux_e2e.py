"""Joining as kubeadm users expect: a printed join command that works as printed, a CA pin
that may be skipped only on purpose, token lives that say what they mean, a server that
is down waited for (until --join-timeout), a refused token failing at once, Ctrl-C at any
moment, and every local check before the token is spent."""

from __future__ import annotations

import re
import shlex
import signal
import sys
import time
from pathlib import Path

from control_helpers import JOIN_RE, admin_tls, node_tokens, one_error_line
from netlab import NC, SCRIPTS, Host, Lab, Process, start_client, start_server, wait_for
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


def spawn_join(host: Host, join: str, work_dir: Path, *extra: str) -> Process:
    return host.spawn_nc("client", "--join", join, "--work-dir", str(work_dir), *extra, name=f"{host.name}-join")


def stop_and_time(process: Process, sig: int = signal.SIGINT) -> tuple[int, float]:
    """Send sig and wait for the exit; returns the exit code and how long the exit took."""
    started = time.monotonic()
    process.send_signal(sig)
    code = process.popen.wait(10)
    return code, time.monotonic() - started


def test_a_join_waits_for_a_server_that_is_down_and_connects_once_it_is_up(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    join = server.join_string()
    server.process.stop()
    node = lab.add_host("node")
    process = spawn_join(node, join, lab.dir / "node-client", "--join-timeout", "2m")
    process.wait_for_output("join attempt 2:", timeout=30, what="the join to try again")
    assert "Connection refused" in process.log() and "trying again in" in process.log()
    process.send_signal(signal.SIGHUP)  # a reload asked for while joining is no reason to stop
    started = time.monotonic()
    server.start()
    up = time.monotonic() - started
    process.wait_for_output("connected to ", timeout=60, what="the node to connect once the server is up")
    attempts = [line for line in process.log().splitlines() if "join attempt" in line]
    assert len(attempts) < 12, "one line per attempt, with a growing wait between attempts"
    waits = [float(m[1]) for line in attempts if (m := re.search(r"trying again in (\d+) s", line))]
    print(
        f"measured: join attempts while the server was down: {len(attempts)}, waits {waits} s; connected "
        f"{time.monotonic() - started:.1f} s after the server's start began (the start took {up:.1f} s)"
    )
    process.wait_for_output("data path: UDP to 198.18.0.1\n", timeout=30, what="the UDP path")
    assert "::ffff:" not in process.log() and process.alive()
    said = server.process.log()  # the server's dual-stack sockets see the node as ::ffff:198.18.0.x
    assert f"connected from {node.ip}:" in said and "::ffff:" not in said, said[-2000:]


def test_a_join_gives_up_after_its_timeout_and_a_refused_token_fails_at_once(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    join = server.join_string()
    server.adm("token", "delete", JOIN_RE.match(join)["token"].split(".")[0])  # type: ignore[index]
    started = time.monotonic()
    done = node.nc("client", "--join", join, "--work-dir", str(lab.dir / "w1"), check=False)
    refused_in = time.monotonic() - started
    assert done.returncode == 3 and refused_in < 20, done.stderr
    assert "join refused" in one_error_line(done)
    print(f"measured: a deleted token's join refused in {refused_in:.1f} s, exit {done.returncode}")
    server.process.stop()
    started = time.monotonic()
    done = node.nc("client", "--join", join, "--work-dir", str(lab.dir / "w2"), "--join-timeout", "3s", check=False)
    line = one_error_line(done)
    assert done.returncode == 1 and "--join-timeout" in line and "6439" in line, line
    gave_up = time.monotonic() - started
    assert 3 <= gave_up < 30
    print(f"measured: --join-timeout 3s gave up after {gave_up:.1f} s, exit {done.returncode}")
    bad = node.nc("client", "--join", join, "--work-dir", str(lab.dir / "w3"), "--join-timeout", "soon", check=False)
    assert bad.returncode == 2 and "--join-timeout" in one_error_line(bad)


def test_ctrl_c_ends_a_join_at_once_and_leaves_nothing_behind(lab: Lab) -> None:
    """While waiting for a server that is down, inside a TLS handshake the server never
    answers, and inside the GetToken call past TLS: exit 130 within a second, no
    credentials, no client.yml; and once the node runs, 130 as well."""
    server = start_server(lab.add_host("server"))
    join = server.join_string()
    server.process.stop()
    node = lab.add_host("node")
    waiting = spawn_join(node, join, lab.dir / "w1", "--join-timeout", "5m")
    waiting.wait_for_output("join attempt 2:", timeout=30, what="the join to wait for the server")
    code, took = stop_and_time(waiting)
    assert code == 130 and took < 1.0, (code, took, waiting.log())
    print(f"measured: Ctrl-C while waiting between join attempts: exit {code} in {took:.3f} s")
    silent = server.host.spawn(sys.executable, str(SCRIPTS / "occupy_port.py"), "6439", name="silent")
    silent.wait_for_output("listening", what="the silent listener")
    stalled = spawn_join(node, join, lab.dir / "w2", "--join-timeout", "5m")
    time.sleep(2)  # well inside the first handshake, which the listener never answers
    assert stalled.alive(), stalled.log()
    code, took = stop_and_time(stalled)
    assert code == 130 and took < 1.0, (code, took, stalled.log())
    print(f"measured: Ctrl-C inside a TLS handshake the server never answers: exit {code} in {took:.3f} s")
    silent.stop()
    # Past TLS, inside the GetToken call: a listener with the server's own chain (the pin
    # matches) completes each handshake and then answers nothing.
    grpc_dir = server.work_dir / "tls" / "grpc"
    chain = lab.dir / "chain.pem"
    chain.write_bytes((grpc_dir / "server.crt").read_bytes() + (grpc_dir / "ca.crt").read_bytes())
    stalling = server.host.spawn(
        sys.executable, str(SCRIPTS / "stall_after_tls.py"), "6439", str(chain), str(grpc_dir / "server.key"),
        name="stalling",
    )  # fmt: skip
    stalling.wait_for_output("listening", what="the stalling listener")
    in_call = spawn_join(node, join, lab.dir / "w4", "--join-timeout", "5m")
    wait_for(lambda: stalling.log().count("handshake done") >= 2, timeout=30, what="the CA fetch and gRPC's TLS")
    time.sleep(0.5)  # inside the call now: its deadline (10 s) is far off
    assert in_call.alive() and "join attempt" not in in_call.log(), in_call.log()  # the first attempt still runs
    code, took = stop_and_time(in_call)
    assert code == 130 and took < 1.0, (code, took, in_call.log())
    print(f"measured: Ctrl-C inside the GetToken call (TLS done, no answer): exit {code} in {took:.3f} s")
    stalling.stop()
    for work_dir in (lab.dir / "w1", lab.dir / "w2", lab.dir / "w4"):
        assert not (work_dir / "client.yml").exists() and not (work_dir / "tls").exists(), list(work_dir.rglob("*"))
    server.start()
    running = spawn_join(node, join, lab.dir / "w3")
    running.wait_for_output("connected to ", timeout=30, what="the node to connect")
    code, took = stop_and_time(running)  # a node that runs: Ctrl-C is 130 too, and takes its TUN along
    assert code == 130 and took < 1.0 and not node.has_link("nc0"), (code, took, running.log())
    print(f"measured: Ctrl-C on the running node: exit {code} in {took:.3f} s, nc0 gone")


def test_a_second_client_on_the_host_fails_before_it_spends_its_token(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    node = lab.add_host("node")
    first = start_client(node, server.join_string())
    join = server.join_string("--single-use")
    before = node_tokens(server)
    done = node.nc("client", "--join", join, "--work-dir", str(lab.dir / "second"), check=False)
    line = one_error_line(done)
    assert "interface nc0 already exists" in line and "token was not spent" in line, line
    assert node_tokens(server) == before and first.process.alive()
    other = lab.add_host("other")
    assert start_client(other, join).token() in node_tokens(server), "the token still admits a node"


def test_a_join_string_naming_the_control_port_says_so(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    join = server.join_string().replace(":6439#", ":6440#")
    node = lab.add_host("node")
    done = node.nc("client", "--join", join, "--work-dir", str(lab.dir / "w"), check=False, timeout=60)
    line = one_error_line(done)
    assert done.returncode == 2 and "6440 is nc's control port, not its bootstrap port" in line, line
    assert "default 6439" in line and not (lab.dir / "w" / "client.yml").exists()
