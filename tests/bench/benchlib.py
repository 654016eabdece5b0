"""Helpers shared by the benchmark scripts (tests/bench/bench_*.py): tables, process
facts from /proc, and turning termination signals into a clean teardown.

Not a test module: benchmarks run on request through tests/bench.sh.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    """A scratch directory removed afterwards, whatever happens."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def progress(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the table."""
    print(f"-- {message}", file=sys.stderr, flush=True)


def raise_on_termination() -> None:
    """SIGTERM/SIGHUP behave like Ctrl-C: the `finally` blocks that stop
    processes and remove namespaces and temp dirs still run."""

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


class BenchError(RuntimeError):
    """A benchmark could not measure what it set out to."""


def run_lab_bench(name: str, run: Callable[[], int]) -> int:
    """Run a benchmark that builds a namespace lab: as root, torn down also on
    SIGTERM/SIGHUP/Ctrl-C, and a failure is one line on stderr, not a traceback."""
    require_root()
    raise_on_termination()
    try:
        return run()
    except KeyboardInterrupt:
        print(f"{name}: interrupted; lab removed", file=sys.stderr)
        return 130
    except (AssertionError, RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit(f"{Path(sys.argv[0]).name}: needs root (network namespaces, TUN devices)")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [title] if title else []
    out += [line(headers), rule, *(line(r) for r in rows)]
    return "\n".join(out)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (fraction in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def machine_note() -> str:
    """Load average and any tunnels or tests already running: figures taken while
    other work competes for the CPUs are not comparable with quiet runs."""
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    busy = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(word in cmdline for word in ("nc server", "nc client", "iperf3", "openvpn", "pytest")):
            busy += 1
    return f"load average {load}; {busy} other nc/iperf3/openvpn/pytest processes running"


# -- processes, from /proc -----------------------------------------------------------


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(p) for p in task.read_text().split()]
        except OSError:
            continue
    return found


def python_pid(pid: int) -> int:
    """The python process that runs ./nc: `ip netns exec` and `/usr/bin/env` exec
    in place, but look through children too in case a launcher forks. nc names its
    process "nc" (PR_SET_NAME), an interpreter running anything else is "python..."."""
    todo = [pid]
    while todo:
        current = todo.pop(0)
        try:
            comm = Path(f"/proc/{current}/comm").read_text().strip()
        except OSError:
            continue
        if comm == "nc" or comm.startswith("python"):
            return current
        todo += children(current)
    raise RuntimeError(f"no python process under PID {pid}")


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise KeyError(name)


def rss_mib(pid: int) -> float:
    """VmRSS of pid in MiB."""
    return int(status_field(pid, "VmRSS").split()[0]) / 1024


def thread_count(pid: int) -> int:
    return int(status_field(pid, "Threads"))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of pid (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nofile_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return f"{soft}/{hard}"
    return "?"
