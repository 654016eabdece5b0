"""Unit tests of the modes nc gives the files it writes: private files through a new
temp file only, logs 0640 in a 0750 directory whatever the umask."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import ncctl


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_link_planted_at_the_temp_name_is_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    target = tmp_path / "tls" / "node.key"
    target.parent.mkdir()
    (target.parent / f".node.key.{os.getpid()}.tmp").symlink_to(victim)
    ncctl.write_private(target, b"secret")
    assert victim.read_bytes() == b"untouched"
    assert target.read_bytes() == b"secret" and mode_of(target) == 0o600 and not target.is_symlink()
    assert sorted(p.name for p in target.parent.iterdir()) == ["node.key"]


@pytest.fixture
def umask_022() -> Iterator[None]:
    """A umask that would leave files world-readable; setup_logging's changes to the "nc"
    logger are undone afterwards, so later tests' caplog still sees its records."""
    logger = logging.getLogger("nc")
    saved = (logger.level, logger.propagate, logging.raiseExceptions)
    old = os.umask(0o022)
    yield
    os.umask(old)
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.level, logger.propagate, logging.raiseExceptions = saved


@pytest.mark.usefixtures("umask_022")
def test_logs_are_0640_in_a_0750_directory(tmp_path: Path) -> None:
    log_dir = tmp_path / "work" / "logs"
    ncctl.setup_logging("server", str(log_dir), False, quiet_stdout=True)
    logging.getLogger("nc").info("a line")
    log_file = log_dir / "nc-server.log"
    assert "a line" in log_file.read_text()
    assert mode_of(log_dir) == 0o750 and mode_of(log_file) == 0o640


@pytest.mark.usefixtures("umask_022")
def test_a_log_file_an_older_nc_made_readable_is_narrowed(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "nc-client.log").write_text("old\n")
    (log_dir / "nc-client.log").chmod(0o644)
    ncctl.setup_logging("client", str(log_dir), False, quiet_stdout=True)
    assert mode_of(log_dir / "nc-client.log") == 0o640
