"""./nc-aarch64 on a real aarch64 userland: a Debian arm64 root run by qemu-user (binfmt_misc),
as a host of the namespace lab next to x86_64 ones running ./nc."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import arm64root
import netlab
import pytest
from netlab import Lab, start_client, start_server, wait_for

NC_AARCH64 = netlab.ROOT / "nc-aarch64"
# Everything is slower under qemu, and an nc's first start in the root unpacks its packages.
QEMU_START_S = 240
pytestmark = pytest.mark.timeout(1200)  # the first run also builds the root (minutes)


@pytest.fixture(scope="session")
def nc_aarch64(nc_binary: Path) -> Path:
    if not NC_AARCH64.exists():
        pytest.fail("./nc-aarch64 is missing: tests/run.sh builds it with ./build.sh --arch aarch64")
    return NC_AARCH64


@pytest.fixture(scope="session")
def arm64_root_path(request: pytest.FixtureRequest) -> Path:
    """Built on first use; its progress goes to the terminal past pytest's capture."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    progress = reporter.write_line if reporter is not None else print
    try:
        return arm64root.ensure_arm64_root(netlab.ROOT, progress)
    except arm64root.Arm64RootError as e:
        pytest.fail(str(e))


@pytest.fixture
def arm64(arm64_root_path: Path, nc_aarch64: Path, tmp_path: Path) -> Iterator[tuple[arm64root.Arm64Root, Lab]]:
    """The mounted root with ./nc-aarch64 installed, and a lab whose directory is shared
    into it; the lab (and every process in the root) ends before the root is unmounted."""
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    with arm64root.mounted(arm64_root_path, shared=[lab_dir]) as root, netlab.lab(lab_dir) as the_lab:
        root.install(nc_aarch64)
        yield root, the_lab


def test_version_reports_aarch64_and_its_python(arm64: tuple[arm64root.Arm64Root, Lab]) -> None:
    root, _ = arm64
    python = root.run("python3", "-c", "import platform; print(platform.python_version())").stdout.strip()
    done = root.run(arm64root.NC_INSIDE, "version", timeout=QEMU_START_S)
    assert done.returncode == 0, f"stdout: {done.stdout}\nstderr: {done.stderr}"
    assert done.stdout.startswith("nc "), done.stdout
    assert "aarch64" in done.stdout, done.stdout
    assert python and python in done.stdout, (python, done.stdout)


def test_aarch64_node_joins_an_x86_64_server(arm64: tuple[arm64root.Arm64Root, Lab]) -> None:
    root, lab = arm64
    server_host = lab.add_host("server")
    node = lab.add_host("node")
    node.prefix, node.nc_path = root.prefix, arm64root.NC_INSIDE
    server = start_server(server_host, keepalive=2)
    client = start_client(node, server.join_string(), wait=False)
    try:
        ip = wait_for(client.overlay_ip, timeout=QEMU_START_S, interval=0.5, what="the aarch64 node's overlay address")
    except AssertionError as e:
        raise AssertionError(f"{e}; its log:\n{client.process.log()[-3000:]}") from None
    assert str(ip).startswith("10.1.1."), ip
    assert wait_for(lambda: node.ping("10.1.1.1"), timeout=60, what="the node's ping of the server's overlay IP")
    assert server_host.ping(str(ip), count=3)
    listed = wait_for(
        lambda: server.node(client.token()).get("connState") == 3 and server.node(client.token()),
        timeout=60,
        what="the server's node list to show the node connected",
    )
    assert listed["bindIp"] == ip
