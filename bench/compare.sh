#!/usr/bin/env bash
# kvstore vs etcd on this machine, in one run, measured by the same tool the same way.
#
# Starts a 3-node kvstore cluster on loopback (release build, ports $PORT..$PORT+2, data under a
# temp dir, fsync on as shipped) and a 3-member etcd (shared/bench/etcd3.sh, fsync on as
# shipped), then runs the same `kvctl bench` workloads against each, alternating targets run by
# run so both see the same machine. Prints one side-by-side table with kvstore/etcd ratios, the
# nodes' peak RSS under load, their idle CPU, and the disk's synchronous-write latency on
# either side of the single-client runs. Stops everything on exit.
#
# usage: bench/compare.sh            (about 8-10 minutes at the defaults)
#        DURATION=5 WARMUP=1 bench/compare.sh
#
# Settings (environment):
#   DURATION=10        seconds measured per run
#   WARMUP=2           seconds of load before measuring
#   CLIENTS=64         clients of the concurrent runs
#   KEYS=10000         key space of most runs
#   BIG_KEYS=1000000   key space of the large-data runs; the first preloads it, and it is lowered
#                      (to a multiple of 50,000) when preloading it would take more than
#                      PRELOAD_BUDGET seconds for either target at the rate measured while
#                      preloading KEYS
#   PRELOAD_BUDGET=240 seconds (on 2026-12-07 etcd preloaded 1M keys in 155-166 s, kvstore in 65-75)
#   IDLE=10            seconds over which idle CPU is measured
#   ROUNDS=1           runs of each workload per target (alternating targets); with more than
#                      one, each figure is that of the median run by ops/s (the lower middle one
#                      for an even count), and every run's ops/s is printed as it finishes
#   PORT=7100          first kvstore port (never 5000-5002, used by the systemd tests)
#   OUT=target/bench-compare/<time>   where the JSON results and logs are kept
#   SKIP_BUILD=1       use the existing target/release binaries
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CLIENTS=${CLIENTS:-64}
KEYS=${KEYS:-10000}
BIG_KEYS=${BIG_KEYS:-1000000}
PRELOAD_BUDGET=${PRELOAD_BUDGET:-240}
IDLE=${IDLE:-10}
ROUNDS=${ROUNDS:-1}
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: ROUNDS must be a positive integer, not '$ROUNDS'" >&2; exit 2; }
PORT=${PORT:-7100}
OUT=${OUT:-$ROOT/target/bench-compare/$(date +%Y%m%d-%H%M%S)}
ETCD3=${ETCD3:-$ROOT/../shared/bench/etcd3.sh}
KVCTL=$ROOT/target/release/kvctl
KVNODE=$ROOT/target/release/kvnode

die() { echo "compare.sh: $*" >&2; exit 2; }
say() { echo "== $*" >&2; }

# ---- prerequisites -------------------------------------------------------------------------
[ -x "$ETCD3" ] || [ -f "$ETCD3" ] || die "cannot find etcd3.sh at $ETCD3 (set ETCD3=)"
missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
command -v etcdctl >/dev/null || missing+=(etcd-client)
command -v jq >/dev/null || missing+=(jq)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "need ${missing[*]}: apt-get install -y ${missing[*]}"
  say "installing ${missing[*]}"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ -z "${SKIP_BUILD:-}" ]; then
  say "cargo build --release"
  cargo build --release --quiet
fi
[ -x "$KVCTL" ] && [ -x "$KVNODE" ] || die "no release binaries in target/release"

mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/kvbench.XXXXXX)
export ETCD_DIR=$TMP/etcd
KV_PIDS=()
KV_EP="127.0.0.1:$PORT,127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2))"
ETCD_EP="127.0.0.1:12379,127.0.0.1:22379,127.0.0.1:32379"
T0=$(date +%s)

cleanup() {
  set +e
  for p in "${KV_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${KV_PIDS[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  bash "$ETCD3" stop >/dev/null 2>&1
  for f in "$ETCD_DIR"/e*.pid; do [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null; done
  cp "$TMP"/node*.log "$OUT"/ 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for p in $PORT $((PORT + 1)) $((PORT + 2)) 12379 22379 32379; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then die "port $p is already in use"; fi
done

# ---- start kvstore ---------------------------------------------------------------------------
say "starting kvstore on $KV_EP (data in $TMP)"
{
  for i in 0 1 2; do printf '[[nodes]]\nid = %d\naddr = "127.0.0.1:%d"\n\n' "$i" $((PORT + i)); done
} >"$TMP/cluster.toml"
for i in 0 1 2; do
  "$KVNODE" --id "$i" --config "$TMP/cluster.toml" --data-dir "$TMP/node$i" >"$TMP/node$i.log" 2>&1 &
  KV_PIDS+=($!)
done
ready=
for _ in $(seq 150); do
  if s=$("$KVCTL" --endpoints "$KV_EP" --timeout-ms 1000 status 2>/dev/null) &&
    ! grep -qw down <<<"$s" &&
    awk '/^SHARD/{t=1;next} t&&NF{n++; if($3=="none")bad=1} END{exit !(n>0&&!bad)}' <<<"$s"; then
    ready=1; break
  fi
  sleep 0.2
done
[ -n "$ready" ] || die "kvstore cluster not ready after 30 s; logs in $OUT"

# ---- start etcd ------------------------------------------------------------------------------
say "starting etcd $(etcd --version 2>/dev/null | head -1 | awk '{print $3}') on $ETCD_EP"
bash "$ETCD3" start || die "etcd did not start"
ETCD_PIDS=()
for i in 0 1 2; do ETCD_PIDS+=("$(cat "$ETCD_DIR/e$i.pid")"); done
ALL_NODE_PIDS=("${KV_PIDS[@]}" "${ETCD_PIDS[@]}")
sleep 2 # leader balancing on kvstore, first elections on etcd

# ---- helpers ---------------------------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # utime+stime of a pid, in clock ticks (fields after the "(comm)" field)
  sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}
rss_kb() { awk '/^VmRSS/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

machine_ticks() { # busy and total jiffies of all CPUs, from /proc/stat
  awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat
}
sum_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(cpu_ticks "$p" 2>/dev/null || echo 0))); done; echo $t; }

# watch_run OUT BENCH_PID NODE_PIDS...: while the bench runs, the nodes' peak RSS (KiB, one line per
# node, to OUT.rss) and the bench client's CPU ticks (to OUT.client).
watch_run() {
  local out=$1 bp=$2; shift 2
  local -A max=()
  local bt=0 t p r
  while [ -d "/proc/$bp" ] && [ "$(sed 's/^.*) //' "/proc/$bp/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]; do
    for p in "$@"; do
      r=$(rss_kb "$p"); [ "${r:-0}" -gt "${max[$p]:-0}" ] && max[$p]=$r
    done
    t=$(cpu_ticks "$bp" 2>/dev/null) && bt=$t
    sleep 0.5
  done
  for p in "$@"; do echo "${max[$p]:-0}"; done >"$out.rss"
  echo "$bt" >"$out.client"
}

# bench NAME TARGET ARGS...: one run; JSON in $OUT/NAME.TARGET.json, progress in .log, CPU
# shares of the machine during the run in .cpu (target's nodes, bench client, everything else).
bench() {
  local name=$1 target=$2; shift 2
  local ep=$KV_EP pids=("${KV_PIDS[@]}")
  [ "$target" = etcd ] && ep=$ETCD_EP && pids=("${ETCD_PIDS[@]}")
  local f=$OUT/$name.$target m0 m1 n0 n1 o0 o1 kp w rc=0
  read -r -a m0 < <(machine_ticks)
  n0=$(sum_ticks "${pids[@]}"); o0=$(sum_ticks "${ALL_NODE_PIDS[@]}")
  "$KVCTL" --endpoints "$ep" bench --target "$target" --output json "$@" >"$f.json" 2>"$f.log" &
  kp=$!
  watch_run "$f" "$kp" "${pids[@]}" &
  w=$!
  wait "$kp" || rc=$?
  wait "$w" || true
  read -r -a m1 < <(machine_ticks)
  n1=$(sum_ticks "${pids[@]}"); o1=$(sum_ticks "${ALL_NODE_PIDS[@]}")
  awk -v busy=$((m1[0] - m0[0])) -v tot=$((m1[1] - m0[1])) -v nodes=$((n1 - n0)) \
    -v allnodes=$((o1 - o0)) -v client="$(cat "$f.client")" 'BEGIN{
      if (tot <= 0) tot = 1
      other = busy - allnodes - client; if (other < 0) other = 0
      printf "%.0f %.0f %.0f\n", nodes/tot*100, client/tot*100, other/tot*100 }' >"$f.cpu"
  if [ "$rc" = 0 ]; then
    jq -r --arg n "$name" --arg cpu "$(cat "$f.cpu")" '"   \($n) \(.target): \(.ops_per_sec) ops/s, p50 \(.latency_ms.p50) ms, p99 \(.latency_ms.p99) ms, \(.errors) errors" + (if .preload then ", preload \(.preload.keys) keys in \(.preload.seconds) s" else "" end) + "; CPU % nodes/client/other: \($cpu | gsub(" "; "/"))"' "$f.json" >&2
  else
    echo "   $name $target: FAILED (exit $rc; see $f.log)" >&2
    rm -f "$f.json"
  fi
}
# field RUN JQPATH: one figure of a finished run ("" if it failed).
field() { jq -r "$2 // empty" "$OUT/$1.json" 2>/dev/null; }
# rounds NAME "TARGETS" ARGS...: ROUNDS runs per target, targets alternating within a round. The
# median run's files (by ops/s) become NAME.TARGET.*; every run keeps its own as NAME.rN.TARGET.*.
rounds() {
  local name=$1 targets=$2 i t m ext; shift 2
  if [ "$ROUNDS" = 1 ]; then
    for t in $targets; do bench "$name" "$t" "$@"; done
    return
  fi
  for i in $(seq "$ROUNDS"); do
    for t in $targets; do bench "$name.r$i" "$t" "$@"; done
  done
  for t in $targets; do
    m=$(for i in $(seq "$ROUNDS"); do echo "$(field "$name.r$i.$t" .ops_per_sec) $i"; done |
      awk 'NF == 2' | sort -g | awk '{ r[NR] = $2 } END { if (NR) print r[int((NR + 1) / 2)] }')
    [ -n "$m" ] || continue
    for ext in json cpu rss client log; do
      if [ -f "$OUT/$name.r$m.$t.$ext" ]; then cp "$OUT/$name.r$m.$t.$ext" "$OUT/$name.$t.$ext"; fi
    done
    say "$name $t: median of $ROUNDS runs: run $m (ops/s of each: $(for i in $(seq "$ROUNDS"); do printf '%s ' "$(field "$name.r$i.$t" .ops_per_sec)"; done))"
  done
}
both() { local name=$1; shift; rounds "$name" "kvstore etcd" "$@"; }
common=(--duration "$DURATION" --warmup "$WARMUP" --value-size 256)

# ---- the runs --------------------------------------------------------------------------------
say "runs: ${DURATION}s measured after ${WARMUP}s warm-up each, $ROUNDS per workload and target; results in $OUT"
both write "${common[@]}" -w write --clients "$CLIENTS" --keys "$KEYS" --preload
# kvstore's bench, like its client library, multiplexes requests on session streams; etcd's
# client (and ours with --unary) makes one gRPC call per request. Both kvstore figures are shown.
rounds writeunary kvstore "${common[@]}" -w write --clients "$CLIENTS" --keys "$KEYS" --unary
both read "${common[@]}" -w read --clients "$CLIENTS" --keys "$KEYS"
# This disk's flush latency drifts for minutes at a time, and the single-client write follows it:
# measure it on either side of those runs (4 KiB O_DSYNC writes, where the nodes keep their data).
disk_probe() {
  local out
  out=$(LC_ALL=C dd if=/dev/zero of="$TMP/disk-probe" bs=4k count=500 oflag=dsync 2>&1 | tail -1)
  rm -f "$TMP/disk-probe"
  awk -v l="$out" 'BEGIN{ n=split(l, w, ", "); split(w[3], t, " "); if (t[1]+0 > 0) printf "%.3f", t[1]*1000/500; else printf "-" }'
}
DISK_BEFORE=$(disk_probe)
both write1 "${common[@]}" -w write --clients 1 --keys "$KEYS"
DISK_AFTER=$(disk_probe)
both mixed "${common[@]}" -w mixed --clients "$CLIENTS" --keys "$KEYS"

# The large key space: as large as BIG_KEYS, or what both can preload within PRELOAD_BUDGET.
big=$BIG_KEYS
for t in kvstore etcd; do
  rate=$(jq -r '.preload.keys_per_sec // 0' "$OUT/write.$t.json" 2>/dev/null || echo 0)
  fit=$(awk -v r="$rate" -v b="$PRELOAD_BUDGET" 'BEGIN{print int(r*b/50000)*50000}')
  [ "$fit" -lt "$big" ] && big=$fit
done
if [ "$big" -lt $((KEYS * 2)) ]; then big=$((KEYS * 10)); fi
if [ "$big" != "$BIG_KEYS" ]; then
  say "large key space: $big keys (BIG_KEYS=$BIG_KEYS would not preload within ${PRELOAD_BUDGET}s)"
fi
# The figure is the run after the one that preloads, so that neither key space is measured right
# after a load (on 2026-12-07 that run was once kvstore's fastest: 18.2k ops/s, the next five
# 14.1-16.1k; once it was not: 14.0k, then 14.2k).
for t in kvstore etcd; do
  bench mixedbigload "$t" "${common[@]}" -w mixed --clients "$CLIENTS" --keys "$big" --preload --preload-clients 256
done
both mixedbig "${common[@]}" -w mixed --clients "$CLIENTS" --keys "$big"

# ---- idle CPU ----------------------------------------------------------------------------------
say "idle CPU over ${IDLE}s (after 3s of quiet)"
sleep 3
declare -A before=()
for p in "${KV_PIDS[@]}" "${ETCD_PIDS[@]}"; do before[$p]=$(cpu_ticks "$p"); done
sleep "$IDLE"
idle_pct() { # pids... -> "a b c" percent of one core
  local out=()
  for p in "$@"; do
    out+=("$(awk -v a="${before[$p]}" -v b="$(cpu_ticks "$p")" -v hz="$CLK_TCK" -v s="$IDLE" 'BEGIN{printf "%.1f%%", (b-a)/hz/s*100}')")
  done
  echo "${out[*]}"
}
KV_IDLE=$(idle_pct "${KV_PIDS[@]}")
ETCD_IDLE=$(idle_pct "${ETCD_PIDS[@]}")

# ---- report ------------------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a=="" || b=="" || b+0==0) print "-"; else printf "%.2f", a/b }'; }
peak_mb() { [ -f "$OUT/$1.rss" ] && sort -n "$OUT/$1.rss" | tail -1 | awk '{printf "%.0f", $1/1024}' || echo -; }

echo
echo "kvstore vs etcd — $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, load average at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "etcd $(etcd --version 2>/dev/null | head -1 | awk '{print $3}') (3 members, fsync on); kvstore 3 nodes, default config (fsync on)."
echo "each run: ${DURATION}s measured after ${WARMUP}s warm-up, 256-byte values, uniform keys, closed loop, linearizable reads$([ "$ROUNDS" = 1 ] || echo "; each figure the median of $ROUNDS runs by ops/s")."
echo
printf '%-34s %10s %10s %6s  %15s %15s  %9s  %9s\n' "RUN" "KV OPS/S" "ETCD OPS/S" "RATIO" "KV P50/P99 ms" "ETCD P50/P99 ms" "ERR kv/et" "RSS MB kv/et"
row() {
  local name=$1 label=$2
  local ko eo kp kq ep eq ke ee
  ko=$(field "$name.kvstore" .ops_per_sec); eo=$(field "$name.etcd" .ops_per_sec)
  kp=$(field "$name.kvstore" .latency_ms.p50); kq=$(field "$name.kvstore" .latency_ms.p99)
  ep=$(field "$name.etcd" .latency_ms.p50); eq=$(field "$name.etcd" .latency_ms.p99)
  ke=$(field "$name.kvstore" .errors); ee=$(field "$name.etcd" .errors)
  printf '%-34s %10s %10s %6s  %15s %15s  %9s  %9s\n' "$label" "${ko:-failed}" "${eo:-failed}" "$(ratio "$ko" "$eo")" \
    "${kp:--}/${kq:--}" "${ep:--}/${eq:--}" "${ke:--}/${ee:--}" "$(peak_mb "$name.kvstore")/$(peak_mb "$name.etcd")"
}
row write "write, $CLIENTS clients"
row read "read (linearizable), $CLIENTS clients"
row write1 "write, 1 client"
row mixed "mixed 50/50, $CLIENTS clients, $KEYS keys"
row mixedbig "mixed 50/50, $CLIENTS clients, $big keys"
echo
echo "writes, $CLIENTS clients, kvstore with --unary (one gRPC call per request, as etcd's client makes): $(field writeunary.kvstore .ops_per_sec) ops/s, $(ratio "$(field writeunary.kvstore .ops_per_sec)" "$(field write.etcd .ops_per_sec)")x etcd, p50/p99 $(field writeunary.kvstore .latency_ms.p50)/$(field writeunary.kvstore .latency_ms.p99) ms"
echo "preload ($KEYS keys, 128 writers): kvstore $(field write.kvstore .preload.keys_per_sec | xargs printf '%.0f') keys/s, etcd $(field write.etcd .preload.keys_per_sec | xargs printf '%.0f') keys/s"
echo "preload ($big keys, 256 writers): kvstore $(field mixedbigload.kvstore .preload.seconds) s, etcd $(field mixedbigload.etcd .preload.seconds) s; the run right after it: kvstore $(field mixedbigload.kvstore .ops_per_sec) ops/s, etcd $(field mixedbigload.etcd .ops_per_sec)"
echo "RSS under load (peak of the 3 nodes, MB): kvstore $(for n in write read mixed mixedbig; do printf '%s=%s ' "$n" "$(peak_mb "$n.kvstore")"; done)"
echo "                                          etcd    $(for n in write read mixed mixedbig; do printf '%s=%s ' "$n" "$(peak_mb "$n.etcd")"; done)"
echo "CPU during the runs, % of the whole machine ($(nproc) cores): that target's 3 nodes / bench client / other processes"
for n in write read write1 mixed mixedbig; do
  printf '  %-9s kvstore %-10s etcd %s\n' "$n" "$(tr ' ' / <"$OUT/$n.kvstore.cpu" 2>/dev/null)" "$(tr ' ' / <"$OUT/$n.etcd.cpu" 2>/dev/null)"
done
echo "idle CPU over ${IDLE}s, per node (% of one core): kvstore $KV_IDLE; etcd $ETCD_IDLE"
echo "disk: a 4 KiB O_DSYNC write took $DISK_BEFORE ms before the single-client runs, $DISK_AFTER ms after (mean of 500, dd)"

echo
echo "targets (kvstore):"
verdict() { awk -v x="$1" -v t="$2" -v op="$3" 'BEGIN{ if (x=="-"||x=="") {print "n/a"; exit} ok = (op==">=") ? (x+0>=t+0) : (x+0<=t+0); print (ok ? "met" : "NOT met") }'; }
w=$(ratio "$(field write.kvstore .ops_per_sec)" "$(field write.etcd .ops_per_sec)")
r=$(ratio "$(field read.kvstore .ops_per_sec)" "$(field read.etcd .ops_per_sec)")
p=$(field write1.kvstore .latency_ms.p50); p=${p:--}
b=$(ratio "$(field mixedbig.kvstore .ops_per_sec)" "$(field mixed.kvstore .ops_per_sec)")
be=$(ratio "$(field mixedbig.etcd .ops_per_sec)" "$(field mixed.etcd .ops_per_sec)")
printf '  %-52s %8s  %s\n' "writes, $CLIENTS clients: kvstore/etcd ops/s >= 3" "$w" "$(verdict "$w" 3 '>=')"
printf '  %-52s %8s  %s\n' "linearizable reads, $CLIENTS clients: kvstore/etcd >= 2" "$r" "$(verdict "$r" 2 '>=')"
printf '  %-52s %8s  %s\n' "single-client write p50 <= 0.6 ms" "$p" "$(verdict "$p" 0.6 '<=')"
printf '  %-52s %8s  %s\n' "$big keys vs $KEYS keys ops/s >= 0.8 (etcd: $be)" "$b" "$(verdict "$b" 0.8 '>=')"
echo
echo "JSON results and logs: $OUT   (total $(($(date +%s) - T0)) s)"
