"""Helpers for the operability tests: grpcurl as the original's documentation runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from netlab import ROOT, Host

GRPCURL = ROOT / ".build" / "bin" / "grpcurl"  # tests/run.sh installs the pinned release here


def grpcurl(host: Host, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """grpcurl from inside host; fails the test when tests/run.sh has not installed it."""
    assert GRPCURL.exists(), f"{GRPCURL} is missing: tests/run.sh installs grpcurl 1.8.6"
    return host.run(str(GRPCURL), *args, check=check, timeout=30)


def grpcurl_json(host: Host, *args: str) -> dict:
    return json.loads(grpcurl(host, *args).stdout)


def mtls_flags(creds: dict[str, Path]) -> list[str]:
    """-cacert ca.pem -cert client.pem -key client-key.pem, as in the original's recipes."""
    return ["-cacert", str(creds["ca"]), "-cert", str(creds["cert"]), "-key", str(creds["key"])]
