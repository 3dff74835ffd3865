#!/usr/bin/env bash
# Runs the Jepsen-style chaos test (tests/chaos.rs) for as long as asked, in rounds of ROUND
# seconds (each round a fresh cluster and a new random seed; histories stay small enough to
# check), and prints the totals: rounds, faults injected, operations, unknowns, violations.
#
#   scripts/chaos.sh [TOTAL_SECS=600] [ROUND_SECS=60]
#
# A failing round prints its seed; KV_CHAOS_SEED=<seed> KV_CHAOS_SECS=<round> cargo test
# --release --test chaos -- --nocapture replays its nemesis schedule.
set -uo pipefail
cd "$(dirname "$0")/.."
total=${1:-600}
round=${2:-60}
cargo build --release --tests --bins -q || exit 2
start=$(date +%s)
rounds=0 failed=0 ops=0 unknown=0 violations=0 kills=0 pauses=0 wipes=0 partitions=0 power=0 led=0
log=$(mktemp -d)/chaos.log
while [ $(( $(date +%s) - start )) -lt "$total" ]; do
  rounds=$((rounds + 1))
  if ! KV_CHAOS_SECS=$round cargo test --release -q --test chaos -- --nocapture >"$log" 2>&1; then
    failed=$((failed + 1))
    cp "$log" "${log%.log}-round$rounds-failed.log"
    echo "round $rounds FAILED: $(grep -m1 -o 'seed [0-9]*' "$log"); log kept at ${log%.log}-round$rounds-failed.log"
  fi
  line=$(grep -m1 'chaos summary' "$log" || true)
  echo "round $rounds: ${line#chaos summary: }"
  num() { sed -n "s/.*$1[: ]*\([0-9][0-9]*\).*/\1/p" <<<"$line" | head -1; }
  kills=$((kills + ${line:+$(num 'kills')}+0))
  pauses=$((pauses + ${line:+$(num 'pauses')}+0))
  wipes=$((wipes + ${line:+$(num 'wipes')}+0))
  partitions=$((partitions + ${line:+$(num 'partitions')}+0))
  power=$((power + ${line:+$(num 'power_losses')}+0))
  led=$((led + ${line:+$(num 'power_losses_leading')}+0))
  ops=$((ops + ${line:+$(num 'operations')}+0))
  unknown=$((unknown + $(sed -n 's/.*completed, \([0-9]*\) unknown.*/\1/p' <<<"$line" | head -1)+0))
  violations=$((violations + $(sed -n 's/.*violations \([0-9]*\).*/\1/p' <<<"$line" | head -1)+0))
done
echo
echo "chaos totals over $(( $(date +%s) - start )) s: rounds $rounds (failed $failed)," \
  "faults $((kills + pauses + wipes + partitions + power)) (kill -9 $kills, SIGSTOP $pauses, wipe $wipes, partition $partitions, power loss $power, $led of them on a node that led a shard again)," \
  "operations $ops, unknown $unknown, violations $violations"
[ "$failed" -eq 0 ]
