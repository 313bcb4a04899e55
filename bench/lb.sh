#!/usr/bin/env bash
# L4 benchmark: direct vs HAProxy (mode tcp, roundrobin) vs portico's load balancer, in front of
# the same two nginx origins on loopback. wrk --latency with keep-alive and with
# "Connection: close", then iperf3 single-stream throughput, alternated over several rounds;
# prints the medians. A script, not a test: numbers depend on the machine.
#
#   bench/lb.sh                 # ROUNDS=3 DURATION=5 by default
#   ROUNDS=5 DURATION=10 bench/lb.sh
#   LB_BIN=path/to/lb-bench LB_ARGS=--copy bench/lb.sh   # the balancer alone, copy relay
#
# portico runs as the real binary (`portico run --config`, built with
# `cargo build --release -p portico`); LB_BIN=.../examples/lb-bench runs the load balancer alone
# from the same config (crates/lb/examples/lb-bench.rs).
# Needs: nginx-light, haproxy, wrk, iperf3, python3. Only 127.0.0.0/8 is used. Every process
# started here is killed on exit.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
THREADS=${THREADS:-1}
CONNS=${CONNS:-50}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PORTICO_BIN=${PORTICO_BIN:-$TARGET/release/portico}
LB_BIN=${LB_BIN:-}
LB_ARGS=${LB_ARGS:-}

for b in nginx haproxy wrk iperf3 python3; do
  command -v "$b" >/dev/null || { echo "skipped: $b not installed" >&2; exit 0; }
done
if [[ -z $LB_BIN && ! -x $PORTICO_BIN ]]; then
  (cd "$ROOT" && cargo build --release -p portico)
fi

WORK=$(mktemp -d /tmp/portico-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

O1=18081 O2=18082 IPERF=15201
HA=18090 HA_IPERF=18095
VIP=127.0.0.20 PT=18091 PT_IPERF=18096

# --- origins --------------------------------------------------------------------------------
for port in $O1 $O2; do
  d=$WORK/nginx-$port
  mkdir -p "$d"
  cat >"$d/nginx.conf" <<NGINX
worker_processes 1;
error_log $d/error.log warn;
pid $d/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $d/body; proxy_temp_path $d/proxy; fastcgi_temp_path $d/fcgi;
  uwsgi_temp_path $d/uwsgi; scgi_temp_path $d/scgi;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$port backlog=4096;
    location / { return 200 "hello from $port\n"; }
  }
}
NGINX
  nginx -c "$d/nginx.conf" -g 'daemon off;' &
  PIDS+=($!)
done
iperf3 -s -B 127.0.0.1 -p $IPERF >/dev/null 2>&1 &
PIDS+=($!)

# --- HAProxy ----------------------------------------------------------------------------------
cat >"$WORK/haproxy.cfg" <<HAP
global
  maxconn 8000
defaults
  mode tcp
  timeout connect 1s
  timeout client 60s
  timeout server 60s
frontend web
  bind 127.0.0.1:$HA
  default_backend origins
backend origins
  balance roundrobin
  server o1 127.0.0.1:$O1
  server o2 127.0.0.1:$O2
frontend bulk
  bind 127.0.0.1:$HA_IPERF
  default_backend iperf
backend iperf
  server i1 127.0.0.1:$IPERF
HAP
haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
PIDS+=($!)

# --- portico ----------------------------------------------------------------------------------
cat >"$WORK/portico.yaml" <<PT
node:
  name: bench
admin:
  listen: 127.0.0.1:19440
services:
  - name: web
    vips: [$VIP]
    ports:
      - {name: http, port: $PT}
    backends:
      - {name: o1, address: 127.0.0.1, port: $O1}
      - {name: o2, address: 127.0.0.1, port: $O2}
    balance: round-robin
    health_check: {type: tcp, interval: 2s, timeout: 1s}
  - name: bulk
    vips: [$VIP]
    ports:
      - {name: iperf, port: $PT_IPERF}
    backends:
      - {name: i1, address: 127.0.0.1, port: $IPERF}
    health_check: {type: tcp, interval: 2s, timeout: 1s}
PT
if [[ -n $LB_BIN ]]; then
  # shellcheck disable=SC2086
  "$LB_BIN" "$WORK/portico.yaml" $LB_ARGS >"$WORK/portico.log" 2>&1 &
else
  "$PORTICO_BIN" run --config "$WORK/portico.yaml" >"$WORK/portico.log" 2>&1 &
fi
PIDS+=($!)

wait_port() {
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on $1:$2" >&2
  exit 1
}
for p in $O1 $O2 $IPERF $HA $HA_IPERF; do wait_port 127.0.0.1 "$p"; done
wait_port $VIP $PT
wait_port $VIP $PT_IPERF
sleep 0.5

RESULTS=$WORK/results.tsv
: >"$RESULTS"

# wrk_run NAME MODE URL [header...]
wrk_run() {
  local name=$1 mode=$2 url=$3
  shift 3
  local out
  out=$(timeout $((DURATION + 30)) wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency "$@" "$url" 2>&1)
  local rps p50 p99 errs
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  errs=$(awk '/Socket errors|Non-2xx/ {print}' <<<"$out" | tr '\n' ' ')
  printf '%s\t%s\trps\t%s\n%s\t%s\tp50\t%s\n%s\t%s\tp99\t%s\n' \
    "$name" "$mode" "${rps:-0}" "$name" "$mode" "${p50:-nan}" "$name" "$mode" "${p99:-nan}" >>"$RESULTS"
  echo "  $name $mode: ${rps:-?} req/s p50 ${p50:-?} p99 ${p99:-?} ${errs}" >&2
}

iperf_run() {
  local name=$1 port=$2 host=${3:-127.0.0.1}
  local g
  g=$(timeout $((DURATION + 30)) iperf3 -c "$host" -p "$port" -t "$DURATION" -f g 2>&1 |
    awk '/receiver/ {for (i = 1; i <= NF; i++) if ($i == "Gbits/sec") print $(i-1)}')
  printf '%s\tbulk\tgbps\t%s\n' "$name" "${g:-0}" >>"$RESULTS"
  echo "  $name iperf3: ${g:-?} Gbit/s" >&2
}

target_run() {
  local name=$1 url=$2 iport=$3 ihost=$4
  wrk_run "$name" keepalive "$url"
  wrk_run "$name" close "$url" -H 'Connection: close'
  iperf_run "$name" "$iport" "$ihost"
}

for r in $(seq "$ROUNDS"); do
  echo "round $r/$ROUNDS" >&2
  order=(direct haproxy portico)
  if ((r % 2 == 0)); then order=(direct portico haproxy); fi
  for t in "${order[@]}"; do
    case $t in
      direct) target_run direct "http://127.0.0.1:$O1/" $IPERF 127.0.0.1 ;;
      haproxy) target_run haproxy "http://127.0.0.1:$HA/" $HA_IPERF 127.0.0.1 ;;
      portico) target_run portico "http://$VIP:$PT/" $PT_IPERF $VIP ;;
    esac
  done
done

python3 - "$RESULTS" "$ROUNDS" "$DURATION" "$THREADS" "$CONNS" <<'PY'
import statistics, sys
from collections import defaultdict
path, rounds, dur, t, c = sys.argv[1:]
vals = defaultdict(list)
def ms(s):
    if s in ("nan", ""): return float("nan")
    for suf, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if s.endswith(suf): return float(s[: -len(suf)]) * f
    return float(s)
for line in open(path):
    name, mode, metric, v = line.rstrip("\n").split("\t")
    vals[(name, mode, metric)].append(float(v) if metric in ("rps", "gbps") else ms(v))
med = lambda k: statistics.median(vals[k]) if vals[k] else float("nan")
print(f"\nmedians of {rounds} rounds, wrk -t{t} -c{c} -d{dur}s --latency, iperf3 -t {dur} (single stream)")
print("note: 'direct' hits one origin; the proxies balance over both\n")
hdr = f"{'target':<9} {'keep-alive req/s':>17} {'p50 ms':>7} {'p99 ms':>7} {'close req/s':>12} {'p50 ms':>7} {'p99 ms':>7} {'iperf3 Gbit/s':>14}"
print(hdr); print("-" * len(hdr))
for n in ("direct", "haproxy", "portico"):
    print(f"{n:<9} {med((n,'keepalive','rps')):>17.0f} {med((n,'keepalive','p50')):>7.2f} {med((n,'keepalive','p99')):>7.2f} "
          f"{med((n,'close','rps')):>12.0f} {med((n,'close','p50')):>7.2f} {med((n,'close','p99')):>7.2f} {med((n,'bulk','gbps')):>14.2f}")
r = lambda m, k: med(("portico", m, k)) / med(("haproxy", m, k))
print(f"{'ratio':<9} {r('keepalive','rps'):>16.2f}x {r('keepalive','p50'):>6.2f}x {r('keepalive','p99'):>6.2f}x "
      f"{r('close','rps'):>11.2f}x {r('close','p50'):>6.2f}x {r('close','p99'):>6.2f}x {r('bulk','gbps'):>13.2f}x")
print("(ratio = portico / HAProxy; > 1 is better for req/s and Gbit/s, < 1 is better for latency)")
PY
