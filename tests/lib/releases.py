"""Earlier builds of nc, from the repo's history, for upgrade and mixed-version tests: a
commit's ncctl.py and protocol files run from source (its proto modules generated as
build.sh does), a program that behaves as that build's ./nc."""

from __future__ import annotations

import subprocess
import sys

from netlab import ROOT, Lab

# The build before datagram groups (capability "groups"): a node of the previous release.
BEFORE_GROUPS_COMMIT = "6cddd2f7162dde9cb5d36d5bc3e851780c20d740"


def nc_of_commit(lab: Lab, commit: str, why: str) -> str:
    """The path of a program that runs `commit`'s nc; `why` names the test's need for it in
    the error a clone without history gets."""
    directory = lab.dir / f"nc-{commit[:12]}"
    if (directory / "nc").exists():
        return str(directory / "nc")
    (directory / "proto").mkdir(parents=True)
    for name in ("ncctl.py", "proto/__init__.py", "proto/nc.proto", "proto/etcd.proto"):
        (directory / name).write_text(git_show(commit, name, why))
    protoc = [str(ROOT / ".build/tools/bin/python"), "-m", "grpc_tools.protoc", "-I.", "--python_out=."]
    protoc += ["--grpc_python_out=.", "proto/nc.proto", "proto/etcd.proto"]
    subprocess.run(protoc, cwd=directory, check=True)
    program = directory / "nc"
    program.write_text(f'#!/bin/sh\nPYTHONPATH={directory} exec {sys.executable} {directory / "ncctl.py"} "$@"\n')
    program.chmod(0o755)
    return str(program)


def git_show(commit: str, path: str, why: str) -> str:
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise AssertionError(
            f"this test needs the repo's history (commit {commit[:12]}, {why}): {shown.stderr.strip()}"
        )
    return shown.stdout
