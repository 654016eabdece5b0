"""The ./nc artifact itself: it removes the extractions older builds left in SHIV_ROOT,
but never one a running nc uses."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path

from netlab import NC


def run_nc(shiv_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SHIV_ROOT": str(shiv_root)}
    return subprocess.run([str(NC), *args], env=env, capture_output=True, text=True, timeout=60, check=True)


def fake_extraction(root: Path, build_id: str, age_s: float) -> Path:
    """What shiv leaves for a build: nc_<id>/site-packages and its .nc_<id>_lock."""
    extraction = root / f"nc_{build_id}"
    (extraction / "site-packages").mkdir(parents=True)
    (extraction / "site-packages" / "ncctl.py").write_text("# an older build\n")
    (root / f".nc_{build_id}_lock").touch()
    then = time.time() - age_s
    os.utime(extraction, (then, then))
    return extraction


def test_old_extractions_are_removed_unless_in_use(nc_binary: Path, tmp_path: Path) -> None:
    root = tmp_path / "shiv"
    run_nc(root, "version")
    (current,) = root.glob("nc_*")
    stale = fake_extraction(root, "a" * 64, age_s=7200)
    young = fake_extraction(root, "b" * 64, age_s=0)  # may be an nc starting right now
    held = fake_extraction(root, "c" * 64, age_s=7200)
    marker = os.open(root / f".{held.name}_inuse", os.O_RDONLY | os.O_CREAT)
    fcntl.flock(marker, fcntl.LOCK_SH)  # as a running nc of that build holds it
    then = time.time() - 7200
    os.utime(root / f".{held.name}_inuse", (then, then))  # started long ago, still running
    try:
        run_nc(root, "version")
    finally:
        os.close(marker)
    assert not stale.exists() and not (root / f".{stale.name}_lock").exists()
    assert young.exists() and held.exists() and current.exists()
    assert "nc " in run_nc(root, "version").stdout  # our own extraction still works
