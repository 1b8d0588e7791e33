#!/usr/bin/env bash
# Builds the Debian packages (cpack -G DEB) from a built tree, checks what
# each holds, unpacks them all into a scratch root (dpkg -x) and runs the
# main job from the unpacked files only: the packaged ferryd with the
# packaged /etc/ferry/ferryd.toml (paths redirected into the scratch root by
# flags), the packaged `ferry` CLI uploading and downloading a sparse image
# with progress, checksums compared; then builds programs against the
# unpacked libferry-dev with pkg-config and with find_package(ferry) and
# runs them against that daemon.
#   package_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
BUILD=$(cd "$1" && pwd)
SRC=$(cd "$2" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ferry-package-test.XXXXXX")
ROOT="$WORK/root"
FERRYD_PID=""
cleanup() {
  if [ -n "$FERRYD_PID" ]; then kill "$FERRYD_PID" 2>/dev/null || true; wait "$FERRYD_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; [ -f "$WORK/ferryd.log" ] && tail -n 20 "$WORK/ferryd.log" >&2; exit 1; }
step() { echo "== $*"; }

step "cpack -G DEB"
(cd "$BUILD" && cpack -G DEB -B "$WORK/debs" >"$WORK/cpack.log" 2>&1) || { cat "$WORK/cpack.log"; fail "cpack"; }
ls -1 "$WORK/debs"/*.deb
deb() { ls "$WORK/debs/$1"_*.deb 2>/dev/null | head -n 1; }
for p in ferryd ferry libferry0 libferry-dev; do
  [ -n "$(deb "$p")" ] || fail "no package $p"
  case "$(basename "$(deb "$p")")" in
    "$p"_*-1_*.deb) ;;
    *) fail "$(deb "$p"): not a Debian-style file name" ;;
  esac
done
# python3-ferry exists exactly when the Python binding is installed.
if grep -E '^set\(CPACK_COMPONENTS_ALL ' "$BUILD/CPackConfig.cmake" | grep -c >/dev/null python3-ferry; then
  [ -n "$(deb python3-ferry)" ] || fail "the python3-ferry component is installed but no package was made"
  dpkg-deb --contents "$(deb python3-ferry)" | grep -c >/dev/null 'usr/lib/python3/dist-packages/ferry/' ||
    fail "python3-ferry does not hold usr/lib/python3/dist-packages/ferry"
  py_abi=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  dpkg-deb --field "$(deb python3-ferry)" Depends | grep -c >/dev/null "python3 (>= $py_abi)" ||
    fail "python3-ferry is not tied to the Python $py_abi its extension module is built for"
else
  [ -z "$(deb python3-ferry)" ] || fail "python3-ferry made without the Python binding"
  echo "python3-ferry: not built (no Python binding in this tree)"
fi

step "dpkg-deb --info / --contents"
field() { dpkg-deb --field "$(deb "$1")" "$2"; }
contents() { dpkg-deb --contents "$(deb "$1")" | awk '{print $6 ($7 ? " " $7 " " $8 : "")}'; }
has() {  # has PACKAGE PATH-REGEX
  contents "$1" | grep -Ec >/dev/null "^\.$2( |$)" || fail "$1 does not contain $2"
}
for p in ferryd ferry libferry0 libferry-dev; do
  dpkg-deb --info "$(deb "$p")" >/dev/null
  echo "$p $(field "$p" Version): Depends: $(field "$p" Depends)"
  [ -n "$(field "$p" Maintainer)" ] && [ -n "$(field "$p" Section)" ] && [ -n "$(field "$p" Description)" ] ||
    fail "$p lacks Maintainer, Section or Description"
done
has ferryd /usr/sbin/ferryd
has ferryd '/(usr/)?lib/systemd/system/ferryd\.service'
has ferryd '/(usr/)?lib/systemd/system/ferryd\.socket'
has ferryd '/(usr/)?lib/systemd/system/ferryd-tcp\.socket'
has ferryd /etc/ferry/ferryd.toml
has ferry /usr/bin/ferry
has libferry0 '/usr/lib/([a-z0-9_-]+/)?libferry\.so\.0\.1\.0'
has libferry0 '/usr/lib/([a-z0-9_-]+/)?libferry\.so\.0 -> libferry\.so\.0\.1\.0'
has libferry-dev '/usr/lib/([a-z0-9_-]+/)?libferry\.so -> libferry\.so\.0'
has libferry-dev '/usr/lib/([a-z0-9_-]+/)?libferry_client\.a'
has libferry-dev '/usr/lib/([a-z0-9_-]+/)?libferry_rpc\.a'
has libferry-dev '/usr/lib/([a-z0-9_-]+/)?pkgconfig/ferry\.pc'
has libferry-dev '/usr/lib/([a-z0-9_-]+/)?cmake/ferry/ferryConfig\.cmake'
has libferry-dev '/usr/lib/([a-z0-9_-]+/)?cmake/ferry/ferryTargets\.cmake'
has libferry-dev /usr/include/ferry/client/ferry.h
has libferry-dev /usr/include/ferry/client/session.h
has libferry-dev /usr/include/ferry/rpc/server.h
has libferry-dev /usr/include/ferry/ferry/v1/volume.pb.h
has ferry /usr/share/bash-completion/completions/ferry
# The man pages are in the packages whenever the build made them (help2man).
for m in "ferryd /usr/share/man/man8/ferryd\.8" "ferryd /usr/share/man/man5/ferryd\.conf\.5" "ferry /usr/share/man/man1/ferry\.1"; do
  set -- $m
  if [ -f "$BUILD/man/ferry.1" ]; then has "$1" "$2"; echo "$1 has $2"; else echo "$1: no $2 (man pages not built)"; fi
done
contents libferry0 | grep -c >/dev/null '\.a$\|/include/' && fail "libferry0 holds development files"
dpkg-deb --ctrl-tarfile "$(deb ferryd)" | tar -x -O ./conffiles | grep -cx >/dev/null /etc/ferry/ferryd.toml ||
  fail "/etc/ferry/ferryd.toml is not a conffile of ferryd"
field ferryd Depends | grep -c >/dev/null adduser || fail "ferryd does not depend on adduser"
field ferryd Depends | grep -c >/dev/null libsystemd0 || fail "ferryd's shlibdeps lack libsystemd0"
field libferry-dev Depends | grep -c >/dev/null "libferry0 (= $(field libferry0 Version))" || fail "libferry-dev does not depend on libferry0 (= version)"
mkdir -p "$WORK/ctrl"
dpkg-deb --control "$(deb ferryd)" "$WORK/ctrl"
for s in postinst prerm postrm; do
  [ -x "$WORK/ctrl/$s" ] || fail "ferryd has no executable $s"
  sh -n "$WORK/ctrl/$s" || fail "ferryd $s: syntax error"
done

step "dpkg -x into $ROOT, then the main job from the unpacked files"
start=$(date +%s.%N)
mkdir -p "$ROOT"
for d in "$WORK/debs"/*.deb; do dpkg -x "$d" "$ROOT"; done
FERRYD="$ROOT/usr/sbin/ferryd"
FERRY="$ROOT/usr/bin/ferry"
LIBDIR=$(dirname "$(find "$ROOT/usr/lib" -name 'libferry.so.0' | head -n 1)")
export LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for f in "$FERRYD" "$FERRY" "$LIBDIR/libferry.so.0"; do
  ldd "$f" >"$WORK/ldd.txt" 2>&1 || fail "ldd $f"
  if grep -c >/dev/null "not found" "$WORK/ldd.txt"; then cat "$WORK/ldd.txt"; fail "ldd $f: unresolved libraries"; fi
done
echo "ldd: ferryd, ferry and libferry.so.0 resolve"

# The packaged file is exactly ferryd's default for the packaged layout.
"$FERRYD" --config "$ROOT/etc/ferry/ferryd.toml" --print-config >"$WORK/from-file.toml"
# shellcheck disable=SC2046
"$FERRYD" --print-config $(cat "$BUILD/packaging/ferryd.toml.flags") >"$WORK/expected.toml"
# (the first line of each names its source)
diff -u <(tail -n +2 "$WORK/expected.toml") <(tail -n +2 "$WORK/from-file.toml") || fail "ferryd --config /etc/ferry/ferryd.toml --print-config differs from the packaged layout"
grep -c >/dev/null "^listen = \[ 'unix:/run/ferry/ferryd.sock' \]" "$WORK/from-file.toml" || fail "packaged config: socket is not /run/ferry/ferryd.sock"
grep -c >/dev/null "^path = '/var/lib/ferry/pools/default'" "$WORK/from-file.toml" || fail "packaged config: pool is not under /var/lib/ferry"
grep -c >/dev/null "^socket = '/run/ferry/ferryd-admin.sock'" "$WORK/from-file.toml" || fail "packaged config: admin socket"

if command -v systemd-analyze >/dev/null; then
  # verify checks that ExecStart= exists: point it at the unpacked binary.
  mkdir -p "$WORK/units"
  UNITS=$(dirname "$(find "$ROOT" -name ferryd.service | head -n 1)")
  cp "$UNITS"/ferryd.service "$UNITS"/ferryd.socket "$UNITS"/ferryd-tcp.socket "$WORK/units/"
  sed -i "s#/usr/sbin/ferryd#$FERRYD#" "$WORK/units/ferryd.service"
  (cd "$WORK/units" && systemd-analyze --man=no verify ./ferryd.service ./ferryd.socket ./ferryd-tcp.socket) ||
    fail "systemd-analyze verify"
  echo "systemd-analyze verify: ferryd.service ferryd.socket ferryd-tcp.socket pass"
fi

SOCK="$ROOT/run/ferry/ferryd.sock"
URI="ferry+unix://$SOCK"
mkdir -p "$ROOT/run/ferry" "$ROOT/var/lib/ferry"
"$FERRYD" --config "$ROOT/etc/ferry/ferryd.toml" --listen "unix:$SOCK" \
  --admin-socket "$ROOT/run/ferry/ferryd-admin.sock" --pool "default=$ROOT/var/lib/ferry/pools/default" \
  --unix-socket-group "$(id -gn)" --ready-file "$WORK/ready" >"$WORK/ferryd.log" 2>&1 &
FERRYD_PID=$!
for _ in $(seq 400); do [ -f "$WORK/ready" ] && break; kill -0 "$FERRYD_PID" 2>/dev/null || fail "ferryd exited"; sleep 0.05; done
[ -f "$WORK/ready" ] || fail "ferryd did not become ready"
grep -c >/dev/null "configuration: $ROOT/etc/ferry/ferryd.toml" "$WORK/ferryd.log" || fail "ferryd did not read the packaged configuration"
"$FERRY" -c "$URI" ping -n 3

IMAGE="$WORK/disk.raw"
truncate -s 1G "$IMAGE"
for i in 0 1 2 3; do
  dd if=/dev/urandom of="$IMAGE" bs=1M count=16 seek=$((i * 256 + 8)) conv=notrunc status=none
done
"$FERRY" -c "$URI" vol-create default/package-test.img 1G
"$FERRY" -c "$URI" --progress bar vol-upload default/package-test.img "$IMAGE" 2>"$WORK/up.progress"
"$FERRY" -c "$URI" --progress bar vol-download default/package-test.img "$WORK/copy.raw" 2>"$WORK/down.progress"
grep -c >/dev/null "%" "$WORK/up.progress" || { cat "$WORK/up.progress"; fail "no upload progress shown"; }
grep -c >/dev/null "%" "$WORK/down.progress" || { cat "$WORK/down.progress"; fail "no download progress shown"; }
want=$(sha256sum <"$IMAGE" | cut -d' ' -f1)
got=$(sha256sum <"$WORK/copy.raw" | cut -d' ' -f1)
echo "sha256 image $want, download $got"
[ "$want" = "$got" ] || fail "checksums differ"
[ -f "$ROOT/var/lib/ferry/pools/default/package-test.img" ] || fail "the volume is not in the packaged pool directory"
alloc=$(du -k "$WORK/copy.raw" | cut -f1)
[ "$alloc" -lt $((512 * 1024)) ] || fail "the download is not sparse ($alloc KiB allocated)"
"$FERRY" -c "$URI" vol-delete default/package-test.img
end=$(date +%s.%N)
awk -v n="$(ls "$WORK/debs"/*.deb | wc -l)" -v t0="$start" -v t1="$end" \
  'BEGIN { printf "time: dpkg -x of %d packages + main job (1 GiB image, 64 MiB data): %.2f s\n", n, t1 - t0 }'

step "programs built against the unpacked libferry-dev"
PCDIR=$(dirname "$(find "$ROOT" -name ferry.pc | head -n 1)")
# shellcheck disable=SC2046
c++ -O1 -o "$WORK/consumer-pc" "$SRC/tests/package/consumer/consumer.cc" \
  $(PKG_CONFIG_PATH="$PCDIR" pkg-config --cflags --libs ferry) || fail "building with pkg-config ferry"
"$WORK/consumer-pc" "$URI" pkgconfig-consumer | tee "$WORK/consumer-pc.out"
grep -c >/dev/null "uploaded 65536 bytes" "$WORK/consumer-pc.out" || fail "the pkg-config program did not upload"
cmake -S "$SRC/tests/package/consumer" -B "$WORK/consumer-build" -G Ninja -DCMAKE_PREFIX_PATH="$ROOT/usr" \
  -DCMAKE_BUILD_TYPE=Release >"$WORK/consumer-cmake.log" 2>&1 || { cat "$WORK/consumer-cmake.log"; fail "find_package(ferry)"; }
ninja -C "$WORK/consumer-build" >"$WORK/consumer-ninja.log" 2>&1 || { cat "$WORK/consumer-ninja.log"; fail "building with find_package(ferry)"; }
"$WORK/consumer-build/consumer" "$URI" cmake-consumer | grep "uploaded 65536 bytes" || fail "the find_package program did not upload"
ldd "$WORK/consumer-build/consumer_c" | grep -c >/dev/null "libferry.so.0 => $LIBDIR/libferry.so.0" || fail "consumer_c does not use the unpacked libferry.so.0"
"$WORK/consumer-build/consumer_c" "$URI" | grep "pool default (C API)" || fail "the C API program failed"

if [ -n "$(deb python3-ferry)" ]; then
  step "the unpacked python3-ferry against the daemon"
  # Only the unpacked tree on the path: the build tree's module must not be the one imported.
  PYDIR="$ROOT/usr/lib/python3/dist-packages"
  env -u PYTHONPATH PYTHONPATH="$PYDIR" /usr/bin/python3 - "$URI" "$PYDIR" <<'EOF' || fail "the unpacked Python package"
import hashlib, os, sys
uri, pydir = sys.argv[1], sys.argv[2]
import ferry
assert os.path.realpath(ferry.__file__).startswith(os.path.realpath(pydir)), ferry.__file__
data = os.urandom(1 << 20)
with ferry.connect(uri) as s:
    s.vol_create("default", "python-package.img", 4 << 20)
    with s.open_upload("default", "python-package.img") as up:
        up.write(data)
        up.write_hole(3 << 20)
    got = bytearray()
    with s.open_download("default", "python-package.img") as down:
        for kind, piece in down:
            got += piece if kind == "data" else bytes(piece)  # a hole: that many zeros
    assert hashlib.sha256(got).digest() == hashlib.sha256(data + bytes(3 << 20)).digest(), "round trip differs"
    s.vol_delete("default", "python-package.img")
    try:
        s.vol_info("default", "python-package.img")
        raise SystemExit("vol_info of a deleted volume succeeded")
    except ferry.Error as e:
        assert e.code_name == "NOT_FOUND", e
print("python3-ferry: upload + download round trip through the unpacked module")
EOF
fi

kill -TERM "$FERRYD_PID"
wait "$FERRYD_PID" || fail "ferryd did not stop cleanly"
FERRYD_PID=""
echo "package test: all checks passed"
