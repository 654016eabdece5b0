#!/usr/bin/env bash
# Run the benchmarks (not part of the pytest suite): builds ./nc, then runs
#   throughput  nc vs OpenVPN 2.6 vs underlay: iperf3 and ping   (tests/bench/bench_throughput.py)
#   scale       one nc server, 1000 simulated nodes              (tests/bench/bench_scale.py)
#   pool        full /16 address pool, LRU reclaim               (tests/bench/bench_pool.py)
#   hostile     ping p99 while one node floods malicious GSO     (tests/bench/bench_hostile.py)
#               [--flood control]: REKEY, then TRANSPORT floods of [--seconds 10] each: the
#               other pair's ping loss and p99, the server's log lines (issue 20's targets)
#   floods      1000 idle connections per port from one address  (tests/bench/bench_floods.py)
#   ha          replicas on etcd: failovers, one holder, 200 joins (tests/bench/bench_ha.py)
#   wan         nc auto, TCP and UDP vs wireguard-go (Debian's, and a modern build given
#               by --wireguard-go PATH) and OpenVPN UDP/TCP on a lossy, rate-limited
#               underlay; node to server, back, and node to node:
#               [--loss PCT] [--rate MBIT] [--wire] [--seconds S] [--repeat N] [--only PATH]
#               [--wireguard-go PATH] (tests/bench/bench_wan.py; not part of "all")
#   fallback    UDP blocked before the join and mid-session: time to TCP and back
#               (tests/bench/bench_fallback.py; not part of "all")
#   direct      direct node-to-node paths vs the server relay, two sites behind NATs:
#               iperf3, ping and the server's CPU [--seconds S] [--repeat N] (tests/bench/bench_direct.py;
#               not part of "all")
#   portable    the file's size, first and later start, unpacked size, per CPython
#               3.9-3.13 beside the bare interpreter's start (tests/bench/bench_portable.py)
#   all         all of them, one after the other (default)
# Extra arguments go to the one benchmark named, e.g.
#   tests/bench.sh throughput --seconds 3 --repeat 1
#   tests/bench.sh scale --nodes 2000
#   tests/bench.sh wan --loss 3 --seconds 10
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-all}
[ $# -gt 0 ] && shift
case "$what" in
    throughput | scale | pool | hostile | floods | ha | wan | fallback | direct | portable) ;;
    all)
        if [ $# -gt 0 ]; then
            echo "tests/bench.sh: extra arguments need one benchmark name (throughput, scale, pool, hostile, floods or ha)" >&2
            exit 2
        fi
        ;;
    -h | --help)
        sed -n '2,27s/^# \{0,1\}//p' "$0"
        exit 0
        ;;
    *)
        echo "tests/bench.sh: unknown benchmark '$what'; use throughput, scale, pool, hostile, floods, ha, wan, fallback, direct, portable or all" >&2
        exit 2
        ;;
esac
if [ "$(id -u)" != 0 ]; then
    echo "tests/bench.sh: the benchmarks create network namespaces and TUN devices; run as root" >&2
    exit 1
fi

./build.sh
.build/venv/bin/pip install --quiet --disable-pip-version-check --require-hashes --only-binary=:all: \
    -r .build/runtime.lock
PYTHON=.build/venv/bin/python

failed=()
run() {
    echo "==> benchmark: $1"
    local code=0
    "$PYTHON" "tests/bench/bench_$1.py" "${@:2}" || code=$?
    if [ "$code" -eq 130 ]; then
        exit 130 # interrupted: the benchmark cleaned up; do not start the next one
    elif [ "$code" -ne 0 ]; then
        failed+=("$1")
    fi
}

if [ "$what" = all ]; then
    run pool
    run scale
    run throughput
    run hostile
    run floods
    run ha
    run portable
else
    run "$what" "$@"
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "tests/bench.sh: failed: ${failed[*]}" >&2
    exit 1
fi
