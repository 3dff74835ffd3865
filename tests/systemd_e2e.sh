#!/usr/bin/env bash
# tests/systemd_e2e.sh — kvstore under a real systemd, end to end.
#
# Boots a throwaway systemd (../shared/systemd-sandbox.sh: systemd-nspawn on a RAM overlay of this
# machine's root, sharing its network), installs kvstore into it with the project's own
# `make install`, and walks through the original scenario with systemctl, journalctl and kvctl
# only: start 3 nodes, put b, stop node 1 (graceful hand-off), read b, peer_down in the
# journal, wipe node 1 and start it (recover_done), kill -9 node 0 (systemd restarts it), then
# kvnode.target, a bad instance, the hardening score, and `make uninstall`.
#
#   bash tests/systemd_e2e.sh        needs root, cgroups, overlayfs; ports 5000-5002 free
#
# Environment (all optional):
#   KVNODE_BIN, KVCTL_BIN   binaries to install (default: cargo build --release --bins)
#   KV_E2E_B_SHARD          shard of key b, and a key led by node 1 and its shard, to measure
#   KV_E2E_NODE1_KEY          how long reads pause while node 1 hands its leaderships off
#   KV_E2E_NODE1_SHARD        (tests/systemd.rs computes them from kvstore::placement)
#   KV_E2E_LOCK_WAIT        seconds to wait for another run of this script (default 600)
#
# Every wait is bounded; the sandbox is always torn down (trap), whatever happens.
#
# shellcheck disable=SC2015,SC2016
# (`check && check || fail` is meant; single-quoted scripts run inside the sandbox.)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null || (cd "$HERE/.." && pwd))
S=${SYSTEMD_SANDBOX:-$TOP/../shared/systemd-sandbox.sh}
PORTS="5000 5001 5002"                 # the sample etc/kvnode/cluster.toml
LOCK=${KV_E2E_LOCK:-/tmp/kvstore-systemd-e2e.lock}
# `kvctl` with no flags must find its endpoints in /etc/kvnode/cluster.toml (commands run inside
# the sandbox inherit this environment).
unset KV_ENDPOINTS
SRC=/usr/src/kvstore                   # where the install inputs are staged inside the sandbox

T0=$(date +%s%N)
ms() { echo $((($(date +%s%N) - $1) / 1000000)); }
step() { printf '\n=== [%5.1fs] %s\n' "$(($(ms "$T0") / 100))e-1" "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
# Runs a command inside the sandbox, echoing it as an operator would type it.
# (The echo goes to stderr, so `v=$(sx kvctl get b)` captures the answer only.)
sx() { echo "# $*" >&2; "$S" exec "$@"; }
# Inside the sandbox, quietly.
q() { "$S" exec "$@"; }
# wait_until SECONDS WHAT CMD…: polls CMD every 0.2 s.
wait_until() {
  local secs=$1 what=$2; shift 2
  local deadline=$(($(date +%s) + secs))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "timed out after ${secs}s waiting for: $what"
    sleep 0.2
  done
}
# expect VALUE CMD…: runs CMD inside (echoed), prints its output, which must be VALUE.
expect() {
  local want=$1 got; shift
  got=$(sx "$@") || fail "$* failed"
  echo "$got"
  [ "$got" = "$want" ] || fail "$*: expected '$want', got '$got'"
}
prop() { q systemctl show -p "$2" --value "$1"; }
# A point in time for `journalctl --since` (the sandbox shares this machine's clock). Not
# --after-cursor: combined with field matches, journalctl 252 skips entries after a cursor.
now_mark() { echo "@$(date +%s.%N)"; }

[ "$(id -u)" = 0 ] || fail "needs root (it boots systemd-nspawn)"
[ -x "$S" ] || fail "sandbox script not found at $S"

# One run at a time on this machine: the sandbox and the ports are singletons.
exec 9>"$LOCK"
if ! flock -n 9; then
  echo "waiting for another run of this test (lock $LOCK)…"
  flock -w "${KV_E2E_LOCK_WAIT:-600}" 9 || fail "another run still holds $LOCK"
fi

SD=${SANDBOX_DIR:-/tmp/kv-systemd-sandbox}
# We hold the lock, so a sandbox still up is a leftover of a killed run: its nodes would hold
# the ports. Take it down first.
if [ -f "$SD/leader" ]; then
  echo "taking down a sandbox left by an earlier run"
  timeout 60 "$S" down >/dev/null 2>&1 || true
fi

port_busy() {
  if command -v ss >/dev/null; then
    [ -n "$(ss -Hltn "sport = :$1")" ]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}
step "0. ports $PORTS must be free (the sample config's node addresses)"
deadline=$(($(date +%s) + 15))
for p in $PORTS; do
  while port_busy "$p"; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      ss -ltnp 2>/dev/null | grep -E ":($(echo "$PORTS" | tr ' ' '|'))\b" >&2 || true
      fail "port $p is in use (above: who listens). This test runs the sample config's nodes on 127.0.0.1:5000-5002; stop whatever uses them (e.g. a 'kvctl demo') and run it again."
    fi
    sleep 0.2
  done
done
echo "free"

if [ -z "${KVNODE_BIN:-}" ] || [ -z "${KVCTL_BIN:-}" ]; then
  step "build: cargo build --release --bins"
  (cd "$TOP" && cargo build --release --bins)
  KVNODE_BIN=${CARGO_TARGET_DIR:-$TOP/target}/release/kvnode
  KVCTL_BIN=${CARGO_TARGET_DIR:-$TOP/target}/release/kvctl
fi
[ -x "$KVNODE_BIN" ] && [ -x "$KVCTL_BIN" ] || fail "binaries not found: $KVNODE_BIN $KVCTL_BIN"

READER_PID=
cleanup() {
  local rc=$?
  set +e
  [ -n "$READER_PID" ] && kill "$READER_PID" 2>/dev/null && wait "$READER_PID" 2>/dev/null
  if [ "$rc" -ne 0 ] && [ -f "$SD/leader" ]; then
    local j=${KV_E2E_JOURNAL:-$TOP/target/systemd-e2e-journal.txt}
    mkdir -p "$(dirname "$j")" && timeout 20 "$S" journal "$j" && echo "journal of the failed run: $j" >&2
  fi
  timeout 60 "$S" down >/dev/null 2>&1 || echo "warning: sandbox down failed" >&2
  rm -f "${MEASURE:-}"
  [ "$rc" -eq 0 ] && echo "PASS (${SECONDS}s)" || echo "FAILED (exit $rc)" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "1. boot a throwaway systemd"
timeout 300 "$S" up
ROOT=$("$S" root)

step "2. install with the project's own command: make install (inside the sandbox)"
# A fresh machine: nothing of a previous kvstore (the overlay hides the host's files, if any).
q rm -rf /etc/kvnode /var/lib/kvnode /var/lib/private/kvnode "$SRC"
mkdir -p "$ROOT$SRC/bin"
cp -r "$TOP/Makefile" "$TOP/systemd" "$TOP/etc" "$ROOT$SRC/"
install -m 755 "$KVNODE_BIN" "$ROOT$SRC/bin/kvnode"
install -m 755 "$KVCTL_BIN" "$ROOT$SRC/bin/kvctl"
sx make -C "$SRC" install NODES="0 1 2" KVNODE_BIN=bin/kvnode KVCTL_BIN=bin/kvctl
q test -x /usr/local/bin/kvnode -a -x /usr/local/bin/kvctl -a -f /etc/systemd/system/kvnode@.service \
  || fail "make install did not install the binaries and the unit"
q systemctl cat kvnode@0.service >/dev/null || fail "systemd does not see kvnode@.service (no daemon-reload?)"
# A second install must keep an edited config.
q sh -c 'echo "# e2e: edited by the operator" >> /etc/kvnode/cluster.toml'
q make -s -C "$SRC" install KVNODE_BIN=bin/kvnode KVCTL_BIN=bin/kvctl | grep -F "kept the existing"
q grep -q "edited by the operator" /etc/kvnode/cluster.toml || fail "make install overwrote /etc/kvnode/cluster.toml"

step "3. systemd-analyze verify (must print nothing)"
out=$(q systemd-analyze verify /etc/systemd/system/kvnode@.service kvnode@0.service /etc/systemd/system/kvnode.target 2>&1) \
  || fail "systemd-analyze verify failed: $out"
[ -z "$out" ] || fail "systemd-analyze verify printed: $out"
echo "(nothing)"

step "4. systemd-analyze security --offline=yes (exposure must be <= 2.0)"
sec=$(q systemd-analyze security --offline=yes /etc/systemd/system/kvnode@.service 2>&1 || true)
echo "$sec" | grep -E "^✗|Overall" || true
score=$(echo "$sec" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
[ -n "$score" ] || fail "no exposure score in: $sec"
awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || fail "exposure $score > 2.0"
echo "exposure score: $score"

step "5. systemctl start kvnode@0 kvnode@1 kvnode@2"
t=$(date +%s%N)
sx timeout 60 systemctl start kvnode@0 kvnode@1 kvnode@2 || fail "systemctl start failed or took over 60 s"
START_MS=$(ms "$t")
START2_AT=$(date +%s); INV2=$(prop kvnode@2 InvocationID)
for n in 0 1 2; do [ "$(prop "kvnode@$n" ActiveState)" = active ] || fail "kvnode@$n is not active"; done
sx systemctl list-units --no-pager --no-legend 'kvnode@*'
echo "systemctl start returned after ${START_MS} ms (Type=notify: every node serves)"

step "6. kvctl put b nguyet (no flags: endpoints from /etc/kvnode/cluster.toml)"
sx kvctl put b nguyet
expect nguyet kvctl get b
if [ -n "${KV_E2E_NODE1_KEY:-}" ]; then q kvctl put "$KV_E2E_NODE1_KEY" v1; fi
status=$(q kvctl status)
leader_of() { echo "$status" | awk -v s="$1" 'f && $1 == s { print $3 } /^SHARD/ { f = 1 }'; }
B_LEADER=; K_LEADER=
[ -n "${KV_E2E_B_SHARD:-}" ] && B_LEADER=$(leader_of "$KV_E2E_B_SHARD")
[ -n "${KV_E2E_NODE1_SHARD:-}" ] && K_LEADER=$(leader_of "$KV_E2E_NODE1_SHARD")
echo "b: shard ${KV_E2E_B_SHARD:-?}, leader ${B_LEADER:-?}; ${KV_E2E_NODE1_KEY:-(no node-1 key given)}: shard ${KV_E2E_NODE1_SHARD:-?}, leader ${K_LEADER:-?}"

step "7. systemctl stop kvnode@1 (hands its leaderships to peers, exits 0), reads going on"
MEASURE=$(mktemp)
# A reader inside the sandbox: one `kvctl get` after another, timed, for at most 30 s.
"$S" exec bash -c '
  end=$((SECONDS + 30))
  while [ ! -e /run/kv-e2e-stop-reader ] && [ $SECONDS -lt $end ]; do
    for k in b $0; do
      [ "$k" = - ] && continue
      s=$(date +%s%N); kvctl get "$k" >/dev/null 2>&1; rc=$?; e=$(date +%s%N)
      echo "$k $s $e $rc"
    done
  done' "${KV_E2E_NODE1_KEY:--}" >"$MEASURE" 2>/dev/null &
READER_PID=$!
sleep 1
C=$(now_mark)
STOP_T0=$(date +%s%N)
sx timeout 60 systemctl stop kvnode@1 || fail "systemctl stop kvnode@1 failed or took over 60 s"
STOP_T1=$(date +%s%N)
STOP_MS=$(ms "$STOP_T0")
sleep 1
q touch /run/kv-e2e-stop-reader
wait "$READER_PID" || true
READER_PID=
sx systemctl show -p Result -p ExecMainStatus -p ActiveState kvnode@1
[ "$(prop kvnode@1 Result)" = success ] || fail "kvnode@1 did not stop cleanly (Result=$(prop kvnode@1 Result))"
[ "$(prop kvnode@1 ExecMainStatus)" = 0 ] || fail "kvnode@1 exit status $(prop kvnode@1 ExecMainStatus)"
sx journalctl --no-pager -u kvnode@1 --since="$C" -o cat
echo "systemctl stop took ${STOP_MS} ms"
# Reads that overlapped the stop: the slowest, and failures.
report_reads() {
  awk -v k="$1" -v a="$STOP_T0" -v b="$STOP_T1" '
    $1 == k { n++; d = ($3 - $2) / 1e6; if ($4 != 0) bad++
              if ($3 >= a && $2 <= b) { m++; if (d > max) max = d } else if (d > omax) omax = d }
    END { printf "reads of %s: %d in all, %d failed; during the stop: %d, slowest %.0f ms; otherwise slowest %.0f ms\n",
                 k, n, bad + 0, m + 0, max, omax }' "$MEASURE"
}
report_reads b
[ -n "${KV_E2E_NODE1_KEY:-}" ] && report_reads "$KV_E2E_NODE1_KEY"
awk '$4 != 0 { bad = 1 } END { exit bad }' "$MEASURE" || fail "a read failed while kvnode@1 stopped"
expect nguyet kvctl get b

step "8. the peers' journals: KV_EVENT=peer_down (warning, priority 4)"
wait_until 30 "peer_down in kvnode@0's journal" \
  "$S" exec sh -c "journalctl --sync; journalctl -q --no-pager -u kvnode@0 --since='$C' KV_EVENT=peer_down KV_PEER=1 | grep ."
sx journalctl --no-pager -u kvnode@0 KV_EVENT=peer_down
sx journalctl --no-pager -u 'kvnode@*' KV_EVENT=peer_down
sx journalctl --no-pager -u kvnode@0 KV_EVENT=peer_down -o verbose --output-fields=KV_EVENT,KV_NODE,KV_PEER,PRIORITY,MESSAGE
[ -n "$(q journalctl -q --no-pager -u kvnode@0 --since="$C" KV_EVENT=peer_down PRIORITY=4)" ] \
  || fail "peer_down is not at priority 4 (warning)"
[ -n "$(q journalctl -q --no-pager -u kvnode@0 --since="$C" -p warning KV_EVENT=peer_down)" ] \
  || fail "journalctl -p warning does not show peer_down"

step "9. wipe node 1's data and start it: it recovers from its peers"
DIR=$(q readlink -f /var/lib/kvnode/1)
echo "/var/lib/kvnode/1 -> $DIR"
q test -f "$DIR/IDENTITY" || fail "no IDENTITY in $DIR: is that node 1's data dir?"
sx rm -rf "$DIR"
C=$(now_mark)
t=$(date +%s%N)
sx timeout 60 systemctl start kvnode@1 || fail "systemctl start kvnode@1 failed or took over 60 s"
echo "systemctl start kvnode@1 (recovering) returned after $(ms "$t") ms"
wait_until 30 "recover_done in kvnode@1's journal" \
  "$S" exec sh -c "journalctl --sync; journalctl -q --no-pager -u kvnode@1 --since='$C' KV_EVENT=recover_done | grep ."
sx journalctl --no-pager -u kvnode@1 --since="$C" KV_EVENT=recover_done
[ -n "$(q journalctl -q --no-pager -u kvnode@1 --since="$C" KV_EVENT=recover_done PRIORITY=6)" ] \
  || fail "recover_done is not at priority 6 (info)"
wait_until 30 "node 1 serving b from its own replica" \
  "$S" exec sh -c 'test "$(kvctl --endpoints 127.0.0.1:5001 get --stale b)" = nguyet'
expect nguyet kvctl --endpoints 127.0.0.1:5001 get --stale b

step "10. systemctl kill -s KILL kvnode@0: systemd restarts it (Restart=on-failure)"
R0=$(prop kvnode@0 NRestarts); P0=$(prop kvnode@0 MainPID)
t=$(date +%s%N)
sx systemctl kill -s KILL kvnode@0
restarted() { [ "$(prop kvnode@0 NRestarts)" -gt "$R0" ] && [ "$(prop kvnode@0 ActiveState)" = active ]; }
wait_until 30 "kvnode@0 restarted and active" restarted
echo "active again after $(ms "$t") ms"
sx systemctl show -p NRestarts -p MainPID -p ActiveState -p Result kvnode@0
[ "$(prop kvnode@0 MainPID)" != "$P0" ] || fail "kvnode@0 has the same pid"
expect nguyet kvctl get b
wait_until 30 "node 0 serving b from its own replica" \
  "$S" exec sh -c 'test "$(kvctl --endpoints 127.0.0.1:5000 get --stale b)" = nguyet'
sx journalctl --no-pager -u kvnode@0 -n 200 -o cat | grep -E "Main process exited|Scheduled restart|Started" || true

step "11. watchdog: WatchdogSec is set and a node outlives it without a restart"
wd=$(prop kvnode@2 WatchdogUSec)
echo "WatchdogUSec=$wd"
case "$wd" in [1-9]*s) ;; *) fail "kvnode@2 has no watchdog in whole seconds (WatchdogUSec=$wd)";; esac
# kvnode@2 has run since step 5; if its pings did not arrive, systemd would have killed it after
# WatchdogSec and started a new invocation.
outlived() { [ $(($(date +%s) - START2_AT)) -gt $((${wd%s} + 1)) ]; }
wait_until $((${wd%s} + 5)) "kvnode@2 running longer than WatchdogSec" outlived
[ "$(prop kvnode@2 InvocationID)" = "$INV2" ] && [ "$(prop kvnode@2 NRestarts)" = 0 ] \
  && [ "$(prop kvnode@2 ActiveState)" = active ] || fail "kvnode@2 was restarted: watchdog pings missing?"
echo "kvnode@2: same invocation for $(($(date +%s) - START2_AT)) s > WatchdogSec=$wd, NRestarts=0"

step "12. a bad instance fails at once and is not restarted (exit 2, RestartPreventExitStatus)"
C=$(now_mark)
if sx timeout 30 systemctl start kvnode@7; then fail "kvnode@7 (not in the config) started"; fi
sx systemctl show -p Result -p ExecMainStatus -p NRestarts kvnode@7
[ "$(prop kvnode@7 ExecMainStatus)" = 2 ] && [ "$(prop kvnode@7 NRestarts)" = 0 ] \
  || fail "kvnode@7: expected exit 2 and no restart"
wait_until 10 "kvnode@7's reason in the journal at priority err" \
  "$S" exec sh -c "journalctl --sync; journalctl -q --no-pager -u kvnode@7 --since='$C' -p err | grep -F kvnode:"
sx journalctl --no-pager -u kvnode@7 --since="$C" -p err
q systemctl reset-failed kvnode@7

step "13. kvnode.target: stop and start every node of this machine"
sx timeout 60 systemctl stop kvnode.target
# The target is ordered after its nodes, so it stops first and systemctl returns while they
# still hand off; wait for them.
stopped() { for n in 0 1 2; do [ "$(prop "kvnode@$n" ActiveState)" = inactive ] || return 1; done; }
wait_until 30 "every kvnode@ inactive" stopped
for n in 0 1 2; do
  [ "$(prop "kvnode@$n" ActiveState)" = inactive ] && [ "$(prop "kvnode@$n" Result)" = success ] \
    || fail "kvnode@$n after stopping kvnode.target: $(prop "kvnode@$n" ActiveState) $(prop "kvnode@$n" Result)"
done
sx timeout 60 systemctl start kvnode.target
for n in 0 1 2; do [ "$(prop "kvnode@$n" ActiveState)" = active ] || fail "kvnode@$n did not start with kvnode.target"; done
sx systemctl list-dependencies --no-pager kvnode.target
expect nguyet kvctl get b

step "14. make uninstall: stops the nodes, removes binaries and units, keeps config and data"
sx make -C "$SRC" uninstall
q test ! -e /usr/local/bin/kvnode -a ! -e /usr/local/bin/kvctl -a ! -e /etc/systemd/system/kvnode@.service \
  -a ! -e /etc/systemd/system/kvnode.target || fail "make uninstall left files behind"
q test -f /etc/kvnode/cluster.toml -a -f /var/lib/private/kvnode/0/IDENTITY || fail "make uninstall removed config or data"
for n in 0 1 2; do [ "$(prop "kvnode@$n" ActiveState)" = inactive ] || fail "kvnode@$n still running"; done

step "figures"
echo "exposure score (systemd-analyze security --offline=yes): $score"
echo "systemctl start kvnode@0 kvnode@1 kvnode@2: ${START_MS} ms"
echo "systemctl stop kvnode@1: ${STOP_MS} ms"
report_reads b
[ -n "${KV_E2E_NODE1_KEY:-}" ] && report_reads "$KV_E2E_NODE1_KEY"
true
