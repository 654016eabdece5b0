#!/usr/bin/env bash
# Build ./nc: one self-contained executable (a shiv zipapp) holding ncctl.py, the
# protobuf modules generated from proto/*.proto, and one set of the pinned runtime
# packages for every CPython the file runs on (3.9 to 3.14), for one architecture.
# At start the file picks the set for the interpreter running it and unpacks only
# that one. Needs only python3 (3.9 or newer, with venv and pip) and the package
# registry; nothing is compiled, so any architecture can be built from any other.
#
#   ./build.sh                  ./nc for this machine's architecture
#   ./build.sh --arch aarch64   ./nc-aarch64 (likewise --arch x86_64: ./nc-x86_64)
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,10s/^# \{0,1\}//p' "$0"; }
ARCH=$(uname -m)
OUT=nc
while [ $# -gt 0 ]; do
    case $1 in
        --arch)
            [ $# -ge 2 ] || { echo "build.sh: --arch needs x86_64 or aarch64" >&2; exit 2; }
            ARCH=$2; OUT=nc-$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "build.sh: unknown argument '$1' (see ./build.sh --help)" >&2; exit 2 ;;
    esac
done
case $ARCH in
    x86_64|aarch64) ;;
    *) echo "build.sh: no wheels are pinned for '$ARCH'; choose x86_64 or aarch64" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-python3}
BUILD=.build
TOOLS=$BUILD/tools  # the build tools' own venv: tests/run.sh's $BUILD/venv holds the runtime packages

# The interpreters the file carries a set for, and the glibc the wheels need at most:
# manylinux_2_28 or older (manylinux2014 = 2.17) only, so hosts from RHEL 8, Debian 10
# and Ubuntu 20.04 on run it.
ABIS="cp39 cp310 cp311 cp312 cp313 cp314"
GLIBC_FLOOR=2.28
PLATFORMS="manylinux_2_28_$ARCH manylinux_2_17_$ARCH manylinux2014_$ARCH"

# Runtime dependencies, pinned exactly for each range of interpreters (the newest release
# of each package that still publishes wheels for it), with the hash of every wheel that
# may be taken: one per architecture and interpreter. pip --require-hashes refuses any
# other file.
LOCK_CP39='
cffi==2.0.0 --hash=sha256:61d028e90346df14fedc3d1e5441df818d095f3b87d286825dfcbd6459b7ef63 --hash=sha256:3f4d46d8b35698056ec29bca21546e1551a205058ae1a181d871e278b0b28165
cryptography==43.0.3 --hash=sha256:c2e6fc39c4ab499049df3bdf567f768a723a5e8464816e8f009f121a5a9f4405 --hash=sha256:f7b178f11ed3664fd0e995a47ed2b5ff0a12d893e41dd0494f406d1cf555cab7
grpcio==1.80.1 --hash=sha256:c87817d7280b2a648ac817fa7869ce677ce8a7928edf0c2ee60db8c1518fc908 --hash=sha256:6449455419dac386bfcbe4bd63d817da31b7615a69926cfd46574737cd103b85
grpcio-health-checking==1.80.1 --hash=sha256:fda593e5787169600cd4e1ffe30c4f8211c840b84fb4d819a9d13d10f08eafdf
grpcio-reflection==1.80.1 --hash=sha256:4ed081bdf75b9e76ef8d110ca8ed9fd53d92ed4dac8ad2704ac34fee611fdf69
prometheus-client==0.26.0 --hash=sha256:fa93d06737aa02bacd05794768508bb97d2fbee28cb3bca04eaae92f0ca953d6
protobuf==6.33.6 --hash=sha256:e9db7e292e0ab79dd108d7f1a94fe31601ce1ee3f7b79e0692043423020b0593 --hash=sha256:e2afbae9b8e1825e3529f88d514754e094278bb95eadc0e199751cdd9a2e82a2
pycparser==2.23 --hash=sha256:e5c6e8d3fbad53479cab09ac03729e0a9faf2bee3db8208a550daf5af81a5934
PyYAML==6.0.3 --hash=sha256:0150219816b6a1fa26fb4699fb7daa9caf09eb1999f3b70fb6e786805e80375a --hash=sha256:3c5677e12444c15717b902a5798264fa7909e41153cdf9ef7ad571b704a63dd9
typing_extensions==4.16.0 --hash=sha256:481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8
'
LOCK_CP310='
cffi==2.1.1 --hash=sha256:194cffa889098ced9976c3fc6340305e43f6303657d298da55366907c05c22d6 --hash=sha256:5a59cc1c4442bc3d5c703bf720b51138d0bfc173618807c9ee2490a7541dd3d9
cryptography==48.0.0 --hash=sha256:2b4d59804e8408e2fea7d1fbaf218e5ec984325221db76e6a241a9abd6cdd95c --hash=sha256:2eb992bbd4661238c5a397594c83f5b4dc2bc5b848c365c8f991b6780efcc5c7
grpcio==1.85.1 --hash=sha256:1f04e51dc65c82af420f6cd177ea76132a78c14dc7adc3044f549b419bc70487 --hash=sha256:c5a914b3a3052d841766946ecd1c6ebdacc8bf166d89a42c83fda70ae8f53aeb
grpcio-health-checking==1.85.1 --hash=sha256:05e1cb0cc69706f89e884d219c9b2b9da4f561c1c610e9987ee4492b9c826ad1
grpcio-reflection==1.85.1 --hash=sha256:476f98ec652a5d69f837781ef44c9ff65ebc116e58a6c1dc7712526ac071262a
prometheus-client==0.26.0 --hash=sha256:fa93d06737aa02bacd05794768508bb97d2fbee28cb3bca04eaae92f0ca953d6
protobuf==7.36.2 --hash=sha256:89f23aa53c24553a2416fd4fd1ec06f74fa42b14b546d8883128813f775bbfd2 --hash=sha256:e11e1f0180583a2af89db6a2ecd9e8dc40aa6d2988ca175bfd0e6d12ea72d74e
pycparser==3.11 --hash=sha256:51d5a8ba2be0bbe440b99d2112604c95bbbc3c2748a64260186c541e1729cd80
PyYAML==6.0.3 --hash=sha256:9c7708761fccb9397fe64bbc0395abcae8c4bf7b0eac081e12b809bf47700d0b --hash=sha256:b30236e45cf30d2b8e7b3e85881719e98507abed1011bf463a8fa23e9c3e98a8
typing_extensions==4.16.0 --hash=sha256:481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8
'
LOCK_CP311='
cffi==2.1.1 --hash=sha256:34e261f78cb6ceaaa36f42f2613f4380d94d9c759a9c73c769ee6e0247364632 --hash=sha256:c1453022f490d2459a11819d83ad1d586e9ff65a12ac3e705ffebd46d3685dcf --hash=sha256:a931079504ecc49efed7744c476a5c343a92fabf66dec2db95edb1b2fdc770e2 --hash=sha256:b0431303acaea1089ad4b3e9ce4e6518193def1118d4073ca848635ee4ea2e96 --hash=sha256:3311ed60d36f83378794e1009ac6258bafbf81f7888b4caa7b35a521e3f95813 --hash=sha256:68e62fe11f30d5ca8289242866f0a5291402d8529ca2178ab8afc5c9694ae890 --hash=sha256:f16c709686a78c727bbbf059f92b0bf41c6fc60deec706d2dc19f529175a6125 --hash=sha256:58acb8ab8e295e6c5ea12f888cbb13cf21511ef2a3303a23f4325c29d17fe5c1
cryptography==48.0.0 --hash=sha256:a0e692c683f4df67815a2d258b324e66f4738bd7a96a218c826dce4f4bd05d8f --hash=sha256:40ba1f85eaa6959837b1d51c9767e230e14612eea4ef110ee8854ada22da1bf5
grpcio==1.85.1 --hash=sha256:83aced2a1c05648cee0de34e531351118b14c58238f0a61b43559ac8851647a8 --hash=sha256:a1a72d19c0ab84b4b73b6c47eeaade76d84b1973a51593ff1160a73df33d03d9 --hash=sha256:de520b1555ae445cdc4f8f1cc7ccba12a19992bfafa7c292ebe7fe1fe5da6c53 --hash=sha256:e0e6d5829b50a2ffcfcd2dbf08d02ac0d6919051a2e97c2ee27c99bc9916a245 --hash=sha256:9885436e83eab92dd0d476642baf08a17c55ef2b1db430adcba3e89bb6938a5d --hash=sha256:843aa281a48188621f50880496d35defed51298bcb66d5345d5f282fd3f87354 --hash=sha256:0bde4264ca71aaf3bc56c587380c426b1c959d1db0ab0a3f632bc66515f9726f --hash=sha256:421925365f9a665830eded01b8053033abbc2fbabc9bb4e9c59c3b5b12acbab9
grpcio-health-checking==1.85.1 --hash=sha256:05e1cb0cc69706f89e884d219c9b2b9da4f561c1c610e9987ee4492b9c826ad1
grpcio-reflection==1.85.1 --hash=sha256:476f98ec652a5d69f837781ef44c9ff65ebc116e58a6c1dc7712526ac071262a
prometheus-client==0.26.0 --hash=sha256:fa93d06737aa02bacd05794768508bb97d2fbee28cb3bca04eaae92f0ca953d6
protobuf==7.36.2 --hash=sha256:89f23aa53c24553a2416fd4fd1ec06f74fa42b14b546d8883128813f775bbfd2 --hash=sha256:e11e1f0180583a2af89db6a2ecd9e8dc40aa6d2988ca175bfd0e6d12ea72d74e
pycparser==3.12 --hash=sha256:a076f3f489b39b43ed13563a1dafe42447445bec2e294154ec5c57fcdda4c85e
PyYAML==6.0.3 --hash=sha256:b8bb0864c5a28024fac8a632c443c87c5aa6f215c0b126c449ae1a150412f31d --hash=sha256:ba1cc08a7ccde2d2ec775841541641e4548226580ab850948cbfda66a1befcdc --hash=sha256:0f29edc409a6392443abf94b9cf89ce99889a1dd5376d94316ae5145dfedd5d6 --hash=sha256:c458b6d084f9b935061bc36216e8a69a7e293a2f1e68bf956dcd9e6cbcd143f5 --hash=sha256:10892704fc220243f5305762e276552a0395f7beb4dbf9b14ec8fd43b57f126c --hash=sha256:9149cad251584d5fb4981be1ecde53a1ca46c891a79788c0df828d2f166bda28 --hash=sha256:ee2922902c45ae8ccada2c5b501ab86c36525b883eff4255313a253a3160861c --hash=sha256:501a031947e3a9025ed4405a168e6ef5ae3126c59f90ce0cd6f2bfc477be31b7
typing_extensions==4.16.0 --hash=sha256:481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8
'
lock_for() {  # the lock of an interpreter ABI tag (cp39, cp310, ...)
    case $1 in
        cp39) printf '%s\n' "$LOCK_CP39" ;;
        cp310) printf '%s\n' "$LOCK_CP310" ;;
        *) printf '%s\n' "$LOCK_CP311" ;;
    esac
}
# Build-only tools, pinned. grpcio-tools 1.80 generates modules that the oldest bundled
# runtime (grpcio 1.80, protobuf 6.33 on CPython 3.9) and the newest both accept.
BUILD_TOOLS='grpcio-tools==1.80.1 shiv==1.0.8'

step() { printf '==> %s\n' "$*"; }

step "build tools ($TOOLS)"
if [ ! -x "$TOOLS/bin/python" ]; then
    "$PYTHON" -m venv "$TOOLS"
fi
"$TOOLS/bin/pip" install --quiet --disable-pip-version-check $BUILD_TOOLS
# The lock of the build interpreter, for tests/run.sh's venv.
lock_for "$("$TOOLS/bin/python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')" > "$BUILD/runtime.lock"

step "generate protobuf modules from proto/*.proto"
"$TOOLS/bin/python" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. proto/*.proto

step "wheels for $ARCH, CPython ${ABIS//cp3/3.} (pinned, hash-checked)"
WHEELS=$BUILD/wheels/$ARCH
for abi in $ABIS; do
    rm -rf "$WHEELS/$abi"
    mkdir -p "$WHEELS/$abi"
    lock_for "$abi" > "$WHEELS/$abi.lock"
    platforms=()
    for platform in $PLATFORMS; do platforms+=(--platform "$platform"); done
    "$TOOLS/bin/pip" download --quiet --disable-pip-version-check --no-deps --require-hashes \
        --only-binary=:all: "${platforms[@]}" --implementation cp --python-version "3.${abi#cp3}" \
        --abi "$abi" --abi abi3 --abi none -d "$WHEELS/$abi" -r "$WHEELS/$abi.lock"
done

step "ncctl.py and the protobuf modules"
SITE=$BUILD/site
rm -rf "$SITE"
mkdir -p "$SITE/proto"
cp ncctl.py "$SITE/"
cp proto/__init__.py proto/*_pb2.py proto/*_pb2_grpc.py "$SITE/proto/"

step "zipapp ./$OUT"
"$TOOLS/bin/shiv" --site-packages "$SITE" --entry-point ncctl:main \
    --python '/usr/bin/env python3' --compressed --reproducible --compile-pyc \
    --output-file "$BUILD/$OUT.shiv" >/dev/null
# shiv's archive becomes nc's: its own __main__.py first checks that this interpreter
# and host can run the file, the wheels go in as one xz stream (the builds of a package
# for different interpreters share most bytes, so solid compression stores them about
# once), and nc-bundle.json says which wheels make each interpreter's set.
"$TOOLS/bin/python" - "$BUILD/$OUT.shiv" "nc.tmp.$$" "$ARCH" "$GLIBC_FLOOR" "$WHEELS" $ABIS <<'PY'
import hashlib
import io
import json
import lzma
import sys
import tarfile
import zipfile
from pathlib import Path

shiv_zip, out, arch, glibc, wheels = sys.argv[1:6]
abis = sys.argv[6:]

LAUNCHER = '''\
# nc's launcher. It decides whether this interpreter on this host can run the file before
# anything is unpacked, then hands over to shiv's bootstrap. Written in the syntax every
# Python parses (2.7 included), so an interpreter nc cannot use still gets one clear line.
import json
import os
import platform
import sys
import zipfile


def refusal():
    with zipfile.ZipFile(sys.argv[0]) as archive:
        bundle = json.loads(archive.read("nc-bundle.json").decode("utf-8"))
    found = "%s %s on %s" % (platform.python_implementation(), platform.python_version(), platform.machine())
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        name, version = platform.libc_ver()
        libc = "glibc " + version if name == "glibc" else ""
    found += " with " + (libc or "a C library other than glibc")
    wants = "this nc runs on CPython %s on %s Linux with glibc %s or newer" % (
        bundle["pythons"], bundle["arch"], bundle["glibc"])
    glibc_version = tuple(int(part) for part in libc.split()[-1].split(".")[:2]) if libc.startswith("glibc ") else ()
    floor = tuple(int(part) for part in bundle["glibc"].split("."))
    if (
        platform.python_implementation() != "CPython"
        or "cp%d%d" % sys.version_info[:2] not in bundle["sets"]
        or not sys.platform.startswith("linux")
        or platform.machine() != bundle["arch"]
        or glibc_version < floor
    ):
        return "found %s; %s" % (found, wants)
    try:
        import lzma  # noqa: F401  (the bundled packages are stored xz-compressed)
    except ImportError:
        return "found %s without its lzma module, which nc needs to unpack its packages; " \\
            "install the distribution's full python3 package" % found
    return None


problem = refusal()
if problem:
    sys.stderr.write("nc: error: %s\\n" % problem)
    sys.exit(2)
import _bootstrap  # noqa: E402

_bootstrap.bootstrap()
'''

# One member per file of each distinct wheel, under the wheel's name; a package's
# builds for the different interpreters follow one another, so xz finds what they share.
sets = {}
wheel_files = {}
for abi in abis:
    names = sorted(path.name for path in Path(wheels, abi).glob("*.whl"))
    sets[abi] = [name[: -len(".whl")] for name in names]
    for name in names:
        wheel_files.setdefault(name, Path(wheels, abi, name))

# Compressing takes a minute or two: the stream is kept and reused while the wheels are the same.
key = hashlib.sha256("\n".join(sorted(wheel_files)).encode()).hexdigest()
cached = Path(wheels).with_name(Path(wheels).name + ".tar.xz")
cached_key = cached.with_name(cached.name + ".key")
if not (cached.exists() and cached_key.exists() and cached_key.read_text() == key):
    stream = io.BytesIO()
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": 64 << 20}]
    with lzma.open(stream, "wb", format=lzma.FORMAT_XZ, filters=filters) as xz:
        with tarfile.open(fileobj=xz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name, path in sorted(wheel_files.items()):
                with zipfile.ZipFile(path) as wheel:
                    for info in sorted(wheel.infolist(), key=lambda i: i.filename):
                        if info.is_dir():
                            continue
                        data = wheel.read(info)
                        member = tarfile.TarInfo(f"{name[: -len('.whl')]}/{info.filename}")
                        member.size, member.mtime = len(data), 0
                        member.mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
                        tar.addfile(member, io.BytesIO(data))
    cached.write_bytes(stream.getvalue())
    cached_key.write_text(key)

lows = sorted(abis, key=lambda tag: int(tag[3:]))
bundle = {
    "arch": arch,
    "glibc": glibc,
    "pythons": f"3.{lows[0][3:]} to 3.{lows[-1][3:]}",
    "sets": sets,
}
with open(shiv_zip, "rb") as source, open(out, "wb") as target:
    shebang = source.readline()
    target.write(shebang)
    with zipfile.ZipFile(shiv_zip) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        stamp = old.getinfo("environment.json").date_time
        for info in old.infolist():
            if info.filename != "__main__.py":
                new.writestr(info, old.read(info), compress_type=info.compress_type)

        def add(name: str, data: bytes, compress: int) -> None:
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.external_attr = 0o644 << 16
            new.writestr(info, data, compress_type=compress)

        add("__main__.py", LAUNCHER.encode(), zipfile.ZIP_DEFLATED)
        add("nc-bundle.json", json.dumps(bundle, indent=1, sort_keys=True).encode(), zipfile.ZIP_DEFLATED)
        add("sets.tar.xz", cached.read_bytes(), zipfile.ZIP_STORED)
PY
chmod 755 "nc.tmp.$$"
mv "nc.tmp.$$" "$OUT"  # atomic: a running ./nc or a concurrent build never sees half a file
rm -f "$BUILD/$OUT.shiv"
step "built ./$OUT ($(du -h "$OUT" | cut -f1), CPython ${ABIS//cp3/3.} on $ARCH, glibc >= $GLIBC_FLOOR)"
