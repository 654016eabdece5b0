#!/usr/bin/env bash
# Build the modern wireguard-go that `tests/bench.sh wan --wireguard-go PATH` compares nc
# with: commit 9eb3221 (TUN and UDP GSO/GRO offload), with Debian's Go 1.19 and no module
# proxy. Usage:
#   tests/bench/build_wireguard_go.sh WIREGUARD_GO SYS NET CRYPTO [OUT]
# where each argument is a checkout (or `git archive`) of, in order:
#   https://git.zx2c4.com/wireguard-go (github.com/WireGuard/wireguard-go) at 9eb3221
#   golang.org/x/sys at v0.12.0, golang.org/x/net at v0.15.0, golang.org/x/crypto at v0.13.0
# OUT defaults to ./wireguard-go-9eb3221. The sources are copied, never changed: go.mod
# says `go 1.19` and replaces the three modules with the local copies, the Windows and
# netstack requirements (wintun, gvisor) go (the Linux binary imports neither), and
# errors.Join (Go 1.20) gets a small stand-in in package tun.
# Needs golang-1.19-go (apt-get install golang-1.19-go) or GO=/path/to/go.
set -euo pipefail

if [ $# -lt 4 ] || [ $# -gt 5 ]; then
    sed -n '2,13s/^# \{0,1\}//p' "$0" >&2
    exit 2
fi
GO=${GO:-/usr/lib/go-1.19/bin/go}
[ -x "$GO" ] || { echo "build_wireguard_go.sh: no Go at $GO (apt-get install golang-1.19-go, or set GO)" >&2; exit 1; }
abs() { (cd "$1" && pwd); }
src=$(abs "$1") sys=$(abs "$2") net=$(abs "$3") crypto=$(abs "$4")
out=$(realpath -m "${5:-wireguard-go-9eb3221}")
for dir in "$src" "$sys" "$net" "$crypto"; do
    [ -f "$dir/go.mod" ] || { echo "build_wireguard_go.sh: $dir has no go.mod" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cp -a "$src" "$work/wireguard-go"
cd "$work/wireguard-go"

cat >go.mod <<EOF
module golang.zx2c4.com/wireguard

go 1.19

require (
	golang.org/x/crypto v0.13.0
	golang.org/x/net v0.15.0
	golang.org/x/sys v0.12.0
)

replace (
	golang.org/x/crypto => $crypto
	golang.org/x/net => $net
	golang.org/x/sys => $sys
)
EOF
rm -f go.sum

# errors.Join is Go 1.20; package tun uses it to return two write errors as one.
cat >tun/join_errors_go119.go <<'EOF'
package tun

import "strings"

// joinedErrors is what joinErrors returns for more than one error.
type joinedErrors []error

func (e joinedErrors) Error() string {
	lines := make([]string, len(e))
	for i, err := range e {
		lines[i] = err.Error()
	}
	return strings.Join(lines, "\n")
}

// joinErrors stands in for Go 1.20's errors.Join: nil when every error is nil, else one
// error whose message has each non-nil one on its own line.
func joinErrors(errs ...error) error {
	var kept joinedErrors
	for _, err := range errs {
		if err == nil {
			continue
		}
		if joined, ok := err.(joinedErrors); ok {
			kept = append(kept, joined...)
		} else {
			kept = append(kept, err)
		}
	}
	if len(kept) == 0 {
		return nil
	}
	return kept
}
EOF
sed -i 's/errors\.Join(/joinErrors(/g' tun/offload_linux.go tun/tun_linux.go

export GOFLAGS=-mod=mod GOPROXY=off GOSUMDB=off GOTOOLCHAIN=local GO111MODULE=on
export GOPATH="$work/gopath" GOCACHE="$work/gocache" CGO_ENABLED=0
"$GO" build -trimpath -o "$out" .
"$out" --version
echo "built $out"
