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
for pair in ip:iproute2 ping:iputils-ping iperf3:iperf3 iptables:iptables etcd:etcd-server etcdctl:etcd-client; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

./build.sh
echo "==> test tools"
.build/venv/bin/pip install --quiet --disable-pip-version-check --require-hashes --only-binary=:all: -r .build/runtime.lock
.build/venv/bin/pip install --quiet --disable-pip-version-check pytest==9.2.0 pytest-timeout==2.4.0 hypothesis==6.170.15

echo "==> pytest"
exec .build/venv/bin/python -m pytest "$@"
