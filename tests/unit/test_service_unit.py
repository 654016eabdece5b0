"""The systemd unit install-service writes: which interpreter runs the file, and that the
unit carries nothing but what it means to (a path is one line)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

import ncctl

SYSTEM_PYTHON = shutil.which("python3", path=ncctl.SERVICE_PATH)


def test_the_hosts_python3_runs_the_file_through_its_shebang(monkeypatch: pytest.MonkeyPatch) -> None:
    assert SYSTEM_PYTHON, "a python3 on systemd's PATH (Debian's) is part of this machine image"
    monkeypatch.setattr(ncctl.sys, "executable", SYSTEM_PYTHON)
    assert ncctl.service_interpreter() == ((), None)


def test_another_interpreter_outside_the_sandboxed_paths_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """RHEL 8: python3 is 3.6, the operator ran nc with python3.9 beside it."""
    monkeypatch.setattr(ncctl.sys, "executable", "/usr/bin/python3.9-not-the-default")
    assert ncctl.service_interpreter() == (("/usr/bin/python3.9-not-the-default",), None)
    unit = ncctl.service_unit("server", ncctl.SERVICE_EXECUTABLE, Path("/etc/nc/server.yml"), "/var/lib/nc", ("/p",))
    assert "ExecStart=/p /usr/local/lib/nc/nc server --config /etc/nc/server.yml" in unit.splitlines()


@pytest.mark.parametrize("where", ["/root/.pyenv/versions/3.12.1/bin/python3", "/home/ops/venv/bin/python"])
def test_an_interpreter_the_sandbox_hides_falls_back_to_python3_and_says_so(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ncctl.sys, "executable", where)
    words, warning = ncctl.service_interpreter()
    assert words == () and warning is not None
    assert warning.startswith(f"this Python ({where}) is under /") and "hidden from the service" in warning


def test_a_config_error_or_a_refusal_does_not_restart_the_unit() -> None:
    """Exit 2 (config, usage) and 3 (refused for good) repeat until a person acts."""
    for mode in ("server", "client"):
        unit = ncctl.service_unit(mode, ncctl.SERVICE_EXECUTABLE, None, "/var/lib/nc", ())
        assert "RestartPreventExitStatus=2 3" in unit.splitlines() and "Restart=on-failure" in unit.splitlines()
    assert (ncctl.ConfigError.exit_code, ncctl.UsageError.exit_code, ncctl.Refused.exit_code) == (2, 2, 3)
    assert ncctl.JoinRefused.exit_code == 3


@pytest.mark.parametrize(
    "forged",
    [
        "/x.yml\nExecStartPre=/bin/touch /tmp/pwned",
        "/etc/nc/server.yml\rExecStartPre=/bin/true",
        "/etc/nc/\x1b]0;owned\x07server.yml",
        "/etc/nc/server.yml\tExecStartPre=/bin/true",
        "/etc/nc/server\x7f.yml",
        "/etc/nc/server\x85.yml",
    ],
)
def test_install_service_refuses_a_control_character_in_its_paths(forged: str, tmp_path: Path) -> None:
    """A path goes into the unit as is: any control character is refused, not only line breaks."""
    args = argparse.Namespace(mode="server", config=forged, print=True, root=None)
    with pytest.raises(ncctl.UsageError, match="cannot go into a unit file"):
        ncctl.cmd_install_service(args)
    config = tmp_path / "server.yml"
    config.write_text(json.dumps({"mode": "server", "server": {"workDir": "/var/lib/" + forged.lstrip("/")}}))
    args = argparse.Namespace(mode="server", config=str(config), print=True, root=None)
    with pytest.raises(ncctl.UsageError, match=r"server\.workDir: a path with a (line break|control character)"):
        ncctl.cmd_install_service(args)


def test_an_ordinary_path_has_no_unit_problem() -> None:
    assert ncctl.unit_path_problem("--config", "/etc/nc/server 1.yml") is None
    assert ncctl.unit_path_problem("--config", "/etc/nc/sérvér.yml") is None
