"""One nc file for the hosts people have: the README's walk-through with each CPython from
3.9 to 3.13 as the host's python3, one clear line (and nothing unpacked) where it cannot
run, bundled libraries that need glibc 2.28 at most, and a process that looks like nc."""

from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
from netlab import NC, ROOT, Lab, start_client, start_server, wait_for

PYENV = Path.home() / ".pyenv" / "versions"
SUPPORTED = ("3.9.18", "3.10.13", "3.11.7", "3.12.1", "3.13.0")  # the builds this machine image carries
TOO_OLD = ("2.7.18", "3.8.18")
OTHER_ARCH = "aarch64" if platform.machine() == "x86_64" else "x86_64"
GLIBC_FLOOR = (2, 28)


def interpreter(version: str) -> Path:
    """pyenv's CPython `version`; a missing one fails the test (it never skips)."""
    python = PYENV / version / "bin" / ("python3" if version[0] == "3" else "python")
    if not python.exists():
        pytest.fail(f"CPython {version} is missing at {python}; this machine image should carry it")
    return python


def artifact(name: str) -> Path:
    path = ROOT / name
    if not path.exists():
        pytest.fail(f"./{name} is missing: tests/run.sh builds it (./build.sh, ./build.sh --arch {OTHER_ARCH})")
    return path


@pytest.mark.parametrize("version", SUPPORTED)
def test_walkthrough_with_each_cpython_as_python3(version: str, lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    python = interpreter(version)
    monkeypatch.setenv("PATH", f"{python.parent}:{os.environ['PATH']}")  # what `#!/usr/bin/env python3` finds
    tag = "cp" + "".join(version.split(".")[:2])
    described = subprocess.run([str(NC), "version"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert f"python {version} (CPython" in described and f"packages set {tag} in" in described, described
    server_host = lab.add_host("server")
    node_hosts = [lab.add_host(f"node{i}") for i in (1, 2)]
    server = start_server(server_host, keepalive=2)
    assert Path(os.readlink(f"/proc/{server.process.pid}/exe")).name.startswith(f"python{version.rsplit('.', 1)[0]}")
    clients = [start_client(host, server.join_string()) for host in node_hosts]
    ips = [client.overlay_ip() for client in clients]
    assert node_hosts[0].ping(ips[1]) and node_hosts[1].ping("10.1.1.1")
    nodes = wait_for(
        lambda: [n for n in server.adm_json("node", "list") if n["connState"] == 3] or None, what="connected nodes"
    )
    assert sorted(node["bindIp"] for node in nodes if node["nodeToken"] != "reserverd") == sorted(ips)


@pytest.mark.parametrize("version", TOO_OLD)
def test_an_interpreter_it_cannot_use_gets_one_line_and_nothing_is_unpacked(version: str, tmp_path: Path) -> None:
    shiv_root = tmp_path / "cache"
    done = subprocess.run(
        [str(interpreter(version)), str(NC), "server"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SHIV_ROOT": str(shiv_root)},
    )
    assert done.returncode == 2 and done.stdout == "", (done.returncode, done.stdout)
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"nc: error: found CPython {version} on {platform.machine()} with glibc ")
    assert "this nc runs on CPython 3.9 to 3.14 on" in done.stderr and "glibc 2.28 or newer" in done.stderr
    assert not shiv_root.exists()


def test_the_other_architectures_file_says_so_and_unpacks_nothing(tmp_path: Path) -> None:
    other = artifact(f"nc-{OTHER_ARCH}")
    shiv_root = tmp_path / "cache"
    done = subprocess.run(
        [str(interpreter("3.11.7")), str(other), "version"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SHIV_ROOT": str(shiv_root)},
    )
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done
    assert f"found CPython 3.11.7 on {platform.machine()}" in done.stderr
    assert f"on {OTHER_ARCH} Linux with glibc 2.28 or newer" in done.stderr
    assert not shiv_root.exists()


def bundled_shared_objects(nc_file: Path, into: Path) -> list[Path]:
    """Every shared object of every interpreter's set in nc_file, written under into."""
    with zipfile.ZipFile(nc_file) as archive:
        stream = io.BytesIO(archive.read("sets.tar.xz"))
    found = []
    with tarfile.open(fileobj=stream, mode="r:xz") as tar:
        for member in tar:
            if member.isfile() and re.search(r"\.so(\.\d+)*$", member.name):
                path = into / member.name.replace("/", "__")
                source = tar.extractfile(member)
                assert source is not None
                path.write_bytes(source.read())
                found.append(path)
    return found


@pytest.mark.parametrize("name", ["nc", f"nc-{OTHER_ARCH}"])
def test_no_bundled_library_needs_a_glibc_newer_than_2_28(name: str, tmp_path: Path) -> None:
    objects = bundled_shared_objects(artifact(name), tmp_path)
    assert len(objects) >= 6 * 3, [o.name for o in objects]  # grpcio, cffi, PyYAML at least, for six interpreters
    newest: dict[str, tuple[int, ...]] = {}
    for path in objects:
        symbols = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True, check=True).stdout
        versions = [tuple(int(n) for n in v.split(".")) for v in re.findall(r"GLIBC_(\d+(?:\.\d+)+)", symbols)]
        assert versions or "GLIBC" not in symbols, path
        if versions:
            newest[path.name] = max(versions)
    assert newest, "no shared object names a glibc version: objdump read nothing"
    too_new = {name: version for name, version in newest.items() if version[:2] > GLIBC_FLOOR}
    assert not too_new, too_new


@pytest.mark.parametrize("name", ["nc", f"nc-{OTHER_ARCH}"])
def test_each_file_fits_its_size_budget(name: str) -> None:
    size = artifact(name).stat().st_size
    assert size <= 45 * 1000 * 1000, f"./{name} is {size / 1e6:.1f} MB; the budget is 45 MB per architecture"
    with zipfile.ZipFile(artifact(name)) as archive:
        bundle = json.loads(archive.read("nc-bundle.json"))
    assert sorted(bundle["sets"]) == sorted(["cp39", "cp310", "cp311", "cp312", "cp313", "cp314"])
    assert bundle["arch"] == (platform.machine() if name == "nc" else OTHER_ARCH)


def test_the_process_is_named_nc_in_ps_top_and_the_journal(lab: Lab) -> None:
    server = start_server(lab.add_host("server"))
    pid = server.process.pid
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "nc"  # top, ps -e, the journal's _COMM
    words = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    assert words == [str(NC).encode(), b"server", b"--config", str(server.config).encode()], words
    ps = subprocess.run(["ps", "-o", "comm=,args=", "-p", str(pid)], capture_output=True, text=True, check=True)
    assert ps.stdout.split()[:3] == ["nc", str(NC), "server"], ps.stdout


def test_install_service_copies_the_file_off_path_and_the_unit_runs_it(tmp_path: Path) -> None:
    config_dir = Path("/run") / f"nc-test-{os.getpid()}"  # a path the unit's sandbox leaves visible
    root = tmp_path / "image"
    try:
        config_dir.mkdir()
        config = config_dir / "server.yml"
        config.write_text(json.dumps({"mode": "server", "server": {"workDir": "/var/lib/nc"}}))
        system_python = "/usr/bin/python3"  # Debian's, what the unit's #!/usr/bin/env python3 finds
        shown = subprocess.run(
            [system_python, str(NC), "install-service", "server", "--config", str(config), "--print"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert shown.startswith(f"# nc install-service server: would copy {NC} to /usr/local/lib/nc/nc and write ")
        assert f"ExecStart=/usr/local/lib/nc/nc server --config {config}" in shown.splitlines()
        assert "SyslogIdentifier=nc" in shown.splitlines() and "# warning" not in shown
        subprocess.run(
            [system_python, str(NC), "install-service", "server", "--config", str(config), "--root", str(root)],
            capture_output=True,
            text=True,
            check=True,
        )
        installed = root / "usr/local/lib/nc/nc"
        assert installed.read_bytes() == NC.read_bytes() and os.access(installed, os.X_OK)
        unit = root / "etc/systemd/system/nc-server.service"
        assert unit.read_text() == shown.split("\n", 1)[1]
        as_on_the_host = tmp_path / "nc-server.service"  # verify wants the file it runs where the unit says
        as_on_the_host.write_text(unit.read_text().replace("/usr/local/lib/nc/nc", str(installed)))
        verified = subprocess.run(["systemd-analyze", "verify", str(as_on_the_host)], capture_output=True, text=True)
        assert verified.returncode == 0 and verified.stderr == "", verified.stderr
        described = subprocess.run([str(installed), "version"], capture_output=True, text=True, check=True).stdout
        assert f"file {installed}:" in described
        hidden = str(interpreter("3.11.7"))  # under /root: ProtectHome hides it from the unit, which says so
        shown = subprocess.run(
            [hidden, str(NC), "install-service", "server", "--config", str(config), "--print"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"# warning: this Python ({hidden}) is under /root, hidden from the service" in shown, shown
        assert f"ExecStart=/usr/local/lib/nc/nc server --config {config}" in shown.splitlines()
    finally:
        for leftover in config_dir.glob("*"):
            leftover.unlink()
        if config_dir.exists():
            config_dir.rmdir()


def test_install_service_refuses_a_config_its_sandbox_would_hide(tmp_path: Path) -> None:
    config = tmp_path / "server.yml"  # under /tmp: PrivateTmp=yes hides it from the service
    config.write_text(json.dumps({"mode": "server", "server": {"workDir": "/var/lib/nc"}}))
    done = subprocess.run(
        [str(NC), "install-service", "server", "--config", str(config), "--root", str(tmp_path / "image")],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "the service's sandbox hides /tmp" in done.stderr, done.stderr
    assert not (tmp_path / "image").exists()
    shown = subprocess.run(
        [str(NC), "install-service", "server", "--config", str(config), "--print"], capture_output=True, text=True
    )
    assert shown.returncode == 0 and "# warning: " in shown.stdout


def test_install_service_refuses_a_line_break_that_would_add_unit_lines(tmp_path: Path) -> None:
    """A path is one line of the unit: a line break in it would add directives of its own."""
    forged = "/x.yml\nExecStartPre=/bin/touch /tmp/pwned"
    done = subprocess.run(
        [str(NC), "install-service", "server", "--config", forged, "--print"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "line break" in done.stderr and "ExecStartPre" not in done.stdout, done
    config = tmp_path / "server.yml"
    config.write_text(json.dumps({"mode": "server", "server": {"workDir": "/var/lib/nc\nExecStartPre=/bin/true"}}))
    done = subprocess.run(
        [str(NC), "install-service", "server", "--config", str(config), "--print"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "workDir" in done.stderr and "ExecStartPre" not in done.stdout, done


def test_a_damaged_file_is_one_line_and_leaves_nothing_half_unpacked(tmp_path: Path) -> None:
    damaged = tmp_path / "nc"
    with NC.open("rb") as source:
        shebang = source.readline()
    with zipfile.ZipFile(NC) as old, damaged.open("wb") as out:
        out.write(shebang)
        with zipfile.ZipFile(out, "w") as new:
            for info in old.infolist():
                data = old.read(info)
                if info.filename == "sets.tar.xz":  # bytes flipped in the middle of the xz stream
                    middle = len(data) // 2
                    data = data[:middle] + bytes(64) + data[middle + 64 :]
                new.writestr(info, data, compress_type=info.compress_type)
    damaged.chmod(0o755)
    cache = tmp_path / "cache"
    done = subprocess.run(
        [str(damaged), "version"], capture_output=True, text=True, env={**os.environ, "SHIV_ROOT": str(cache)}
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{damaged} is damaged" in done.stderr and "copy the file again" in done.stderr
    (extraction,) = cache.glob("nc_*")
    unpacked = sorted(p.name for p in extraction.iterdir() if not p.name.startswith("."))  # .cp3*_lock stays
    assert unpacked == ["site-packages"], "no half-unpacked set stays"


def test_a_start_killed_while_unpacking_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    env = {**os.environ, "SHIV_ROOT": str(tmp_path)}
    subprocess.run([str(NC), "version"], capture_output=True, env=env, check=True)
    (extraction,) = tmp_path.glob("nc_*")
    (unpacked,) = [p for p in extraction.iterdir() if p.name.startswith("cp3")]
    shutil.rmtree(unpacked)
    killed = extraction / f"{unpacked.name}.99999.tmp"  # what a SIGKILL halfway leaves
    (killed / "grpc").mkdir(parents=True)
    assert "packages set" in subprocess.run([str(NC), "version"], capture_output=True, text=True, env=env).stdout
    assert unpacked.is_dir() and not killed.exists()
