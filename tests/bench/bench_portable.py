"""The one file on each interpreter: its size, the first start (shiv's site-packages and
this interpreter's set unpacked), the space that takes, and a later start, beside the
bare interpreter's own start in the same run.

A start is `nc version` (it loads the bundled packages' metadata, not grpc itself);
medians of --repeat runs. Prints one table per file on stdout.

    tests/bench.sh portable [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import fmt, format_table, ratio

ROOT = Path(__file__).resolve().parents[2]
PYENV = Path.home() / ".pyenv" / "versions"
INTERPRETERS = ("3.9.18", "3.10.13", "3.11.7", "3.12.1", "3.13.0")


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    began = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - began


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(nc_file: Path, version: str, repeat: int) -> list[str]:
    python = str(PYENV / version / "bin" / "python3")
    cache = Path(tempfile.mkdtemp(prefix="nc-bench-portable-"))
    try:
        env = {"SHIV_ROOT": str(cache), "PATH": "/usr/bin:/bin"}
        first = timed([python, str(nc_file), "version"], env)
        unpacked = tree_size(cache)
        later = statistics.median(timed([python, str(nc_file), "version"], env) for _ in range(repeat))
        bare = statistics.median(timed([python, "-c", "pass"]) for _ in range(repeat))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return [version, fmt(first, 2), fmt(unpacked / 1e6), fmt(later, 3), fmt(bare, 3), ratio(later, bare)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="later starts to take the median of")
    args = parser.parse_args()
    nc_file = ROOT / "nc"
    rows = [measure(nc_file, version, args.repeat) for version in INTERPRETERS]
    headers = ["CPython", "first start s", "unpacked MB", "later start s", "python -c pass s", "later / bare"]
    print(format_table(headers, rows, title=f"./nc: {nc_file.stat().st_size / 1e6:.1f} MB"))
    for other in sorted(ROOT.glob("nc-*")):
        if other.is_file() and not other.name.startswith("nc.tmp"):
            print(f"./{other.name}: {other.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
