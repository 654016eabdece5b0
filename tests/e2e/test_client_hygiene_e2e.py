"""Client hygiene: one client per work dir, a join that checks what the node needs
before it spends the token, and a new join over the credentials of a node the
server no longer knows."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from control_helpers import node_tokens, one_error_line
from netlab import NC, Host, Lab, NcClient, start_client, wait_for
from overlay_helpers import SERVER_OVERLAY_IP, build_overlay, wait_connected, wait_exit


def client_join(host: Host, join: str, work_dir: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """`nc client --join` that must fail by itself; `prelude` runs first in a private mount
    namespace (its mounts vanish with the process)."""
    command = f"{prelude}\nexec {NC} client --join {shlex.quote(join)} --work-dir {shlex.quote(str(work_dir))}"
    return host.run("unshare", "--mount", "--propagation", "private", "sh", "-ec", command, check=False, timeout=60)


def test_second_client_on_the_same_work_dir_names_the_first_and_leaves_it_alone(lab: Lab) -> None:
    overlay = build_overlay(lab, 1, keepalive=2)
    host, first = overlay.hosts[0], overlay.clients[0]
    for args in (("--config", str(first.config)), ("--join", overlay.join, "--work-dir", str(first.work_dir))):
        line = one_error_line(host.nc("client", *args, check=False))
        assert f"pid {first.process.pid}" in line and str(first.work_dir) in line, line
    assert first.process.alive()
    assert host.ping(SERVER_OVERLAY_IP, count=2), first.process.log()
    assert first.process.stop() == 0
    first.restart()  # the lock went with the process
    wait_connected(overlay.server, first)


def test_join_preflight_spends_no_token_and_adds_no_node(lab: Lab) -> None:
    """No TUN device, a read-only work dir, a full one: each fails before GetToken, so
    the single-use token still admits the node afterwards."""
    overlay = build_overlay(lab, 0)
    server = overlay.server
    join = server.join_string("--single-use")
    node = lab.add_host("node")
    work = lab.dir / "node-client"
    work.mkdir()
    before = node_tokens(server)
    failures = {
        "/dev/net/tun": "mount -t tmpfs tmpfs /dev/net",
        "read-only": f"mount --bind -o ro {work} {work}",
        "free": f"mount -t tmpfs -o size=512k tmpfs {work}\ndd if=/dev/zero of={work}/filler bs=4k 2>/dev/null || true",
    }
    for cause, prelude in failures.items():
        line = one_error_line(client_join(node, join, work, prelude))
        assert cause in line.lower(), line
        assert node_tokens(server) == before, f"{cause}: the failed join left a node row"
    assert not (work / "client.yml").exists()
    client = start_client(node, join)
    assert node_tokens(server) == before | {client.token()}


def test_join_as_non_root_is_one_line(lab: Lab) -> None:
    overlay = build_overlay(lab, 0)
    join = overlay.server.join_string()
    node = lab.add_host("node")
    shiv = Path(tempfile.mkdtemp(prefix="nc-test-shiv-"))  # somewhere user nobody may unpack ./nc
    try:
        shiv.chmod(0o777)
        user = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env", f"SHIV_ROOT={shiv}")
        done = node.run(*user, str(NC), "client", "--join", join, "--work-dir", str(lab.dir / "x"), check=False)
    finally:
        shutil.rmtree(shiv)
    assert "must run as root" in one_error_line(done)


def test_join_again_after_unregister_replaces_the_old_credentials(lab: Lab) -> None:
    overlay = build_overlay(lab, 1, keepalive=2)
    server, host, client = overlay.server, overlay.hosts[0], overlay.clients[0]
    old_token = client.token()
    server.adm("node", "unregister", "--node-token", old_token)
    assert wait_exit(client.process) == 3, "an unregistered node is told not to come back"
    said = client.process.log().strip().splitlines()[-1]
    assert said.endswith(
        f"to join again: nc client --join '<join string from nc adm token create>' --work-dir {client.work_dir}"
    )
    rejoin = host.spawn_nc("client", "--join", server.join_string(), "--work-dir", str(client.work_dir), name="rejoin")
    again = NcClient(host, rejoin, client.work_dir)
    wait_for(lambda: again.token() != old_token, what="the new join to replace the credentials")
    wait_connected(server, again)
    assert again.token() in node_tokens(server) and old_token not in node_tokens(server)
    assert host.ping(SERVER_OVERLAY_IP, count=2), rejoin.log()
    assert "no longer knows node" in rejoin.log()
