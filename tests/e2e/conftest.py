"""End-to-end fixtures: the built ./nc artifact, a namespace lab per test, and hosts files
that give the lab's namespaces a server name."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import netlab
import pytest


@pytest.fixture(scope="session")
def nc_binary() -> Path:
    """The artifact under test: ./nc built by build.sh (tests/run.sh builds it first)."""
    if not netlab.NC.exists():
        pytest.fail("./nc is missing: run ./build.sh (tests/run.sh does) before the end-to-end tests")
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root for namespaces and TUN devices")
    return netlab.NC


@pytest.fixture
def lab(nc_binary: Path, tmp_path: Path) -> Iterator[netlab.Lab]:
    """A fresh set of namespaces, removed after the test whatever its outcome."""
    the_lab = netlab.Lab(tmp_path / "lab")
    try:
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture
def hosts_files() -> Iterator[dict[str, Path]]:
    """/etc/netns/<ns>/hosts for this test's namespaces; removed afterwards, also on failure."""
    made: dict[str, Path] = {}
    try:
        yield made
    finally:
        for directory in made.values():
            shutil.rmtree(directory, ignore_errors=True)
