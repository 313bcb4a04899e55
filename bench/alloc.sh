#!/usr/bin/env bash
# Allocation under a burst (issue: 1,000 Services created at once all hold an address within 5 s
# of the last create, p99 create->address <= 2 s). A script, not a test.
#
#   bench/alloc.sh                 # 1,000 Services, 3 rounds
#   SERVICES=250 ROUNDS=5 bench/alloc.sh
#
# Each round starts the in-repository test API server (crates/apiserver: the wire protocol,
# RBAC from deploy/rbac.yaml, CRDs from deploy/crds.yaml) and the shipped `portico controller`
# as its own process with its ServiceAccount, creates SERVICES LoadBalancer Services through
# the API over HTTPS (64 requests in flight), and prints create->address percentiles, the span
# from the last create to the last address, and the controller's API requests and CPU time per
# allocation. There is no peer here: MetalLB's controller needs a real kube-apiserver, which
# cannot be installed on this machine. Only 127.0.0.1 is used.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SERVICES=${SERVICES:-1000}
ROUNDS=${ROUNDS:-3}
cd "$ROOT"
cargo build --release --locked -p portico --bin portico --example alloc_burst
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
echo "# $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git rev-parse --short HEAD)"
"$TARGET/release/examples/alloc_burst" "$TARGET/release/portico" "$SERVICES" "$ROUNDS"
