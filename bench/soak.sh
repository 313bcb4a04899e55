#!/usr/bin/env bash
# Soak: one `portico run` under mixed traffic for MINUTES (default 30), printing its resident
# memory, descriptors, threads and the errors seen every 30 s, so that a leak shows as a line
# that climbs. A script, not a test.
#
#   bench/soak.sh                  # 30 minutes
#   MINUTES=3 bench/soak.sh        # a short look
#
# Every 30 s: 5 s of wrk keep-alive and 5 s of `Connection: close` through the VIP (two nginx
# origins), a UDP burst from 2,000 source addresses (127.77.x.y, one datagram each: the
# spoofed-source flood of issue 9) beside one steady UDP client whose echo must keep coming,
# 200 DNS queries, and a reload (the file rewritten with another weight, then SIGHUP). Every
# minute one origin is stopped for 20 s. 100 slow clients hold connections to the VIP and to
# the admin port for the whole run, sending a byte every 10 s.
# Needs: nginx-light, wrk, dnsutils (dig), python3. Only 127.0.0.0/8 is used; every process
# started here is killed on exit.
set -euo pipefail

MINUTES=${MINUTES:-30}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PORTICO_BIN=${PORTICO_BIN:-$TARGET/release/portico}
for b in nginx wrk dig python3; do
  command -v "$b" >/dev/null || { echo "needs $b" >&2; exit 1; }
done
[[ -x $PORTICO_BIN ]] || (cd "$ROOT" && cargo build --release -p portico)

WORK=$(mktemp -d /tmp/portico-soak.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ -n ${O2PID:-} ]] && kill "$O2PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

O1=19081 O2=19082 ECHO=19083 VIP=127.0.0.30 WEB=19090 UDP=19091 DNS=19053 ADMIN=19440

nginx_conf() {
  local port=$1 d=$WORK/nginx-$1
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
  server { listen 127.0.0.1:$port backlog=4096; location / { return 200 "hello from $port\n"; } }
}
NGINX
}
nginx_conf $O1; nginx_conf $O2
nginx -c "$WORK/nginx-$O1/nginx.conf" -g 'daemon off;' & PIDS+=($!)
start_o2() { nginx -c "$WORK/nginx-$O2/nginx.conf" -g 'daemon off;' & O2PID=$!; }
start_o2

# UDP echo origin
python3 - "$ECHO" <<'PY' & PIDS+=($!)
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    d, a = s.recvfrom(2048)
    s.sendto(d, a)
PY

write_config() {
  cat >"$WORK/portico.yaml.new" <<YAML
admin: {listen: 127.0.0.1:$ADMIN}
dns:
  listen: 127.0.0.1:$DNS
  zones: [{name: soak.test}]
services:
  - name: web
    vips: [$VIP]
    ports: [{port: $WEB}]
    backends:
      - {name: o1, address: 127.0.0.1, port: $O1, weight: $1}
      - {name: o2, address: 127.0.0.1, port: $O2}
    health_check: {type: http, path: /, interval: 500ms}
  - name: udp
    vips: [$VIP]
    ports: [{port: $UDP, protocol: udp}]
    backends: [{name: echo, address: 127.0.0.1, port: $ECHO}]
    health_check: {type: none}
YAML
  mv "$WORK/portico.yaml.new" "$WORK/portico.yaml"
}
write_config 1
"$PORTICO_BIN" check --config "$WORK/portico.yaml" >/dev/null
"$PORTICO_BIN" run --config "$WORK/portico.yaml" >"$WORK/portico.log" 2>&1 &
PORTICO=$!
PIDS+=($PORTICO)
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

# slow clients: 100 to the VIP, 100 to the admin port, a byte every 10 s, for the whole run
python3 - "$VIP" "$WEB" "$ADMIN" "$((MINUTES * 60))" <<'PY' & PIDS+=($!)
import socket, sys, time
vip, web, admin, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
socks = []
for host, port in [(vip, web)] * 100 + [("127.0.0.1", admin)] * 100:
    try:
        s = socket.create_connection((host, port), timeout=2); socks.append(s)
    except OSError:
        pass
end = time.time() + secs
while time.time() < end:
    time.sleep(10)
    for s in list(socks):
        try: s.send(b"G")
        except OSError: socks.remove(s)
PY

# one steady UDP client: counts echoes it missed (printed in the summary)
python3 - "$VIP" "$UDP" "$((MINUTES * 60))" "$WORK/udp-steady" <<'PY' & PIDS+=($!)
import socket, sys, time
vip, port, secs, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); s.settimeout(0.5)
sent = lost = 0; end = time.time() + secs
while time.time() < end:
    sent += 1
    s.sendto(b"steady %d" % sent, (vip, port))
    try: s.recvfrom(2048)
    except OSError: lost += 1
    open(out, "w").write("%d %d\n" % (sent, lost))
    time.sleep(0.2)
PY

udp_flood() {
  python3 - "$VIP" "$UDP" <<'PY'
import socket, sys
vip, port = sys.argv[1], int(sys.argv[2])
n = 0
for i in range(2000):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.77.%d.%d" % (i // 250, 1 + i % 250), 0)); s.sendto(b"x", (vip, port)); n += 1
    except OSError:
        pass
    s.close()
PY
}

metric() { curl -fs "http://127.0.0.1:$ADMIN/metrics" 2>/dev/null | awk -v m="$1" '$1 ~ "^"m {s+=$2} END {print s+0}'; }

echo "soak: $MINUTES min, portico pid $PORTICO, machine load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%6s %8s %6s %7s %9s %9s %8s %9s %8s %6s %s\n' \
  time rss_kb fds threads wrk_req wrk_err dns_fail udp_lost reloads gen load
start=$(date +%s)
round=0
while (( $(date +%s) - start < MINUTES * 60 )); do
  t0=$(date +%s)
  round=$((round + 1))
  # a backend bounce: o2 down for 20 s at the start of every other round (once a minute)
  if (( round % 2 == 1 )) && [[ -n ${O2PID:-} ]]; then
    kill "$O2PID" 2>/dev/null || true; wait "$O2PID" 2>/dev/null || true; O2PID=
    ( sleep 20; ) & bounce=$!
  fi
  ka=$(wrk -t1 -c20 -d5s "http://$VIP:$WEB/" 2>&1 || true)
  cl=$(wrk -t1 -c20 -d5s -H 'Connection: close' "http://$VIP:$WEB/" 2>&1 || true)
  req=$(printf '%s\n%s\n' "$ka" "$cl" | awk '/requests in/ {s+=$1} END {print s+0}')
  err=$(printf '%s\n%s\n' "$ka" "$cl" | awk '/Socket errors/ {gsub(",",""); s+=$4+$6+$8+$10} /Non-2xx/ {s+=$NF} END {print s+0}')
  udp_flood
  dfail=0
  for _ in $(seq 200); do
    # a failure is no answer at all, or an answer without the VIP
    dig +time=1 +tries=1 @127.0.0.1 -p $DNS web.soak.test +short 2>/dev/null | grep -qx "$VIP" || dfail=$((dfail + 1))
  done
  write_config $(( (round % 3) + 1 ))
  kill -HUP "$PORTICO"
  if [[ -n ${bounce:-} ]]; then wait "$bounce" 2>/dev/null || true; bounce=; start_o2; fi
  # the rest of the 30 s
  while (( $(date +%s) - t0 < 30 )); do sleep 1; done
  kill -0 "$PORTICO" 2>/dev/null || { echo "portico exited"; tail -20 "$WORK/portico.log"; exit 1; }
  rss=$(awk '/VmRSS/ {print $2}' /proc/$PORTICO/status)
  thr=$(awk '/Threads/ {print $2}' /proc/$PORTICO/status)
  fds=$(ls /proc/$PORTICO/fd | wc -l)
  lost=$(cut -d' ' -f2 "$WORK/udp-steady" 2>/dev/null || echo 0)
  printf '%6s %8s %6s %7s %9s %9s %8s %9s %8s %6s %s\n' \
    "$(( $(date +%s) - start ))s" "$rss" "$fds" "$thr" "$req" "$err" "$dfail" "$lost" \
    "$(metric portico_config_reload_failures)" \
    "$(curl -fs "http://127.0.0.1:$ADMIN/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])' 2>/dev/null || echo '?')" \
    "$(cut -d' ' -f1 /proc/loadavg)"
done
echo "steady UDP client: sent/lost $(cat "$WORK/udp-steady")"
echo "refused/evicted by reason:"
curl -fs "http://127.0.0.1:$ADMIN/metrics" | grep -E '^portico_(lb_refused|lb_udp|admin_connections_closed|dns_tcp_rejected|lb_local_resource)' | grep -v ' 0$' || true
echo "panics in the log: $(grep -c panicked "$WORK/portico.log" || true); errors: $(grep -c ' ERROR ' "$WORK/portico.log" || true)"
