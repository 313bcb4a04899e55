#!/bin/sh
# Measures VIP failover in the network-namespace lab: portico (default and fast profiles)
# against keepalived (VRRPv3, advert_int 1 and 0.01), 3 nodes, 5 rounds per scenario.
# Needs root and keepalived. Prints a per-round log and a Markdown table; JSON in $OUT.
set -eu
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/failover.json}
cargo build --release -p portico
exec "${CARGO_TARGET_DIR:-target}/release/portico" lab --nodes 3 --rounds "${ROUNDS:-5}" \
  --systems portico-default,portico-fast,keepalived-1s,keepalived-fastest \
  --scenarios hard,graceful,partition,backends --json "$OUT" "$@"
