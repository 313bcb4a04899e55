#!/bin/sh
# Measures BGP failover in the routed network-namespace lab (`portico lab --announce bgp`):
# portico's own speaker with BFD 300 ms x 3 (default), 50 ms x 3, 10 ms x 3 (`fast`) and without
# BFD (hold 3 s)
# against FRR's bgpd + bfdd as the reference speaker on the same nodes, interleaved in one run,
# for each router (BIRD 2, then FRR); scenarios power (link down + SIGKILL), graceful
# (SIGTERM), backend (killed) and join; then node-1's CPU and BFD/BGP packets/s at BFD
# 10 ms x 3. Needs root, bird2 and frr. Prints a line per round and a Markdown table per
# router; JSON in $OUT-<router>.json. ROUTERS, ROUNDS, NODES, SYSTEMS, SCENARIOS, CPU_SECONDS
# and PROFILE (release|debug) override the defaults; extra arguments go to `portico lab`.
set -eu
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/bgp}
PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then
  cargo build --release --locked -p portico
else
  cargo build --locked -p portico
fi
BIN="${CARGO_TARGET_DIR:-target}/$PROFILE/portico"
echo "load before: $(cat /proc/loadavg)"
for router in ${ROUTERS:-bird frr}; do
  # nice -10: BFD at 50 ms x 3 should measure the speakers, not the compiler next door
  # (children, the routers and speakers included, inherit the priority)
  nice -n -10 "$BIN" lab --announce bgp --router "$router" --nodes "${NODES:-3}" \
    --rounds "${ROUNDS:-5}" \
    --systems "${SYSTEMS:-portico-bfd,frr-speaker,portico-bfd-fast,portico-bfd-10ms,portico-nobfd}" \
    --scenarios "${SCENARIOS:-power,graceful,backend,join}" \
    --cpu-seconds "${CPU_SECONDS:-30}" --json "$OUT-$router.json" "$@"
  echo "load after $router: $(cat /proc/loadavg)"
done
