#!/usr/bin/env bash
# ferryd under systemd socket activation (docs/configuration.md, "Socket
# activation"), with systemd-socket-activate standing in for systemd: it
# binds the sockets, waits for the first client, then runs ferryd with
# LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES.
#   socket_activation_test.sh FERRYD FERRY
# Checks: clients reach ferryd over the handed-over unix, tcp and nbd sockets;
# ferryd binds none of its configured addresses; a socket with an unknown
# name, of the wrong family or of the wrong type stops ferryd (status 2)
# with a message naming the socket.
set -euo pipefail
FERRYD=$1
FERRY=$2
PY=/usr/bin/python3
if ! command -v systemd-socket-activate >/dev/null; then
  echo "systemd-socket-activate is not installed (package systemd)"
  exit 77
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ferry-socket-activation.XXXXXX")
PID=""
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; for l in "$WORK"/*.log; do echo "--- $l" >&2; tail -n 15 "$l" >&2; done; exit 1; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Wakes systemd-socket-activate, which starts ferryd on the first client.
poke() {  # poke unix:PATH | tcp:PORT | dgram:PATH
  "$PY" - "$1" <<'PYEOF'
import socket, sys
kind, _, where = sys.argv[1].partition(":")
try:
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(where)
    elif kind == "tcp":
        s = socket.create_connection(("127.0.0.1", int(where)))
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b"x", where)
    s.close()
except OSError:
    pass
PYEOF
}
RC=""
wait_exit() {  # wait_exit PID: its exit status in RC (not in a subshell: it must be our child)
  for _ in $(seq 400); do kill -0 "$1" 2>/dev/null || break; sleep 0.05; done
  RC=0
  wait "$1" || RC=$?
}
COMMON=(--pool "default=$WORK/pool" --admin-socket "$WORK/admin.sock" --log-level info)

echo "== unix, tcp and nbd handed over (--fdname=unix:tcp:nbd)"
PORT=$(free_port)
systemd-socket-activate -l "$WORK/activated.sock" -l "127.0.0.1:$PORT" -l "$WORK/nbd.sock" --fdname=unix:tcp:nbd \
  "$FERRYD" --listen "unix:$WORK/own.sock" --listen "tcp:127.0.0.1:0" --nbd-listen "unix:$WORK/own-nbd.sock" \
  --auth-tcp none "${COMMON[@]}" \
  --ready-file "$WORK/ready" >"$WORK/good.log" 2>&1 &
PID=$!
for _ in $(seq 100); do [ -S "$WORK/activated.sock" ] && break; sleep 0.05; done
"$FERRY" -c "ferry+unix://$WORK/activated.sock" ping -n 2 || fail "ping over the handed-over unix socket"
"$FERRY" -c "ferry+tcp://127.0.0.1:$PORT" ping -n 2 || fail "ping over the handed-over tcp socket"
"$FERRY" -c "ferry+tcp://127.0.0.1:$PORT" vol-create default/activated.img 1M || fail "vol-create over tcp"
"$FERRY" -c "ferry+unix://$WORK/activated.sock" vol-info default/activated.img || fail "vol-info over unix"
if command -v nbdinfo >/dev/null; then
  nbdinfo --size "nbd+unix:///default/activated.img?socket=$WORK/nbd.sock" | grep -qx 1048576 ||
    fail "plain NBD over the handed-over nbd socket"
fi
for _ in $(seq 100); do [ -f "$WORK/ready" ] && break; sleep 0.05; done
printf 'unix:%s\ntcp:127.0.0.1:%s\nnbd-unix:%s\n' "$WORK/activated.sock" "$PORT" "$WORK/nbd.sock" | diff - "$WORK/ready" ||
  fail "the ready file does not list exactly the three handed-over sockets"
[ ! -e "$WORK/own.sock" ] || fail "ferryd bound its configured unix socket although systemd passed sockets"
[ ! -e "$WORK/own-nbd.sock" ] || fail "ferryd bound its configured NBD socket although systemd passed one"
grep -q "socket activation: systemd passed 3 socket(s) (3=unix, 4=tcp, 5=nbd); daemon.listen is not bound; nbd.listen is not bound" "$WORK/good.log" ||
  fail "ferryd did not log the handed-over sockets"
[ "$(grep "listening on\|listening for plain NBD on" "$WORK/good.log" | grep -vc "socket handed over")" = 0 ] ||
  fail "ferryd listened on an address of its own"
[ "$(grep -c "listening on .*socket handed over" "$WORK/good.log")" = 2 ] || fail "ferryd did not serve both sockets"
[ -S "$WORK/admin.sock" ] || fail "no admin socket"
kill -TERM "$PID"
wait_exit "$PID"
[ "$RC" = 0 ] || fail "ferryd did not stop cleanly (status $RC)"
PID=""
[ -S "$WORK/activated.sock" ] || fail "ferryd removed the socket it was handed (it belongs to systemd)"
[ "$(grep -c "listening for plain NBD on .*socket handed over" "$WORK/good.log")" = 1 ] || fail "ferryd did not serve the nbd socket"
echo "ok: all three sockets served, no own listeners, handed-over socket left in place"

expect_refusal() {  # expect_refusal NAME MESSAGE POKE systemd-socket-activate-args...
  local name=$1 message=$2 target=$3
  shift 3
  systemd-socket-activate "$@" "$FERRYD" --listen "unix:$WORK/own-$name.sock" "${COMMON[@]}" >"$WORK/$name.log" 2>&1 &
  PID=$!
  if [ "${target%%:*}" = tcp ]; then
    sleep 0.3
  else
    for _ in $(seq 100); do [ -e "${target#*:}" ] && break; sleep 0.05; done
  fi
  poke "$target"
  wait_exit "$PID"
  PID=""
  [ "$RC" = 2 ] || fail "$name: ferryd exited with $RC, expected 2"
  grep -qF "$message" "$WORK/$name.log" || fail "$name: no message '$message'"
  [ ! -e "$WORK/own-$name.sock" ] || fail "$name: ferryd bound its own socket"
  echo "ok: $name -> $(grep -F "$message" "$WORK/$name.log")"
}

expect_refusal bad-name "socket 3 (named 'bogus'): unknown name; ferryd serves sockets named unix, tcp, tls and nbd" \
  "unix:$WORK/bad-name.sock" -l "$WORK/bad-name.sock" --fdname=bogus
PORT=$(free_port)
expect_refusal wrong-family "socket 3 (named 'unix') is an AF_INET socket; 'unix' needs an AF_UNIX one" \
  "tcp:$PORT" -l "127.0.0.1:$PORT" --fdname=unix
expect_refusal wrong-type "socket 3 (named 'unix'): descriptor 3 is not a stream socket: its type is SOCK_DGRAM" \
  "dgram:$WORK/wrong-type.sock" --datagram -l "$WORK/wrong-type.sock" --fdname=unix
echo "socket activation test: all checks passed"
