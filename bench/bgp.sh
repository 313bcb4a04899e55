#!/bin/sh
# Measures BGP failover in the routed network-namespace lab (`portico lab --announce bgp`):
# portico's own speaker with BFD 300 ms x 3 (default), 50 ms x 3, 10 ms x 3 (`fast`) and
# without BFD (hold 3 s) against FRR's bgpd + bfdd as the reference speaker on the same nodes,
# interleaved in one run, for each router (BIRD 2, FRR, then GoBGP, which has no BFD:
# portico-nobfd only); scenarios power (link down + SIGKILL), graceful (SIGTERM), backend
# (killed) and join; then node-1's CPU and BFD/BGP packets/s at BFD 10 ms x 3. Needs root,
# bird2, frr and gobgpd. Prints a line per round and a Markdown table per router; JSON in
# $OUT-<router>.json. ROUTERS, ROUNDS, NODES, SYSTEMS, SCENARIOS, CPU_SECONDS and PROFILE
# (release|debug) override the defaults; extra arguments go to `portico lab`.
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
for router in ${ROUTERS:-bird frr gobgp}; do
  systems=${SYSTEMS:-portico-bfd,frr-speaker,portico-bfd-fast,portico-bfd-10ms,portico-nobfd}
  cpu=${CPU_SECONDS:-30}
  if [ "$router" = gobgp ]; then
    # GoBGP has no BFD: only the system without it, and no BFD CPU measurement
    systems=portico-nobfd
    cpu=0
  fi
  # nice -10: BFD at 50 ms x 3 should measure the speakers, not the compiler next door
  # (children, the routers and speakers included, inherit the priority)
  nice -n -10 "$BIN" lab --announce bgp --router "$router" --nodes "${NODES:-3}" \
    --rounds "${ROUNDS:-5}" --systems "$systems" \
    --scenarios "${SCENARIOS:-power,graceful,backend,join}" \
    --cpu-seconds "$cpu" --json "$OUT-$router.json" "$@"
  echo "load after $router: $(cat /proc/loadavg)"
done
