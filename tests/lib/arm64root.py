"""A Debian arm64 root for running ./nc-aarch64 on a real aarch64 userland, under qemu-user.

ensure_arm64_root() registers qemu-aarch64 with binfmt_misc (flag F: the kernel keeps the
interpreter open, so the root needs no copy of qemu) and builds the root once with
debootstrap into <repo>/.build/arm64-root; a half-built root never takes that name. The
Debian packages it needs (qemu-user-static, binfmt-support, debootstrap) are installed by
tests/run.sh, not here.

mounted() lends the root /proc, /sys and /dev (for /dev/net/tun) while a test uses it, and
directories of the host at the same paths inside (so a lab's work dirs and logs mean the
same inside and out); everything is unmounted when it ends, also on failure, and mounts a
killed run left are removed before new ones are made, so they never stack up. A lab host
runs in the root with `host.prefix = root.prefix`: `ip netns exec NS chroot ROOT ...`.

What qemu-user 7.2 (bookworm) cannot do in such a root: netlink families other than route
(so no nftables-based iptables), rtnetlink messages other than links, addresses and routes
(so no `tc`; nc's fq_codel is best effort), SO_MARK, and TCP_INFO (4 bytes come back).
TUN (TUNSETIFF, TUNSETOFFLOAD), `ip link/addr/route`, UDP GSO/GRO and packet info work.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What a node's nc needs at run time (it calls `ip`, `tc` best effort, and `iptables` for
# gateway mode), and what the tests run on a node.
PACKAGES = ("python3", "iproute2", "iputils-ping", "iptables")
DEBIAN_PACKAGES = ("qemu-user-static", "binfmt-support", "debootstrap")
INSTALL_HINT = f"apt-get install {' '.join(DEBIAN_PACKAGES)} (tests/run.sh does)"
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_NAME = "qemu-aarch64"
STAMP = ".nc-arm64-root.json"  # what the root was built from; another recipe builds anew
NC_INSIDE = "/usr/local/lib/nc/nc"
ENVIRONMENT = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LC_ALL=C.UTF-8")
DEBOOTSTRAP_TIMEOUT = 1800


class Arm64RootError(RuntimeError):
    """Something the arm64 root needs is missing; the message says what to do."""


def recipe() -> dict:
    return {"suite": SUITE, "mirror": MIRROR, "variant": "minbase", "packages": sorted(PACKAGES)}


def root_path(repo: Path) -> Path:
    return repo / ".build" / "arm64-root"


def ensure_arm64_root(repo: Path, progress: Callable[[str], None] = print) -> Path:
    """The arm64 root for this repo, built on first use (debootstrap takes minutes; progress
    says how far it is); a cached root costs a few file checks."""
    ensure_binfmt()
    root = root_path(repo)
    if _built_from_recipe(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f"{root.name}.lock"):
        if _built_from_recipe(root):  # another run built it while we waited
            return root
        for stale in root.parent.glob(f"{root.name}.tmp-*"):  # an interrupted build's
            progress(f"arm64 root: removing {stale.name}, left by an interrupted build")
            _remove_tree(stale)
        fresh = _debootstrap(root, progress)
        with _locked(root.parent / f"{root.name}.mount.lock"):  # nobody is using the old one
            if root.exists():
                progress("arm64 root: replacing the one built from an older recipe")
                old = Path(tempfile.mkdtemp(prefix=f"{root.name}.tmp-", dir=root.parent))
                old.rmdir()
                root.rename(old)
                fresh.rename(root)
                _remove_tree(old)
            else:
                fresh.rename(root)
    return root


def ensure_binfmt() -> None:
    """qemu-aarch64 registered, enabled and with flag F (fix binary)."""
    if not (BINFMT_DIR / "register").exists():
        done = subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise Arm64RootError(f"cannot mount binfmt_misc on {BINFMT_DIR}: {done.stderr.strip()}")
    entry = BINFMT_DIR / BINFMT_NAME
    if not entry.exists():
        update_binfmts = _tool("update-binfmts")
        if not Path("/usr/share/binfmts", BINFMT_NAME).exists():
            raise Arm64RootError(f"qemu-user-static is not installed; {INSTALL_HINT}")
        done = subprocess.run([update_binfmts, "--enable", BINFMT_NAME], capture_output=True, text=True)
        if done.returncode != 0 or not entry.exists():
            raise Arm64RootError(f"update-binfmts --enable {BINFMT_NAME} failed: {done.stderr.strip()}")
    text = entry.read_text()
    if not text.startswith("enabled"):
        entry.write_text("1")
    flags = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("flags:")), "")
    if "F" not in flags:
        raise Arm64RootError(
            f"{entry} has flags {flags!r}, without F: a chroot could not find the qemu interpreter; "
            f"register it from qemu-user-static's /usr/share/binfmts/{BINFMT_NAME} (fix_binary yes)"
        )


def _built_from_recipe(root: Path) -> bool:
    try:
        return json.loads((root / STAMP).read_text()) == recipe()
    except (OSError, ValueError):
        return False


def _debootstrap(root: Path, progress: Callable[[str], None]) -> Path:
    """A complete root in a temporary directory beside root; removed if anything fails."""
    debootstrap = _tool("debootstrap")
    building = Path(tempfile.mkdtemp(prefix=f"{root.name}.tmp-", dir=root.parent))
    building.chmod(0o755)  # it becomes the root directory of the chroot
    log_path = root.parent / f"{root.name}.log"
    command = [
        debootstrap,
        "--arch=arm64",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(building),
        MIRROR,
    ]
    progress(f"arm64 root: debootstrap {SUITE} into {building} (a few minutes; log {log_path})")
    started = time.monotonic()
    try:
        with open(log_path, "w") as log:
            _follow(command, log, progress, started)
        for package in (building / "var/cache/apt/archives").glob("*.deb"):
            package.unlink()
        done = subprocess.run(
            ["chroot", str(building), "python3", "-c", "import platform; print(platform.machine())"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.stdout.strip() != "aarch64":
            raise Arm64RootError(f"python3 in the new root does not run as aarch64: {done.stdout}{done.stderr}")
        (building / STAMP).write_text(json.dumps(recipe()))
    except BaseException:
        _remove_tree(building)
        raise
    progress(f"arm64 root: built in {time.monotonic() - started:.0f} s")
    return building


def _follow(command: list[str], log: IO[str], progress: Callable[[str], None], started: float) -> None:
    """Run debootstrap, all output to the log, a progress line as each phase begins
    (Retrieving, Unpacking, Configuring, ...; not one per package)."""
    # Its own process group: stopping it stops the dpkg and chroot children it runs too.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    assert process.stdout is not None
    phases: set[str] = set()
    deadline = started + DEBOOTSTRAP_TIMEOUT
    try:
        for line in process.stdout:
            log.write(line)
            words = line.split()
            if len(words) >= 2 and words[0] == "I:" and words[1] not in phases:
                phases.add(words[1])
                progress(f"arm64 root: [{time.monotonic() - started:4.0f} s] {line.strip()[3:]}")
            if time.monotonic() > deadline:
                raise Arm64RootError(f"debootstrap took over {DEBOOTSTRAP_TIMEOUT} s; see {log.name}")
        if process.wait() != 0:
            log.flush()
            tail = Path(log.name).read_text(errors="replace").splitlines()[-15:]
            raise Arm64RootError(f"debootstrap failed ({process.returncode}); its log ends:\n" + "\n".join(tail))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not found:
        raise Arm64RootError(f"`{name}` is missing; {INSTALL_HINT}")
    return found


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# -- mounts ---------------------------------------------------------------------------------


def mounts_below(path: Path) -> list[str]:
    """Mount points at or under path, in mount order (a point mounted twice is listed twice)."""
    top = os.path.realpath(path)
    points = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            # field 5 is the mount point, with space, tab, newline and backslash as \ooo
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
            if point == top or point.startswith(top + "/"):
                points.append(point)
    return points


def unmount_below(path: Path) -> None:
    """Unmount everything at or under path, deepest and latest first; a mount still in use
    (a process kept a file open) is detached lazily, so nothing stays behind."""
    for _ in range(100):
        points = mounts_below(path)
        if not points:
            return
        point = max(reversed(points), key=lambda p: p.count("/"))  # deepest, latest of those
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True, check=True)
    raise Arm64RootError(f"mounts under {path} would not go away: {mounts_below(path)}")


def _remove_tree(path: Path) -> None:
    unmount_below(path)  # debootstrap mounts /proc and /sys in a root it configures
    shutil.rmtree(path)


class Arm64Root:
    """A mounted arm64 root: `prefix` runs a command in it, install() puts a file in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # A clean environment: the host's PATH or PYTHONPATH mean nothing in here.
        self.prefix: tuple[str, ...] = ("chroot", str(path), "/usr/bin/env", "-i", *ENVIRONMENT)

    def install(self, artifact: Path, inside: str = NC_INSIDE) -> str:
        """Copy an executable into the root (atomically); returns its path inside."""
        target = self.path / inside.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(artifact, partial)
        partial.chmod(0o755)
        partial.replace(target)
        return inside

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A command in the root, in the host's network namespace."""
        return subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def mounted(root: Path, shared: Sequence[Path] = ()) -> Iterator[Arm64Root]:
    """The root with /proc, /sys, /dev and the `shared` host directories (at the same
    paths) mounted while in use; one user at a time."""
    with _locked(root.parent / f"{root.name}.mount.lock"):
        unmount_below(root)  # a killed run's
        made: list[Path] = []
        try:
            _mount(root / "proc", "-t", "proc", "proc")
            _mount(root / "sys", "-t", "sysfs", "sysfs")
            _mount(root / "dev", "--bind", "/dev")
            for directory in shared:
                source = Path(os.path.realpath(directory))
                if source == Path("/") or Path(os.path.realpath(root)).is_relative_to(source):
                    raise ValueError(f"{directory} contains the root; it cannot be shared into it")
                target = root / source.relative_to("/")
                made.extend(_make_dirs(target))
                _mount(target, "--bind", str(source))
            yield Arm64Root(root)
        finally:
            unmount_below(root)
            for directory in reversed(made):
                with contextlib.suppress(OSError):
                    directory.rmdir()


def _mount(target: Path, *how: str) -> None:
    done = subprocess.run(["mount", *how, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        raise Arm64RootError(f"mount {' '.join(how)} {target}: {done.stderr.strip()}")


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p; returns the directories it made, outermost first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir()
    return list(reversed(missing))
