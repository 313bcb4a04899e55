#!/usr/bin/env bash
# L4 data-path benchmark in a network-namespace lab (root): client -> node (holds the VIP) ->
# two backend namespaces running nginx (a small static page) and, in be1, an iperf3 server.
# Systems, interleaved per round: direct (client -> be1, routed by the node), portico's proxy
# with proxy.workers 1 and 2 (proxy1/proxy2: proxy.io epoll; uring1/uring2: the default uring), HAProxy 2.6 (mode tcp) with nbthread 1 and 2, IPVS (ipvsadm, rr,
# masquerading) and portico's kernel path (`forwarding: kernel`; skipped with a message when the
# portico binary refuses that field). wrk modes: keep-alive (-c50), "Connection: close" (-c50),
# 400 connections (keep-alive); iperf3 single stream through each. Per row: requests/s,
# p50/p99, CPU per 1,000 requests of the balancer process (utime+stime from /proc/PID/stat) and
# of the whole machine (/proc/stat busy delta: what the kernel paths must be judged by), ratio to
# HAProxy with the same threads, and the 1-minute load average. Then a failure scenario: be2's
# nginx killed (SIGKILL) under wrk load; failed requests (non-2xx + socket errors) per system.
# A script, not a test: figures depend on the machine (record its load).
#
#   sudo bench/lb.sh                          # ROUNDS=3 DURATION=10
#   sudo ROUNDS=1 DURATION=3 bench/lb.sh      # quick look
#   sudo ROUNDS=0 bench/lb.sh                 # the failure scenario only
#   PORTICO_BIN=target/release/portico        # default; built with cargo build --release -p portico
#   sudo ONLY="direct kernel" MODES="close" bench/lb.sh   # a row filter: systems and modes
#   sudo SHARED_PORT=1 bench/lb.sh           # the kernel path uses backend port 80 as the proxies do
#   sudo CT_TIME_WAIT=10 bench/lb.sh         # conntrack's TCP time-wait timeout in the node
#   sudo ONLY="proxy1 uring1 haproxy1" bench/lb.sh  # one worker: epoll, uring (the default), HAProxy
#   sudo DIAG=1 bench/lb.sh                   # per row: conntrack -S deltas, conntrack -C and
#                                             # nf_conntrack_max (node), SYN retransmits (client),
#                                             # TIME_WAIT sockets (be1), TCP segments the node
#                                             # sent per request and retransmitted, SYNs PAWS
#                                             # refused on a TIME_WAIT socket (be1 + be2,
#                                             # TcpExtPAWSTimewait)
#   sudo SYSCALLS=1 bench/lb.sh               # per row, after the measured run: a second short
#                                             # run (3 s) under `strace -c -f` on the balancer,
#                                             # printing its system calls per request by name
#                                             # (strace slows it down: counts only, no timings)
#
# Addresses exist only inside the namespaces this script creates (pp-*-PID); every namespace
# and process is removed on exit (trap), whatever happened.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-50}
MANY=${MANY:-400}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PORTICO_BIN=${PORTICO_BIN:-$TARGET/release/portico}
FAILURE=${FAILURE:-1}
ONLY=${ONLY:-}
MODES=${MODES:-keepalive close c$MANY iperf3}
DIAG=${DIAG:-0}
SYSCALLS=${SYSCALLS:-0}

if [[ $(id -u) != 0 ]]; then
  echo "skipped: needs root (network namespaces)" >&2
  exit 0
fi
for b in ip nginx haproxy wrk iperf3 ipvsadm python3; do
  command -v "$b" >/dev/null || { echo "skipped: $b not installed" >&2; exit 0; }
done
[[ -x $PORTICO_BIN ]] || { echo "no portico binary at $PORTICO_BIN: cargo build --release -p portico" >&2; exit 1; }

ulimit -n 65536 2>/dev/null || true
SFX=$$
CL=pp-client-$SFX NODE=pp-node-$SFX BE1=pp-be1-$SFX BE2=pp-be2-$SFX
WORK=$(mktemp -d /tmp/portico-lb-bench.XXXXXX)
chmod 755 "$WORK" # nginx workers (an unprivileged user) read the page
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.3
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  # the nginx masters we started and their workers
  for f in "$WORK"/nginx-*/nginx.pid; do
    [[ -f $f ]] || continue
    kill_nginx "$(cat "$f" 2>/dev/null)"
  done
  for ns in $CL $NODE $BE1 $BE2; do ip netns del "$ns" 2>/dev/null; done
  if [[ -n ${KEEP_WORK:-} ]]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
# kill_nginx MASTER_PID: stopped first, so that it cannot start a new worker for one killed
kill_nginx() {
  [[ -n $1 ]] || return 0
  kill -STOP "$1" 2>/dev/null || return 0
  for c in $(ps --ppid "$1" -o pid= 2>/dev/null); do kill -KILL "$c" 2>/dev/null; done
  kill -KILL "$1" 2>/dev/null
}

# --- the lab ------------------------------------------------------------------------------------
for ns in $CL $NODE $BE1 $BE2; do
  ip netns add "$ns"
  inns "$ns" ip link set lo up
done
VIP=10.211.100.10
link() { # link NS_A IFA ADDR_A NS_B IFB ADDR_B
  ip link add "$2" netns "$1" type veth peer name "$5" netns "$4"
  inns "$1" ip addr add "$3/24" dev "$2"
  inns "$4" ip addr add "$6/24" dev "$5"
  inns "$1" ip link set "$2" up
  inns "$4" ip link set "$5" up
}
link $CL c0 10.211.0.2 $NODE n0 10.211.0.1
link $BE1 b0 10.211.1.2 $NODE n1 10.211.1.1
link $BE2 b0 10.211.2.2 $NODE n2 10.211.2.1
inns $CL ip route add default via 10.211.0.1
inns $BE1 ip route add default via 10.211.1.1
inns $BE2 ip route add default via 10.211.2.1
inns $NODE sysctl -qw net.ipv4.ip_forward=1
# CT_TIME_WAIT=S: conntrack's TCP time-wait timeout in the node (default 120 s), to test whether
# tracked TIME_WAIT entries limit new connections
if [[ -n ${CT_TIME_WAIT:-} ]]; then
  inns $NODE modprobe nf_conntrack 2>/dev/null || true
  inns $NODE sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_time_wait="$CT_TIME_WAIT"
fi
inns $NODE ip addr add $VIP/32 dev lo
for ns in $CL $NODE $BE1 $BE2; do
  inns "$ns" sysctl -qw net.ipv4.ip_local_port_range="10000 65000"
  inns "$ns" sysctl -qw net.ipv4.tcp_tw_reuse=1
  inns "$ns" sysctl -qw net.core.somaxconn=4096
  inns "$ns" sysctl -qw net.ipv4.tcp_max_syn_backlog=4096
done
BE1_IP=10.211.1.2 BE2_IP=10.211.2.2

# --- backends: nginx (static page) in each, iperf3 in be1 ---------------------------------------
start_nginx() { # NS NAME
  local d=$WORK/nginx-$2
  mkdir -p "$d/www"
  echo "hello from $2" >"$d/www/index.html"
  cat >"$d/nginx.conf" <<NGINX
worker_processes 1;
error_log $d/error.log warn;
pid $d/nginx.pid;
events { worker_connections 8192; }
worker_rlimit_nofile 20000;
http {
  access_log off;
  client_body_temp_path $d/body; proxy_temp_path $d/proxy; fastcgi_temp_path $d/fcgi;
  uwsgi_temp_path $d/uwsgi; scgi_temp_path $d/scgi;
  keepalive_requests 1000000;
  server {
    listen 80 backlog=4096 reuseport;
    listen 81 backlog=4096 reuseport;
    root $d/www;
  }
}
NGINX
  inns "$1" nginx -c "$d/nginx.conf"   # daemonises; the master's pid is in nginx.pid
}
start_nginx $BE1 be1
start_nginx $BE2 be2
ip netns exec $BE1 iperf3 -s -p 5201 >/dev/null 2>&1 &
PIDS+=($!)

# --- HAProxy, nbthread 1 and 2 ------------------------------------------------------------------
start_haproxy() { # THREADS HTTP_PORT IPERF_PORT
  cat >"$WORK/haproxy-$1.cfg" <<HAP
global
  maxconn 8000
  nbthread $1
defaults
  mode tcp
  timeout connect 1s
  timeout client 60s
  timeout server 60s
frontend web
  bind $VIP:$2
  default_backend origins
backend origins
  balance roundrobin
  default-server check inter 100ms fall 1 rise 1
  server be1 $BE1_IP:80
  server be2 $BE2_IP:80
frontend bulk
  bind $VIP:$3
  default_backend iperf
backend iperf
  server i1 $BE1_IP:5201
HAP
  ip netns exec $NODE haproxy -f "$WORK/haproxy-$1.cfg" -db >"$WORK/haproxy-$1.log" 2>&1 &
  PIDS+=($!)
  eval "HA$1_PID=$!"
}
start_haproxy 1 8011 9011
start_haproxy 2 8012 9012

# --- IPVS ---------------------------------------------------------------------------------------
IPVS=0
if out=$(inns $NODE ipvsadm -A -t $VIP:8020 -s rr 2>&1); then
  inns $NODE ipvsadm -a -t $VIP:8020 -r $BE1_IP:80 -m
  inns $NODE ipvsadm -a -t $VIP:8020 -r $BE2_IP:80 -m
  inns $NODE ipvsadm -A -t $VIP:9020 -s rr
  inns $NODE ipvsadm -a -t $VIP:9020 -r $BE1_IP:5201 -m
  IPVS=1
else
  echo "ipvs: not available on this kernel ($(head -1 <<<"$out"))" >&2
fi

# --- portico: proxy with 1 and 2 workers, kernel path ------------------------------------------
portico_config() { # NAME WORKERS HTTP_PORT IPERF_PORT ADMIN_PORT [FORWARDING]
  local fwd="" BE_PORT=80
  # The kernel path SNATs to the node's address and keeps the client's source port, so its
  # flows reach a backend as node:client-port -> backend:80, the same 4-tuples the proxies'
  # own connections from the node use. nginx closes first (TIME_WAIT on the backend), and a
  # SYN that lands on a TIME_WAIT socket left by another sender's connection carries an
  # unrelated TCP timestamp: PAWS rejects it (TcpExtPAWSTimewait on the backend), the client
  # retransmits the SYN a second later. Measured with DIAG=1: 2,131 client SYN retransmits in
  # one 10 s `Connection: close` kernel row right after the proxy rows, none for the others.
  # Port 81 keeps the kernel path's backend 4-tuples apart from the proxies'.
  [[ ${6:-} == kernel && -z ${SHARED_PORT:-} ]] && BE_PORT=81
  [[ -n ${6:-} ]] && fwd="    forwarding: $6"
  cat >"$WORK/portico-$1.yaml" <<PT
node: {name: bench}
admin: {listen: 127.0.0.1:$5}
proxy: {workers: $2${IO:+, io: $IO}}
services:
  - name: web
    vips: [$VIP]
    ports: [{name: http, port: $3}]
    backends:
      - {name: be1, address: $BE1_IP, port: $BE_PORT}
      - {name: be2, address: $BE2_IP, port: $BE_PORT}
    balance: round-robin
    health_check: {type: tcp, interval: 100ms, timeout: 100ms, rise: 1, fall: 1}
$fwd
  - name: bulk
    vips: [$VIP]
    ports: [{name: iperf, port: $4}]
    backends:
      - {name: i1, address: $BE1_IP, port: 5201}
$fwd
PT
  sed -i '/^$/d' "$WORK/portico-$1.yaml"
}
start_portico() { # NAME
  # not through a shell function: $! must be the balancer's own pid (its CPU is read from it)
  ip netns exec $NODE "$PORTICO_BIN" run --config "$WORK/portico-$1.yaml" >"$WORK/portico-$1.log" 2>&1 &
  PIDS+=($!)
  eval "PT_$1_PID=$!"
}
# proxy.io: epoll (every relay on tokio)
IO=epoll portico_config w1 1 8001 9001 19441 proxy
IO=epoll portico_config w2 2 8002 9002 19442 proxy
# the same with proxy.io: uring, the default (long-lived connections move onto each worker's ring)
IO=uring portico_config u1 1 8003 9003 19444 proxy
IO=uring portico_config u2 2 8004 9004 19445 proxy
start_portico w1
start_portico w2
start_portico u1
start_portico u2
KERNEL=0
portico_config kernel 1 8030 9030 19443 kernel
if out=$("$PORTICO_BIN" check --config "$WORK/portico-kernel.yaml" 2>&1); then
  start_portico kernel
  KERNEL=1
else
  echo "portico-kernel: not available in this build ($(grep -m1 -o 'forwarding[^(]*' <<<"$out" || echo refused))" >&2
fi

wait_http() { # SYSTEM URL
  for _ in $(seq 100); do
    if inns $CL wrk -t1 -c1 -d1s "$2" 2>/dev/null | grep -q '^Requests/sec'; then return 0; fi
    sleep 0.2
  done
  # say why: whether the balancer is still running, and the end of its log
  echo "nothing answers at $2 ($1)" >&2
  local pid=PID_$1 log=
  case $1 in
    proxy1) log=portico-w1 ;; proxy2) log=portico-w2 ;;
    uring1) log=portico-u1 ;; uring2) log=portico-u2 ;;
    kernel) log=portico-kernel ;;
    haproxy1) log=haproxy-1 ;; haproxy2) log=haproxy-2 ;;
  esac
  if [[ -n ${!pid:-} ]] && ! kill -0 "${!pid}" 2>/dev/null; then
    echo "$1: its process (pid ${!pid}) has exited" >&2
  fi
  if [[ -n $log && -s $WORK/$log.log ]]; then
    echo "the last lines of its log ($log.log):" >&2
    tail -n 20 "$WORK/$log.log" >&2
  fi
  exit 1
}
URL_direct=http://$BE1_IP/
URL_proxy1=http://$VIP:8001/ URL_proxy2=http://$VIP:8002/
URL_uring1=http://$VIP:8003/ URL_uring2=http://$VIP:8004/
URL_haproxy1=http://$VIP:8011/ URL_haproxy2=http://$VIP:8012/
URL_ipvs=http://$VIP:8020/ URL_kernel=http://$VIP:8030/
IPERF_direct=$BE1_IP:5201
IPERF_proxy1=$VIP:9001 IPERF_proxy2=$VIP:9002
IPERF_uring1=$VIP:9003 IPERF_uring2=$VIP:9004
IPERF_haproxy1=$VIP:9011 IPERF_haproxy2=$VIP:9012
IPERF_ipvs=$VIP:9020 IPERF_kernel=$VIP:9030
PID_direct="" PID_ipvs=""
PID_proxy1=$PT_w1_PID PID_proxy2=$PT_w2_PID
PID_uring1=$PT_u1_PID PID_uring2=$PT_u2_PID
PID_haproxy1=$HA1_PID PID_haproxy2=$HA2_PID
PID_kernel=${PT_kernel_PID:-}
SYSTEMS=(direct proxy1 uring1 haproxy1 proxy2 uring2 haproxy2)
((IPVS)) && SYSTEMS+=(ipvs)
((KERNEL)) && SYSTEMS+=(kernel)
if [[ -n $ONLY ]]; then
  kept=()
  for s in "${SYSTEMS[@]}"; do [[ " $ONLY " == *" $s "* ]] && kept+=("$s"); done
  SYSTEMS=("${kept[@]}")
fi
has_mode() { [[ " $MODES " == *" $1 "* ]]; }
for s in "${SYSTEMS[@]}"; do
  u=URL_$s
  wait_http "$s" "${!u}"
done
sleep 1

RESULTS=$WORK/results.tsv
: >"$RESULTS"

proc_ticks() { # PID -> utime+stime in clock ticks (0 without a pid)
  [[ -n $1 && -r /proc/$1/stat ]] || { echo 0; return; }
  awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$1/stat"
}
# conntrack -S summed over CPUs (node namespace): insert_failed drop early_drop
ct_stats() {
  inns $NODE conntrack -S 2>/dev/null | awk '{for (k = 1; k <= NF; k++) {split($k, a, "="); s[a[1]] += a[2]}}
    END {printf "%d %d %d", s["insert_failed"], s["drop"], s["early_drop"]}'
}
# a netstat counter of a namespace (absolute; nstat -s does not touch its history file)
ns_counter() { inns "$1" nstat -asz "$2" 2>/dev/null | awk -v k="$2" '$1 == k {print $2; f = 1} END {if (!f) print 0}'; }
DIAGS=$WORK/diag.tsv
: >"$DIAGS"
# worker_accepts ADMIN_PORT -> each proxy worker's accepted connections so far, space-separated
# (and last, the connections handed to the less busy worker)
worker_accepts() { inns $NODE curl -s "http://127.0.0.1:$1/metrics" 2>/dev/null | awk '/^portico_lb_worker_accepted_connections_total/ {printf "%s ", $2} /^portico_lb_worker_handoffs_total/ {h = $2} END {printf "%s", h + 0}'; }
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
load1() { cut -d' ' -f1 /proc/loadavg; }

# wrk_run SYSTEM MODE [wrk args...]
wrk_run() {
  local sys=$1 mode=$2
  shift 2
  local u=URL_$sys p=PID_$sys
  local pt0 mt0 pt1 mt1 ct0 ct1 syn0 syn1 seg0 seg1 rtx0 rtx1 wa0=""
  if ((DIAG)); then
    ct0=$(ct_stats)
    syn0=$(ns_counter $CL TcpExtTCPSynRetrans)
    seg0=$(ns_counter $NODE TcpOutSegs)
    rtx0=$(ns_counter $NODE TcpRetransSegs)
    paws0=$(($(ns_counter $BE1 TcpExtPAWSTimewait) + $(ns_counter $BE2 TcpExtPAWSTimewait)))
    [[ $sys == proxy2 ]] && wa0=$(worker_accepts 19442)
  fi
  pt0=$(proc_ticks "${!p}")
  mt0=$(machine_ticks)
  timeout $((DURATION + 30)) ip netns exec $CL wrk -d"${DURATION}s" --latency "$@" "${!u}" >"$WORK/wrk.out" 2>&1 || true
  pt1=$(proc_ticks "${!p}")
  mt1=$(machine_ticks)
  if ((DIAG)); then
    ct1=$(ct_stats)
    syn1=$(ns_counter $CL TcpExtTCPSynRetrans)
    seg1=$(ns_counter $NODE TcpOutSegs)
    rtx1=$(ns_counter $NODE TcpRetransSegs)
    paws1=$(($(ns_counter $BE1 TcpExtPAWSTimewait) + $(ns_counter $BE2 TcpExtPAWSTimewait)))
    local count max tw n
    n=$(grep -o '[0-9]* requests in' "$WORK/wrk.out" | cut -d' ' -f1)
    count=$(inns $NODE conntrack -C 2>/dev/null || echo "?")
    max=$(inns $NODE cat /proc/sys/net/netfilter/nf_conntrack_max 2>/dev/null || echo "?")
    tw=$(inns $BE1 ss -Htan state time-wait 2>/dev/null | wc -l)
    read -r a0 b0 c0 <<<"$ct0"
    read -r a1 b1 c1 <<<"$ct1"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$sys" "$mode" "$((a1 - a0))" "$((b1 - b0))" "$((c1 - c0))" \
      "$count" "$max" "$((syn1 - syn0))" "$tw" \
      "$(awk -v s=$((seg1 - seg0)) -v n="${n:-0}" 'BEGIN {printf (n ? "%.2f" : "-"), (n ? s / n : 0)}')" "$((rtx1 - rtx0))" "$((paws1 - paws0))" >>"$DIAGS"
    if [[ $sys == proxy2 ]]; then
      # how evenly SO_REUSEPORT spread this row's connections over the two workers
      local wa1
      wa1=$(worker_accepts 19442)
      python3 -c 'import sys; a, b = (list(map(int, x.split())) for x in sys.argv[1:3]); d = [y - x for x, y in zip(a, b)]; h = d.pop(); print("  proxy2    %-6s connections accepted per worker %s (%s), handed to the less busy worker %d (%.1f%%)" % (sys.argv[3], " / ".join(map(str, d)), " / ".join("%.0f%%" % (100 * x / max(1, sum(d))) for x in d), h, 100 * h / max(1, sum(d))))' "$wa0" "$wa1" "$mode" >&2 || true
    fi
    tail -1 "$DIAGS" | awk -F'\t' '{printf "  %-9s %-6s conntrack: insert_failed %s drop %s early_drop %s, entries %s of %s; client SYN retransmits %s; be1 TIME_WAIT %s; node segments sent per request %s, retransmitted %s; backends PAWS-refused SYNs %s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12}' >&2
  fi
  python3 - "$sys" "$mode" "$((pt1 - pt0))" "$((mt1 - mt0))" "$(load1)" "$(getconf CLK_TCK)" "$WORK/wrk.out" "$ROUND" <<'PY' >>"$RESULTS"
import re, sys
sysname, mode, pt, mt, load, hz, path, rnd = sys.argv[1:]
out = open(path).read()
def ms(s):
    for suf, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if s.endswith(suf): return float(s[: -len(suf)]) * f
    return float(s)
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)) if "Requests/sec" in out else 0.0
n = int(re.search(r"(\d+) requests in", out).group(1)) if "requests in" in out else 0
p50 = ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)) if " 50%" in out else float("nan")
p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)) if " 99%" in out else float("nan")
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
errs = sum(map(int, m.groups())) if m else 0
m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
errs += int(m.group(1)) if m else 0
per = lambda t: (int(t) * 1000.0 / int(hz)) / n * 1000 if n else float("nan")
print(f"{sysname}\t{mode}\t{rps:.0f}\t{p50:.3f}\t{p99:.3f}\t{per(pt):.3f}\t{per(mt):.3f}\t{errs}\t{load}\t{n}\t{rnd}")
PY
  tail -1 "$RESULTS" | awk -F'\t' '{printf "  %-9s %-6s %8s req/s p50 %7s ms p99 %7s ms  cpu/1k: proc %6s ms, machine %6s ms  errors %s  load %s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9}' >&2
}

# syscall_profile SYSTEM MODE [wrk args...]: system calls per request of the balancer process
# (all threads), counted by `strace -c -f` during a 3 s wrk run of the same mode
syscall_profile() {
  local sys=$1 mode=$2
  shift 2
  local u=URL_$sys p=PID_$sys st n
  [[ -n ${!p} ]] || return 0
  command -v strace >/dev/null || { echo "  syscalls: strace not installed" >&2; return 0; }
  strace -c -f -q -o "$WORK/strace.out" -p "${!p}" &
  st=$!
  sleep 0.5
  timeout 30 ip netns exec $CL wrk -d3s "$@" "${!u}" >"$WORK/wrk-strace.out" 2>&1 || true
  kill -INT "$st" 2>/dev/null || true
  wait "$st" 2>/dev/null || true
  n=$(grep -o '[0-9]* requests in' "$WORK/wrk-strace.out" | cut -d' ' -f1)
  [[ -s $WORK/strace.out ]] || { echo "  syscalls $sys $mode: strace counted nothing (attach refused?)" >&2; return 0; }
  awk -v n="${n:-0}" -v s="$sys" -v m="$mode" '
    $1 ~ /^[0-9.]+$/ && NF >= 5 {c = $4; name = $NF; if (name != "total") {calls[name] = c; tot += c}}
    END {
      if (!n) {print "  syscalls " s " " m ": no requests"; exit}
      line = sprintf("  syscalls %-9s %-6s %.2f per request:", s, m, tot / n)
      PROCINFO["sorted_in"] = "@val_num_desc"
      for (k in calls) if (calls[k] / n >= 0.01) line = line sprintf(" %s %.2f", k, calls[k] / n)
      print line
    }' "$WORK/strace.out" >&2
}

iperf_run() { # SYSTEM
  local s=$1 i=IPERF_$1 g
  g=$(timeout $((DURATION + 30)) ip netns exec $CL iperf3 -c "${!i%:*}" -p "${!i##*:}" -t "$DURATION" -f g 2>&1 |
    awk '/receiver/ {for (k = 1; k <= NF; k++) if ($k == "Gbits/sec") print $(k-1)}') || true
  printf '%s\tiperf3\t%s\t\t\t\t\t\t%s\t\n' "$s" "${g:-0}" "$(load1)" >>"$RESULTS"
  echo "  $s iperf3: ${g:-?} Gbit/s  load $(load1)" >&2
}

# each_wrk_mode FUNCTION SYSTEM: FUNCTION SYSTEM MODE WRK_ARGS... for every selected wrk mode
each_wrk_mode() {
  local f=$1 s=$2
  if has_mode keepalive; then "$f" "$s" keepalive -t1 -c"$CONNS"; fi
  if has_mode close; then "$f" "$s" close -t1 -c"$CONNS" -H 'Connection: close'; fi
  if has_mode "c$MANY"; then "$f" "$s" c$MANY -t2 -c"$MANY"; fi
}

for r in $(seq "$ROUNDS"); do
  ROUND=$r
  echo "round $r/$ROUNDS (load $(load1))" >&2
  order=("${SYSTEMS[@]}")
  if ((r % 2 == 0)); then
    # reverse the order every other round
    for ((k = ${#SYSTEMS[@]} - 1, j = 0; k >= 0; k--, j++)); do order[j]=${SYSTEMS[k]}; done
  fi
  for s in "${order[@]}"; do
    each_wrk_mode wrk_run "$s"
    if ((SYSCALLS)); then each_wrk_mode syscall_profile "$s"; fi
    if has_mode iperf3; then iperf_run "$s"; fi
  done
done

FAILS=$WORK/failure.tsv
: >"$FAILS"
if ((FAILURE)); then
  echo "failure: be2's nginx killed under load (wrk -t1 -c$CONNS -d${DURATION}s, kill at 3 s)" >&2
  fail_systems=(proxy2 uring2 haproxy2)
  ((IPVS)) && fail_systems+=(ipvs)
  ((KERNEL)) && fail_systems+=(kernel)
  for s in "${fail_systems[@]}"; do
    [[ -z $ONLY || " $ONLY " == *" $s "* ]] || continue
    u=URL_$s
    ip netns exec $CL wrk -t1 -c"$CONNS" -d"${DURATION}s" "${!u}" >"$WORK/fail-$s.out" 2>&1 &
    w=$!
    sleep 3
    kill_nginx "$(cat "$WORK/nginx-be2/nginx.pid")" || true
    wait "$w" || true
    python3 - "$s" "$WORK/fail-$s.out" "$(load1)" <<'PY' >>"$FAILS"
import re, sys
s, path, load = sys.argv[1:]
out = open(path).read()
n = int(re.search(r"(\d+) requests in", out).group(1)) if "requests in" in out else 0
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
sock = sum(map(int, m.groups())) if m else 0
m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
non2xx = int(m.group(1)) if m else 0
print(f"{s}\t{n}\t{non2xx}\t{sock}\t{load}")
PY
    tail -1 "$FAILS" | awk -F'\t' '{printf "  %-9s requests %s, non-2xx %s, socket errors %s (load %s)\n", $1, $2, $3, $4, $5}' >&2
    rm -f "$WORK/nginx-be2/nginx.pid"
    start_nginx $BE2 be2
    sleep 2 # health checks (100 ms) bring be2 back
  done
fi

python3 - "$RESULTS" "$FAILS" "$ROUNDS" "$DURATION" "$CONNS" "$MANY" "$DIAGS" <<'PY'
import math, statistics, sys
from collections import defaultdict
path, fails, rounds, dur, conns, many, diags = sys.argv[1:]
rows = defaultdict(lambda: defaultdict(list))
per_round = {}  # (system, mode, round) -> machine cpu/1k
loads = []
for line in open(path):
    f = line.rstrip("\n").split("\t")
    s, mode = f[0], f[1]
    if mode == "iperf3":
        rows[(s, mode)]["gbps"].append(float(f[2] or 0))
        continue
    for k, v in zip(("rps", "p50", "p99", "cpu", "mcpu", "err"), f[2:8]):
        rows[(s, mode)][k].append(float(v))
    loads.append(float(f[8]))
    per_round[(s, mode, f[10])] = float(f[6])
med = lambda s, m, k: statistics.median(rows[(s, m)][k]) if rows[(s, m)][k] else float("nan")
names = {"direct": "direct", "proxy1": "portico-epoll w1", "proxy2": "portico-epoll w2",
         "uring1": "portico-uring w1", "uring2": "portico-uring w2",
         "haproxy1": "haproxy nbthread 1", "haproxy2": "haproxy nbthread 2", "ipvs": "ipvs (rr, masq)",
         "kernel": "portico-kernel"}
ref = {"proxy1": "haproxy1", "proxy2": "haproxy2", "uring1": "haproxy1", "uring2": "haproxy2", "kernel": "haproxy2", "ipvs": "haproxy2"}
systems = [s for s in names if any(k[0] == s for k in rows)]
print(f"\nmedians of {rounds} rounds; wrk -d{dur}s --latency: keepalive -t1 -c{conns}, close -t1 -c{conns} "
      f"(Connection: close), c{many} -t2 -c{many}; iperf3 -t {dur} single stream")
if loads:
    print(f"load average (1 min) during the rows: min {min(loads):.2f}, median {statistics.median(loads):.2f}, max {max(loads):.2f}")
print("cpu/1k = CPU ms per 1,000 requests: proc = the balancer process's utime+stime, machine = /proc/stat busy delta (all processes, incl. wrk and nginx)")
print("x HA = ratio to HAProxy with the same threads (w1 vs nbthread 1, w2 / kernel / ipvs vs nbthread 2)\n")
modes = ["keepalive", "close", f"c{many}"]
hdr = f"{'system':<19} {'mode':<9} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'proc cpu/1k':>11} {'mach cpu/1k':>11} {'errors':>6} {'req/s xHA':>9} {'p99 xHA':>7} {'proc xHA':>8} {'mach xHA':>8}"
print(hdr); print("-" * len(hdr))
for s in systems:
    for m in modes:
        r = ref.get(s)
        x = lambda k: (med(s, m, k) / med(r, m, k)) if r and med(r, m, k) else float("nan")
        fmt = lambda v, w, p=2: f"{v:>{w}.{p}f}" if not math.isnan(v) else f"{'-':>{w}}"
        print(f"{names[s]:<19} {m:<9} {med(s, m, 'rps'):>8.0f} {fmt(med(s, m, 'p50'), 7)} {fmt(med(s, m, 'p99'), 7)} "
              f"{fmt(med(s, m, 'cpu') if s not in ('direct', 'ipvs') else float('nan'), 11)} {fmt(med(s, m, 'mcpu'), 11)} {med(s, m, 'err'):>6.0f} "
              f"{fmt(x('rps'), 9)} {fmt(x('p99'), 7)} {fmt(x('cpu') if s not in ('ipvs',) else float('nan'), 8)} {fmt(x('mcpu'), 8)}")
if any(rows[(s, "iperf3")]["gbps"] for s in systems):
    print()
    print(f"{'system':<19} {'iperf3 Gbit/s':>13}")
    for s in systems:
        print(f"{names[s]:<19} {med(s, 'iperf3', 'gbps'):>13.2f}")
# CPU a path adds per 1,000 requests over direct: the machine-wide busy delta per request of
# the row minus the same of the direct row of the same round and mode (wrk, nginx and the
# kernel's own work cost the same per request in both), median over rounds.
added = defaultdict(list)
for (s, m, r), v in per_round.items():
    d = per_round.get(("direct", m, r))
    if s != "direct" and d is not None and not math.isnan(v) and not math.isnan(d):
        added[(s, m)].append(v - d)
if added:
    print(f"\nadded cpu/1k = machine CPU ms per 1,000 requests minus direct's in the same round and mode (median of rounds); x HA as above")
    print(f"{'system':<19} " + " ".join(f"{m:>10}" for m in modes) + " " + " ".join(f"{m + ' xHA':>14}" for m in modes))
    amed = lambda s, m: statistics.median(added[(s, m)]) if added[(s, m)] else float("nan")
    for s in systems:
        if s == "direct":
            continue
        r = ref.get(s)
        vals = [amed(s, m) for m in modes]
        xs = [(amed(s, m) / amed(r, m)) if r and amed(r, m) and not math.isnan(amed(r, m)) else float("nan") for m in modes]
        f1 = lambda v, w: f"{v:>{w}.2f}" if not math.isnan(v) else f"{'-':>{w}}"
        print(f"{names[s]:<19} " + " ".join(f1(v, 10) for v in vals) + " " + " ".join(f1(x, 14) for x in xs))
dl = [l.rstrip("\n").split("\t") for l in open(diags)] if diags else []
if dl:
    print("\ndiagnostics per row (DIAG=1): conntrack -S deltas in the node, conntrack -C / nf_conntrack_max after the row, client TcpExtTCPSynRetrans delta, be1 TIME_WAIT sockets,")
    print("TCP segments the node sent per request (TcpOutSegs: the balancer's sockets, both sides) and retransmitted (TcpRetransSegs), backends' TcpExtPAWSTimewait delta")
    print(f"{'system':<19} {'mode':<9} {'ins_failed':>10} {'drop':>6} {'early_drop':>10} {'entries':>8} {'max':>7} {'SYN rtx':>7} {'be1 TW':>7} {'segs/req':>8} {'rtx':>6} {'PAWS TW':>7}")
    for s, m, a, b, c, n, mx, syn, tw, sg, rt, paws in dl:
        print(f"{names[s]:<19} {m:<9} {a:>10} {b:>6} {c:>10} {n:>8} {mx:>7} {syn:>7} {tw:>7} {sg:>8} {rt:>6} {paws:>7}")
fl = [l.rstrip("\n").split("\t") for l in open(fails)] if fails else []
if fl:
    print("\nfailure: be2's nginx killed (SIGKILL) 3 s into a wrk run; failed = non-2xx + socket errors")
    print(f"{'system':<19} {'requests':>9} {'non-2xx':>8} {'socket errors':>13} {'load':>5}")
    for s, n, a, b, load in fl:
        print(f"{names[s]:<19} {n:>9} {a:>8} {b:>13} {load:>5}")
PY
