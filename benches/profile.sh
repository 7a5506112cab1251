#!/usr/bin/env bash
# Where one proxied request's CPU goes: wxsidecar (one worker thread) in
# front of a canned nginx upstream (plain HTTP, or TLS with HTTP/1.1 or
# HTTP/2: the default path), wrk -t1 POSTing the
# template body, perf recording the sidecar. Prints requests/s, the
# sidecar's CPU µs per request (user and kernel, from /proc), and perf's
# top symbols (self time, µs per request).
#
# Usage: benches/profile.sh   (env: CONNS=64 DURATION=10 BIN=target/release/wxsidecar
#        UPSTREAM=plain|tls|h2 (tls: HTTP/1.1 over TLS; h2: HTTP/2 over TLS, the default config)
#        PERF=1 to record; OUT=dir keeps perf.data there; STRACE=1 counts
#        syscalls per request with strace -c; SYSCALLS=1 counts them with
#        perf's syscall tracepoints, which barely slow the run, for the
#        sidecar and for the canned upstream's worker: what our way of
#        talking to it costs there)
# Needs: a release build, nginx, wrk, perf, openssl (make install-bench-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-64}
DURATION=${DURATION:-10}
BIN=${BIN:-$PWD/target/release/wxsidecar}
PERF=${PERF:-1}
UPSTREAM=${UPSTREAM:-plain}
case $UPSTREAM in plain|tls|h2) ;; *) echo "UPSTREAM is plain, tls or h2" >&2; exit 2 ;; esac
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 2; }
dir=$(mktemp -d); OUT=${OUT:-$dir}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.2; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
UP=$(free_port); SC=$(free_port); SCA=$(free_port)
TOKEN=ACCESS_TOKEN_$(head -c 30 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40)
mkdir -p "$dir/up"
listen="listen 127.0.0.1:$UP;"; scheme=http; host=127.0.0.1; ca_line=""; http2=false
if [ "$UPSTREAM" != plain ]; then
  # A CA the sidecar trusts (cert.pem) and a leaf for localhost signed by it.
  . benches/certs.sh
  bench_certs "$dir"
  listen="listen 127.0.0.1:$UP ssl http2; ssl_certificate $dir/leaf.pem; ssl_certificate_key $dir/key.pem;"
  scheme=https; host=localhost; ca_line="  ca_file: $dir/cert.pem"
  [ "$UPSTREAM" = h2 ] && http2=true
fi
cat > "$dir/up/nginx.conf" <<EOF
worker_processes 1;
pid $dir/up/nginx.pid;
error_log $dir/up/error.log crit;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $dir/up;
  server {
    $listen
    default_type application/json;
    location = /cgi-bin/stable_token { return 200 '{"access_token":"$TOKEN","expires_in":7200}'; }
    location = /cgi-bin/message/template/send { return 200 '{"errcode":0,"errmsg":"ok","msgid":200228332}'; }
  }
}
EOF
nginx -c "$dir/up/nginx.conf" -g 'daemon off;' & UPPID=$!; pids+=($UPPID)
wait_port "$UP"
cat > "$dir/sc.yaml" <<EOF
listen: 127.0.0.1:$SC
admin_listen: 127.0.0.1:$SCA
threads: 1
upstream:
  url: $scheme://$host:$UP
$ca_line
  warm_connections: 16
  http2: $http2
accounts:
  - name: bench
    appid: wxbench000000001
    secret: bench-secret
EOF
RUST_LOG=warn "$BIN" run --config "$dir/sc.yaml" 2>"$dir/sc.log" & SCPID=$!; pids+=($SCPID)
for i in $(seq 100); do curl -sf "http://127.0.0.1:$SCA/readyz" >/dev/null && break; sleep 0.1; done
cat > "$dir/post.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"touser":"oUSER1234567890","template_id":"TPL_ORDER_SHIPPED_0001","url":"https://example.com/orders/1234","miniprogram":{"appid":"wx00000000000000aa","pagepath":"pages/order?id=1234"},"client_msg_id":"m-1234","data":{"first":{"value":"Your order has shipped"},"keyword1":{"value":"SF1234567890"},"keyword2":{"value":"2026-11-28 10:00"},"remark":{"value":"Thanks for shopping with us"}}}'
EOF
url="http://127.0.0.1:$SC/cgi-bin/message/template/send"
wrk -t1 -c"$CONNS" -d2 -s "$dir/post.lua" "$url" >/dev/null   # warm-up
read -r u0 s0 < <(awk '{print $14, $15}' /proc/$SCPID/stat)
if [ "$PERF" = 1 ]; then
  perf record -F ${FREQ:-500} --call-graph ${CALLGRAPH:-dwarf,16384} -o "$OUT/perf.data" -p "$SCPID" -- sleep "$DURATION" 2>/dev/null & PP=$!
fi
if [ "${STRACE:-0}" = 1 ]; then
  timeout -s INT $((DURATION + 1)) strace -c -f -p "$SCPID" -o "$OUT/strace.txt" 2>/dev/null & SP=$!
fi
if [ "${SYSCALLS:-0}" = 1 ]; then
  evs=$(for c in recvfrom sendto writev readv read write epoll_wait futex; do printf 'syscalls:sys_enter_%s,' $c; done)
  perf stat -x, -e "${evs%,}" -p "$SCPID" -o "$OUT/syscalls.txt" -- sleep "$DURATION" 2>/dev/null & YP=$!
  perf stat -x, -e "${evs%,}" -p "$(pgrep -P "$UPPID" | head -1)" -o "$OUT/up-syscalls.txt" -- sleep "$DURATION" 2>/dev/null & UYP=$!
fi
res=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$dir/post.lua" "$url")
[ "$PERF" = 1 ] && wait $PP || true
[ "${STRACE:-0}" = 1 ] && { wait $SP || true; }
[ "${SYSCALLS:-0}" = 1 ] && { wait $YP || true; wait $UYP || true; }
read -r u1 s1 < <(awk '{print $14, $15}' /proc/$SCPID/stat)
proto=$(curl -s "http://127.0.0.1:$SCA/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["upstream"]["hosts"][0]["protocol"])' 2>/dev/null || echo "?")
reqs=$(echo "$res" | awk '/requests in/ {print $1}')
rps=$(echo "$res" | awk '/Requests\/sec/ {print $2}')
non2xx=$(echo "$res" | awk '/Non-2xx/ {print $NF}')
hz=$(getconf CLK_TCK)
awk -v u=$((u1-u0)) -v s=$((s1-s0)) -v n="$reqs" -v hz="$hz" -v rps="$rps" -v bad="${non2xx:-0}" 'BEGIN {
  printf "upstream: '"$UPSTREAM ($proto)"'\nrequests/s %s  (non-2xx %s)\nCPU µs/request: user %.1f  kernel %.1f  total %.1f\n", rps, bad, u/hz*1e6/n, s/hz*1e6/n, (u+s)/hz*1e6/n }'
if [ "${STRACE:-0}" = 1 ]; then
  echo "syscalls per request (strace -c -f; strace slows the run, counts only):"
  awk -v n="$reqs" '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ && $NF != "total" { printf "  %-16s %.3f\n", $NF, $4 / n }' "$OUT/strace.txt" | sort -k2 -nr | head -12
fi
if [ "${SYSCALLS:-0}" = 1 ]; then
  for who in sidecar upstream; do
    f="$OUT/syscalls.txt"; [ $who = upstream ] && f="$OUT/up-syscalls.txt"
    echo "$who's syscalls per request (perf tracepoints):"
    awk -F, -v n="$reqs" '$3 ~ /sys_enter_/ { sub(/.*sys_enter_/, "", $3); if ($1 > 0) printf "  %-12s %.3f\n", $3, $1 / n }' "$f"
  done
fi
if [ "$PERF" = 1 ]; then
  echo "top symbols (self, % of samples):"
  perf report -i "$OUT/perf.data" --no-children --sort symbol --stdio 2>/dev/null | grep -E '^ +[0-9.]+%' | head -40
fi
