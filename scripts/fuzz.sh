#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for SECONDS each (default 60) and prints executions per target.
#
#   scripts/fuzz.sh [SECONDS]
#
# Needs cargo-fuzz (installed here on first use) and libFuzzer's sanitizer flags, which a stable
# toolchain accepts with RUSTC_BOOTSTRAP=1. Each target's live corpus grows in fuzz/corpus/<target>
# (not committed), seeded from fuzz/seeds/<target>; a crash leaves its input in
# fuzz/artifacts/<target>/ and makes this script exit 1. Targets:
#   wal_segment    arbitrary bytes as a WAL segment file: Wal::open is Ok or Err, never panics
#   wal_records    validly framed records with arbitrary payloads, replayed by the log store
#   config_parse   arbitrary text as cluster.toml, then placement and the Raft config from it
#   peer_messages  bincode Raft messages, snapshot offers, Recover headers, Raft replies
#   kv_requests    protobuf Put/Get/Delete requests through the server's validation; grpc-timeout
set -euo pipefail
secs="${1:-60}"
cd "$(dirname "$0")/.."
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
targets=(wal_segment wal_records config_parse peer_messages kv_requests)
RUSTC_BOOTSTRAP=1 cargo fuzz build -O
failed=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    log="$(mktemp)"
    if cargo fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        >"$log" 2>&1; then
        status=ok
    else
        status=CRASH
        failed=1
        tail -40 "$log"
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
    summary+=("$(printf '%-14s %-5s %12s executions in %ss, coverage %s edges' \
        "$t" "$status" "${execs:-?}" "$secs" "${cov:-?}")")
    rm -f "$log"
done
printf '%s\n' "${summary[@]}"
exit "$failed"
