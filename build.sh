#!/usr/bin/env bash
# Build ./nc: one self-contained executable (a shiv zipapp) holding ncctl.py,
# the protobuf modules generated from proto/*.proto, and the pinned runtime
# dependencies. Needs only python3 (with venv and pip) and the package registry.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
BUILD=.build
VENV=$BUILD/venv
SITE=$BUILD/site

# Runtime dependencies: exact versions, and the hashes of the CPython 3.11
# x86_64 Linux wheels they resolve to (pip --require-hashes refuses anything else).
RUNTIME_LOCK='
grpcio==1.85.1 --hash=sha256:83aced2a1c05648cee0de34e531351118b14c58238f0a61b43559ac8851647a8
protobuf==7.36.2 --hash=sha256:89f23aa53c24553a2416fd4fd1ec06f74fa42b14b546d8883128813f775bbfd2
cryptography==48.0.0 --hash=sha256:bd72e68b06bb1e96913f97dd4901119bc17f39d4586a5adf2d3e47bc2b9d58b5
cffi==2.1.1 --hash=sha256:34e261f78cb6ceaaa36f42f2613f4380d94d9c759a9c73c769ee6e0247364632
pycparser==3.12 --hash=sha256:a076f3f489b39b43ed13563a1dafe42447445bec2e294154ec5c57fcdda4c85e
PyYAML==6.0.3 --hash=sha256:b8bb0864c5a28024fac8a632c443c87c5aa6f215c0b126c449ae1a150412f31d
typing_extensions==4.16.0 --hash=sha256:481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8
grpcio-reflection==1.85.1 --hash=sha256:476f98ec652a5d69f837781ef44c9ff65ebc116e58a6c1dc7712526ac071262a
grpcio-health-checking==1.85.1 --hash=sha256:05e1cb0cc69706f89e884d219c9b2b9da4f561c1c610e9987ee4492b9c826ad1
prometheus-client==0.26.0 --hash=sha256:fa93d06737aa02bacd05794768508bb97d2fbee28cb3bca04eaae92f0ca953d6
'
# Build-only tools, pinned.
BUILD_TOOLS='grpcio-tools==1.85.1 shiv==1.0.8'

step() { printf '==> %s\n' "$*"; }

step "build environment ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check $BUILD_TOOLS

step "generate protobuf modules from proto/*.proto"
"$VENV/bin/python" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. proto/*.proto

step "runtime dependencies (pinned, hash-checked)"
rm -rf "$SITE"
mkdir -p "$SITE"
printf '%s\n' "$RUNTIME_LOCK" > "$BUILD/runtime.lock"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    --require-hashes --only-binary=:all: --target "$SITE" -r "$BUILD/runtime.lock"
cp ncctl.py "$SITE/"
mkdir -p "$SITE/proto"
cp proto/__init__.py proto/*_pb2.py proto/*_pb2_grpc.py "$SITE/proto/"

step "zipapp ./nc"
"$VENV/bin/shiv" --site-packages "$SITE" --entry-point ncctl:main \
    --python '/usr/bin/env python3' --compressed --reproducible --compile-pyc \
    --output-file "nc.tmp.$$" >/dev/null
mv "nc.tmp.$$" nc  # atomic: a running ./nc or a concurrent build never sees half a file
step "built ./nc ($(du -h nc | cut -f1))"
