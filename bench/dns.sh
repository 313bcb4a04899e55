#!/usr/bin/env bash
# DNS throughput and latency: portico's DNS server against Knot DNS, same zone, same query file,
# same run, alternating rounds on 127.0.0.1 only.
#
#   bench/dns.sh [-d SECONDS] [-r ROUNDS] [-q OUTSTANDING]
#
# Each round runs dnsperf (one client thread, default 100 outstanding queries) for SECONDS
# against Knot, then against portico (the order alternates every round), and reads its
# "Queries per second" and "Average Latency". p99 comes from a second, shorter dnsperf run per
# server and round with -v (one line per query with its latency), piped into awk, which sorts
# the latencies and prints the 99th percentile. The server's CPU time per answered query
# (utime + stime from /proc/PID/stat around the throughput run) is printed too: unlike qps it
# hardly depends on what else the machine is doing. The summary gives per-server medians over
# the rounds and the portico/Knot ratios.
#
# PRIO=N runs the servers and dnsperf at nice level N (e.g. PRIO=-10 as root) so that other
# work on a shared machine disturbs the comparison less.
#
# The portico side is the real binary when PORTICO_BIN names it (`$PORTICO_BIN run --config
# FILE`: the whole program, with the load balancer listening on the loopback VIPs and the DNS
# server answering from the live health and ownership views), otherwise the dns crate's
# dns-bench example (`--config FILE`: the DNS server alone, everything healthy), built here in
# release mode. Both read the same config file.
#
# Needs: dnsperf, knotd (Debian: dnsperf, knot), dig, python3, cargo.
set -euo pipefail

DURATION=10
ROUNDS=3
OUTSTANDING=100
while getopts "d:r:q:" opt; do
  case $opt in
    d) DURATION=$OPTARG ;;
    r) ROUNDS=$OPTARG ;;
    q) OUTSTANDING=$OPTARG ;;
    *) echo "usage: $0 [-d SECONDS] [-r ROUNDS] [-q OUTSTANDING]" >&2; exit 2 ;;
  esac
done
# Bounded load: at most 60 s per run and 10 rounds.
(( DURATION > 0 && DURATION <= 60 )) || { echo "duration must be 1-60 s" >&2; exit 2; }
(( ROUNDS > 0 && ROUNDS <= 10 )) || { echo "rounds must be 1-10" >&2; exit 2; }
LAT_DURATION=$(( DURATION < 5 ? DURATION : 5 ))

PRIO=${PRIO:-0}
RUN=(nice -n "$PRIO")
for tool in dnsperf knotd; do
  command -v "$tool" >/dev/null || { echo "$tool not installed (apt-get install dnsperf knot)" >&2; exit 1; }
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d /tmp/portico-dns-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_udp() { # port
  for _ in $(seq 1 100); do
    if dig +short +time=1 +tries=1 -p "$1" @127.0.0.1 bench.test SOA >/dev/null 2>&1 &&
       [ -n "$(dig +short +time=1 +tries=1 -p "$1" @127.0.0.1 bench.test SOA)" ]; then return 0; fi
    sleep 0.1
  done
  echo "server on port $1 did not answer" >&2; return 1
}

# --- the zone, once for each server --------------------------------------------------------
KNOT_PORT=$(free_port)
PORTICO_PORT=$(free_port)
ADMIN_PORT=$(free_port)
VIP_PORT=$(free_port)
BACKEND_PORT=$(free_port)
mkdir -p "$TMP/knot/run" "$TMP/knot/db"
cat > "$TMP/knot/bench.test.zone" <<EOF
\$ORIGIN bench.test.
\$TTL 5
@               SOA   ns1.example.net. hostmaster.bench.test. 1 3600 600 604800 5
@               NS    ns1.example.net.
www             A     127.0.0.77
www             A     127.0.0.78
www             AAAA  ::1
_http._tcp.www  SRV   0 0 $VIP_PORT www.bench.test.
EOF
cat > "$TMP/knot/knot.conf" <<EOF
server:
    rundir: "$TMP/knot/run"
    listen: 127.0.0.1@$KNOT_PORT
database:
    storage: "$TMP/knot/db"
log:
  - target: stderr
    any: warning
zone:
  - domain: bench.test
    storage: "$TMP/knot"
    file: bench.test.zone
EOF
# Loopback VIPs, so that the real binary's load balancer can listen on them; no health check,
# so every backend counts as up without a backend running.
cat > "$TMP/portico.yaml" <<EOF
node: {name: bench}
admin: {listen: "127.0.0.1:$ADMIN_PORT"}
dns:
  listen: 127.0.0.1:$PORTICO_PORT
  zones:
    - name: bench.test
      ttl: 5s
      ns: [ns1.example.net]
      admin_email: hostmaster.bench.test
      serial: 1
      negative_ttl: 5s
services:
  - name: www
    vips: [127.0.0.77, 127.0.0.78, "::1"]
    ports: [{name: http, port: $VIP_PORT}]
    backends: [{address: 127.0.0.1, port: $BACKEND_PORT}]
    health_check: {type: none}
EOF
cat > "$TMP/queries" <<'EOF'
www.bench.test A
www.bench.test AAAA
_http._tcp.www.bench.test SRV
nx.bench.test A
bench.test SOA
EOF

# --- servers ----------------------------------------------------------------------------------
if [ -n "${PORTICO_BIN:-}" ]; then
  PORTICO_CMD=("$PORTICO_BIN" run --config "$TMP/portico.yaml")
else
  (cd "$ROOT" && cargo build --quiet --release -p dns --example dns-bench)
  PORTICO_CMD=("${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/dns-bench" --config "$TMP/portico.yaml")
fi
echo "portico side: ${PORTICO_CMD[0]}" >&2
"${RUN[@]}" knotd -c "$TMP/knot/knot.conf" >"$TMP/knot.log" 2>&1 &
PIDS+=($!)
"${RUN[@]}" "${PORTICO_CMD[@]}" >"$TMP/portico.log" 2>&1 &
PIDS+=($!)
wait_udp "$KNOT_PORT"
wait_udp "$PORTICO_PORT"

# Both answer the same question the same way (apart from order and flags).
for q in "www.bench.test A" "nx.bench.test A" "_http._tcp.www.bench.test SRV"; do
  k=$(dig +short -p "$KNOT_PORT" @127.0.0.1 $q | sort)
  p=$(dig +short -p "$PORTICO_PORT" @127.0.0.1 $q | sort)
  [ "$k" = "$p" ] || { echo "answers differ for $q: knot [$k] portico [$p]" >&2; exit 1; }
done

# --- runs -------------------------------------------------------------------------------------
cpu_ticks() { # pid -> utime + stime of all its threads, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}
TICK_US=$(( 1000000 / $(getconf CLK_TCK) ))
throughput() { # port pid -> "qps avg_ms lost cpu_us_per_query"
  local before after
  before=$(cpu_ticks "$2")
  "${RUN[@]}" dnsperf -s 127.0.0.1 -p "$1" -d "$TMP/queries" -l "$DURATION" -q "$OUTSTANDING" >"$TMP/perf.out" 2>&1
  after=$(cpu_ticks "$2")
  awk -v cpu=$(( (after - before) * TICK_US )) '
    /Queries completed/ {n=$3} /Queries per second/ {q=$4} /Average Latency/ {a=$4*1000} /Queries lost/ {l=$3}
    END {printf "%.0f %.3f %s %.2f\n", q, a, l, (n > 0 ? cpu / n : 0)}' "$TMP/perf.out"
}
p99() { # port -> "p99_ms"
  "${RUN[@]}" dnsperf -v -s 127.0.0.1 -p "$1" -d "$TMP/queries" -l "$LAT_DURATION" -q "$OUTSTANDING" 2>/dev/null |
    awk '$1 == ">" {print $NF}' | sort -g |
    awk '{v[NR]=$1} END {i=int(NR*0.99); if (i<1) i=1; printf "%.3f\n", v[i]*1000}'
}
median() { sort -g | awk '{v[NR]=$1} END {if (NR % 2) print v[(NR+1)/2]; else print (v[NR/2] + v[NR/2+1]) / 2}'; }

KNOT_PID=${PIDS[0]}; PORTICO_PID=${PIDS[1]}
printf "%-6s %-8s %10s %9s %9s %9s %7s\n" round server qps avg_ms p99_ms cpu_us/q lost
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then order="knot portico"; else order="portico knot"; fi
  for s in $order; do
    if [ "$s" = portico ]; then port=$PORTICO_PORT; pid=$PORTICO_PID; else port=$KNOT_PORT; pid=$KNOT_PID; fi
    read -r qps avg lost cpu < <(throughput "$port" "$pid")
    lat=$(p99 "$port")
    printf "%-6s %-8s %10s %9s %9s %9s %7s\n" "$r" "$s" "$qps" "$avg" "$lat" "$cpu" "$lost"
    echo "$qps $avg $lat $cpu" >>"$TMP/$s.rows"
  done
done
echo
printf "%-15s %10s %9s %9s %9s\n" "median" qps avg_ms p99_ms cpu_us/q
for s in knot portico; do
  for col in 1 2 3 4; do awk -v c=$col '{print $c}' "$TMP/$s.rows" | median >"$TMP/$s.med$col"; done
  printf "%-15s %10.0f %9.3f %9.3f %9.2f\n" "$s" "$(cat "$TMP/$s.med1")" "$(cat "$TMP/$s.med2")" \
    "$(cat "$TMP/$s.med3")" "$(cat "$TMP/$s.med4")"
done
awk -v pq="$(cat "$TMP/portico.med1")" -v kq="$(cat "$TMP/knot.med1")" \
    -v pl="$(cat "$TMP/portico.med3")" -v kl="$(cat "$TMP/knot.med3")" \
    -v pc="$(cat "$TMP/portico.med4")" -v kc="$(cat "$TMP/knot.med4")" \
  'BEGIN {printf "ratio portico/knot: qps %.2fx, p99 %.2fx, server CPU per query %.2fx\n", pq / kq, pl / kl, pc / kc}'
