#!/usr/bin/env bash
# Proxy throughput and tail latency on loopback (issue 6, table B).
#
# Upstream: nginx answering the template-send and token paths with canned
# JSON (plain, then TLS). Contenders, each with a keep-alive pool to it:
# wxsidecar (injecting its token), nginx (proxy_pass + a static access_token),
# HAProxy (http-request set-query + a static access_token), and the direct
# path (no proxy) as the ceiling; over TLS also wxsidecar with
# `upstream.http2: true` (the upstream offers h2) and, its like for like,
# HAProxy on one thread talking HTTP/2 to the upstream (haproxy1-h2: nginx
# cannot proxy to an HTTP/2 upstream). wrk POSTs a template body at 1, 16, 64 and
# 256 connections; contenders alternate (A B C D, B C D A, ...: each block
# starts at the next one) and each cell is
# the median of RUNS runs. Each run is a block: every contender back to back,
# so "vs nginx" is the median of per-block ratios against nginx with one
# worker (nginx1; the box is noisy, only paired ratios mean anything). CPU is
# split into user and kernel µs per request; the upstream's own CPU per request
# shows what each contender's way of talking to it costs there. Prints Markdown.
#
# "wrk's CPU µs/req" is the load generator's own (GNU time). "sleeps/req" is
# how often the contender's threads went to sleep per request (voluntary
# context switches): each sleep costs whoever wakes it (wrk, the upstream) a
# cross-CPU wake-up; "box idle %" is the whole machine's idle share.
#
# Usage: benches/proxy_bench.sh   (env: DURATION=3 RUNS=3 CONNS="1 16 64 256" MODES="plain tls"
#        BASELINE_BIN=path/to/older/wxsidecar adds it as contender "baseline", same config:
#        before/after comparisons in the same blocks (BASELINE_HTTP2=true: with
#        `upstream.http2: true`, against wxsidecar-h2 over TLS); PIN=1 runs the upstream and
#        wrk on CPU 0 and each contender on CPU 1)
# Needs: a release build, nginx, haproxy, wrk, openssl (make bench installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-3}
RUNS=${RUNS:-3}
CONNS=${CONNS:-"1 16 64 256"}
MODES=${MODES:-"plain tls"}
BIN=$PWD/target/release/wxsidecar
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 2; }
for c in nginx haproxy wrk openssl; do command -v $c >/dev/null || { echo "missing $c (make bench installs it)" >&2; exit 2; }; done

dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.2; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
cpu_ticks() { local u=0 k=0; for p in "$@"; do [ -r /proc/$p/stat ] && read -r a b < <(awk '{print $14, $15}' /proc/$p/stat) && u=$((u + a)) && k=$((k + b)); done; echo "$u $k"; }
children() { pgrep -P "$1" | tr '\n' ' '; }
# Times the processes went to sleep (voluntary context switches, all threads):
# a proxy that sleeps often makes every request's sender pay a wake-up.
sleeps() { local v=0 t; for p in "$@"; do for t in /proc/$p/task/*/status; do v=$((v + $(awk '/^voluntary_ctxt/ {print $2}' "$t" 2>/dev/null || echo 0))); done; done; echo "$v"; }
# Idle and total jiffies of the whole box.
box_idle() { awk '/^cpu / {print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }
# PIN=1: the upstream and wrk on CPU 0, each contender on CPU 1 — the same
# placement for everyone, so the scheduler's choice drops out of the ratio.
PIN=${PIN:-}
pin() { [ -n "$PIN" ] || return 0; local cpu=$1; shift; for p in "$@"; do for t in /proc/$p/task/*; do taskset -pc "$cpu" "${t##*/}" >/dev/null 2>&1 || true; done; done; }

TOKEN=ACCESS_TOKEN_$(head -c 30 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40)
# A CA (cert.pem, what every client trusts) and a leaf for localhost signed by it.
. benches/certs.sh
bench_certs "$dir"

UP=$(free_port); UPT=$(free_port); NG=$(free_port); NG1=$(free_port); HA=$(free_port); SC=$(free_port); SCA=$(free_port)
SC2=$(free_port); SCA2=$(free_port); HA2=$(free_port); SC3=$(free_port); SCA3=$(free_port)
BASELINE_BIN=${BASELINE_BIN:-}

# The canned upstream: 1 worker, as fast as nginx gets.
mkdir -p "$dir/up" "$dir/ng"
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
    listen 127.0.0.1:$UP;
    listen 127.0.0.1:$UPT ssl http2;
    ssl_certificate $dir/leaf.pem;
    ssl_certificate_key $dir/key.pem;
    default_type application/json;
    location = /cgi-bin/stable_token { return 200 '{"access_token":"$TOKEN","expires_in":7200}'; }
    location = /cgi-bin/message/template/send { return 200 '{"errcode":0,"errmsg":"ok","msgid":200228332}'; }
  }
}
EOF
nginx -c "$dir/up/nginx.conf" -g 'daemon off;' & UPPID=$!; pids+=($UPPID)
wait_port "$UP"

start_contenders() { # $1 = plain|tls
  local scheme=http port=$UP ssl_line="" ha_ssl=""
  if [ "$1" = tls ]; then scheme=https; port=$UPT; fi
  cat > "$dir/ng/nginx.conf" <<EOF
worker_processes 2;
pid $dir/ng/nginx.pid;
error_log $dir/ng/error.log crit;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $dir/ng;
  upstream wechat { server 127.0.0.1:$port; keepalive 256; }
  server {
    listen 127.0.0.1:$NG;
    location / {
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host localhost;
      proxy_ssl_server_name on;
      proxy_ssl_name localhost;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate $dir/cert.pem;
      proxy_ssl_session_reuse on;
      proxy_pass $scheme://wechat\$uri?\$args&access_token=$TOKEN;
    }
  }
}
EOF
  nginx -c "$dir/ng/nginx.conf" -g 'daemon off;' & NGPID=$!; pids+=($NGPID)
  # The same with one worker: the per-request reference (one core's work).
  mkdir -p "$dir/ng1"
  sed -e 's/^worker_processes 2;/worker_processes 1;/' -e "s#$dir/ng/#$dir/ng1/#g" -e "s#$dir/ng;#$dir/ng1;#" \
    -e "s/listen 127.0.0.1:$NG;/listen 127.0.0.1:$NG1;/" "$dir/ng/nginx.conf" > "$dir/ng1/nginx.conf"
  nginx -c "$dir/ng1/nginx.conf" -g 'daemon off;' & NG1PID=$!; pids+=($NG1PID)
  [ "$1" = tls ] && ha_ssl="ssl verify required ca-file $dir/cert.pem sni str(localhost)"
  cat > "$dir/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn 4000
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:$HA
  http-request set-query %[query]&access_token=$TOKEN
  default_backend be
backend be
  server up 127.0.0.1:$port $ha_ssl
EOF
  haproxy -f "$dir/haproxy.cfg" -db & HAPID=$!; pids+=($HAPID)
  HA2PID=""
  if [ "$1" = tls ]; then
    # HTTP/2 to the upstream (ALPN h2), one thread: wxsidecar-h2's like.
    sed -e 's/^  nbthread 2$/  nbthread 1/' -e "s/127.0.0.1:$HA\$/127.0.0.1:$HA2/" \
      -e "s/^  server up .*/&  alpn h2/" "$dir/haproxy.cfg" > "$dir/haproxy2.cfg"
    haproxy -f "$dir/haproxy2.cfg" -db & HA2PID=$!; pids+=($HA2PID)
  fi
  cat > "$dir/sc.yaml" <<EOF
listen: 127.0.0.1:$SC
admin_listen: 127.0.0.1:$SCA
threads: ${SC_THREADS:-1}
upstream:
  url: $scheme://localhost:$port
  ca_file: $dir/cert.pem
  warm_connections: 16
  http2: false
accounts:
  - name: bench
    appid: wxbench000000001
    secret: bench-secret
EOF
  RUST_LOG=warn "$BIN" run --config "$dir/sc.yaml" 2>"$dir/sc.log" & SCPID=$!; pids+=($SCPID)
  SC3PID=""
  if [ -n "$BASELINE_BIN" ]; then
    sed -e "s/127.0.0.1:$SC\$/127.0.0.1:$SC3/" -e "s/127.0.0.1:$SCA\$/127.0.0.1:$SCA3/" \
      -e "s/^  http2: false\$/  http2: ${BASELINE_HTTP2:-false}/" "$dir/sc.yaml" > "$dir/sc3.yaml"
    RUST_LOG=warn "$BASELINE_BIN" run --config "$dir/sc3.yaml" 2>"$dir/sc3.log" & SC3PID=$!; pids+=($SC3PID)
  fi
  SC2PID=""
  if [ "$1" = tls ]; then
    sed -e "s/127.0.0.1:$SC\$/127.0.0.1:$SC2/" -e "s/127.0.0.1:$SCA\$/127.0.0.1:$SCA2/" \
      -e 's/^  http2: false$/  http2: true/' "$dir/sc.yaml" > "$dir/sc2.yaml"
    RUST_LOG=warn "$BIN" run --config "$dir/sc2.yaml" 2>"$dir/sc2.log" & SC2PID=$!; pids+=($SC2PID)
  fi
  wait_port "$NG"; wait_port "$NG1"; wait_port "$HA"; wait_port "$SC"; [ -z "$HA2PID" ] || wait_port "$HA2"
  for a in $SCA ${SC2PID:+$SCA2} ${SC3PID:+$SCA3}; do
    for i in $(seq 100); do curl -sf "http://127.0.0.1:$a/readyz" >/dev/null && break; sleep 0.1
      [ "$i" = 100 ] && { echo "wxsidecar never became ready:" >&2; cat "$dir"/sc*.log >&2; exit 1; }; done
  done
}
stop_contenders() { kill "$NGPID" "$NG1PID" "$HAPID" "$SCPID" $SC2PID $SC3PID $HA2PID 2>/dev/null || true; wait "$NGPID" "$NG1PID" "$HAPID" "$SCPID" $SC2PID $SC3PID $HA2PID 2>/dev/null || true; }

cat > "$dir/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"touser":"oUSER1234567890","template_id":"TPL_ORDER_SHIPPED_0001","url":"https://example.com/orders/1234","miniprogram":{"appid":"wx00000000000000aa","pagepath":"pages/order?id=1234"},"client_msg_id":"m-1234","data":{"first":{"value":"Your order has shipped"},"keyword1":{"value":"SF1234567890"},"keyword2":{"value":"2026-11-28 10:00"},"remark":{"value":"Thanks for shopping with us"}}}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %.3f %.3f %.3f %.3f %d\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency:percentile(99.9) / 1e3,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
EOF

# wrk's own CPU (GNU time, when installed): the load generator pays for the
# proxy's wake-ups too.
WRKTIME=""; [ -x /usr/bin/time ] && WRKTIME="/usr/bin/time -f %U_%S -o $dir/wrk.time"
results="$dir/results.txt"; : > "$results"
for mode in $MODES; do
  start_contenders "$mode"
  direct_port=$UP; [ "$mode" = tls ] && direct_port=""   # the TLS direct path is wrk over TLS
  rss_idle=$(awk '/VmRSS/ {print $2}' /proc/$SCPID/status)
  for run in $(seq "$RUNS"); do
    for c in $CONNS; do
      contenders="direct wxsidecar nginx1 nginx haproxy"; [ -n "$SC2PID" ] && contenders="$contenders wxsidecar-h2"
      [ -n "$SC3PID" ] && contenders="$contenders baseline"
      [ -n "$HA2PID" ] && contenders="$contenders haproxy1-h2"
      # Each block starts at another contender: no one always runs right
      # after the direct path (which leaves the upstream busiest) or first.
      order=($contenders); k=$(( (run - 1) % ${#order[@]} ))
      contenders="${order[*]:k} ${order[*]:0:k}"
      for who in $contenders; do
        case $who in
          direct) url="http://127.0.0.1:$UP"; [ "$mode" = tls ] && url="https://localhost:$UPT"; procs="" ;;
          wxsidecar) url="http://127.0.0.1:$SC"; procs="$SCPID" ;;
          wxsidecar-h2) url="http://127.0.0.1:$SC2"; procs="$SC2PID" ;;
          baseline) url="http://127.0.0.1:$SC3"; procs="$SC3PID" ;;
          nginx) url="http://127.0.0.1:$NG"; procs="$(children $NGPID)" ;;
          nginx1) url="http://127.0.0.1:$NG1"; procs="$(children $NG1PID)" ;;
          haproxy) url="http://127.0.0.1:$HA"; procs="$HAPID" ;;
          haproxy1-h2) url="http://127.0.0.1:$HA2"; procs="$HA2PID" ;;
        esac
        pin 0 $(children $UPPID); pin 1 $procs
        read -r bu bk < <(cpu_ticks $procs)
        read -r ubu ubk < <(cpu_ticks $(children $UPPID))
        s0=$(sleeps $procs); read -r i0 t0 < <(box_idle)
        line=$($WRKTIME ${PIN:+taskset -c 0} wrk -t1 -c"$c" -d"${DURATION}s" -s "$dir/post.lua" "$url/cgi-bin/message/template/send?foo=1" 2>/dev/null | grep '^RESULT' || echo "RESULT 0 1 0 0 0 1")
        read -r au ak < <(cpu_ticks $procs)
        read -r uau uak < <(cpu_ticks $(children $UPPID))
        s1=$(sleeps $procs); read -r i1 t1 < <(box_idle)
        wu=0; ws=0; [ -n "$WRKTIME" ] && IFS=_ read -r wu ws < "$dir/wrk.time"
        echo "$mode $who $c $run $line $((au - bu)) $((ak - bk)) $((uau - ubu + uak - ubk)) $((s1 - s0)) $(( (i1 - i0) * 1000 / (t1 - t0 + 1) )) $wu $ws" >> "$results"
      done
    done
  done
  rss_load=$(awk '/VmRSS/ {print $2}' /proc/$SCPID/status)
  reuse=$(curl -s "http://127.0.0.1:$SCA/metrics" | awk '/^wxsidecar_upstream_connections_total/ { if ($0 ~ /reused="true"/) r+=$NF; else n+=$NF } END { printf "%.4f", (r+n) ? r/(r+n) : 0 }')
  echo "META $mode $rss_idle $rss_load $reuse" >> "$results"
  # Connections each sidecar opened to the upstream over all the runs.
  for a in $SCA ${SC2PID:+$SCA2}; do
    curl -s "http://127.0.0.1:$a/status" | python3 -c 'import json,sys; h=json.load(sys.stdin)["upstream"]["hosts"][0]; print("CONNS", sys.argv[1], sys.argv[2], h["protocol"], h["connections_opened"], h["h2_connections_open"])' "$mode" "$a" >> "$results"
  done
  stop_contenders
done

python3 - "$results" "$(getconf CLK_TCK)" <<'PY'
import sys, statistics, collections
path, hz = sys.argv[1], int(sys.argv[2])
cells = collections.defaultdict(list)
meta = {}
conns = collections.defaultdict(list)
for line in open(path):
    f = line.split()
    if f[0] == "CONNS":
        conns[f[1]].append((f[3], int(f[4]), int(f[5])))
        continue
    if f[0] == "META":
        meta[f[1]] = (int(f[2]), int(f[3]), float(f[4]))
        continue
    mode, who, c, run = f[0], f[1], int(f[2]), int(f[3])
    reqs, secs, p50, p99, p999, errs = int(f[5]), float(f[6]), float(f[7]), float(f[8]), float(f[9]), int(f[10])
    user, kern = int(f[11]), int(f[12])
    # The canned upstream's own CPU per request: what this contender's way
    # of talking to it costs the upstream.
    upus = int(f[13]) / hz * 1e6 / reqs if reqs and len(f) > 13 else None
    cpu10k = ((user + kern) / hz) / reqs * 10000 if reqs and who != "direct" else None
    us = (user / hz * 1e6 / reqs, kern / hz * 1e6 / reqs) if reqs and who != "direct" else None
    # How often the contender slept per request, and the whole box's idle share.
    slp = int(f[14]) / reqs if reqs and len(f) > 14 and who != "direct" else None
    idle = int(f[15]) / 10 if len(f) > 15 else None
    wrk_us = (float(f[16]) + float(f[17])) * 1e6 / reqs if reqs and len(f) > 17 and float(f[16]) + float(f[17]) > 0 else None
    cells[(mode, who, c)].append((reqs / secs, p50, p99, p999, cpu10k, errs, us, run, upus, slp, idle, wrk_us))
med = lambda xs: statistics.median(xs) if xs else None
for mode in ["plain", "tls"]:
    if not any(k[0] == mode for k in cells):
        continue
    print(f"\n**Upstream over {'plain HTTP' if mode == 'plain' else 'TLS'}** (median of runs; wrk -t1, POST template body)\n")
    print("| conns | contender | req/s | p50 ms | p99 ms | p99.9 ms | CPU s / 10k req | CPU µs/req user + kernel | upstream's CPU µs/req | wrk's CPU µs/req | sleeps/req | box idle % | vs nginx1 (median of block ratios) | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in sorted({k[2] for k in cells if k[0] == mode}):
        ref = {r[7]: r[0] for r in cells[(mode, "nginx1", c)]}
        for who in ["direct", "wxsidecar", "baseline", "wxsidecar-h2", "haproxy1-h2", "nginx1", "nginx", "haproxy"]:
            rs = cells.get((mode, who, c), [])
            if not rs:
                continue
            rps = med([r[0] for r in rs]); cpu = [r[4] for r in rs if r[4] is not None]
            split = [r[6] for r in rs if r[6] is not None]
            ratios = [r[0] / ref[r[7]] for r in rs if ref.get(r[7])]
            shown = f"{med([u for u, _ in split]):.1f} + {med([k for _, k in split]):.1f}" if split else "—"
            ups = [r[8] for r in rs if r[8] is not None]
            up_shown = f"{med(ups):.1f}" if ups else "—"
            slps = [r[9] for r in rs if r[9] is not None]; idles = [r[10] for r in rs if r[10] is not None]
            wrks = [r[11] for r in rs if r[11] is not None]
            print(f"| {c} | {who} | {rps:,.0f} | {med([r[1] for r in rs]):.2f} | {med([r[2] for r in rs]):.2f} | "
                  f"{med([r[3] for r in rs]):.2f} | {('%.2f' % med(cpu)) if cpu else '—'} | {shown} | {up_shown} | "
                  f"{('%.1f' % med(wrks)) if wrks else '—'} | {('%.2f' % med(slps)) if slps else '—'} | {('%.0f' % med(idles)) if idles else '—'} | "
                  f"{('%.2f×' % med(ratios)) if ratios else '—'} | {sum(r[5] for r in rs)} |")
    for c in sorted({k[2] for k in cells if k[0] == mode}):
        base = {r[7]: r[0] for r in cells.get((mode, "baseline", c), [])}
        new = [r[0] / base[r[7]] for r in cells.get((mode, "wxsidecar", c), []) if base.get(r[7])]
        if new:
            print(f"\nwxsidecar vs baseline at {c} connections: {med(new):.2f}× (median of {len(new)} block ratios)")
    if mode in meta:
        idle, load, reuse = meta[mode]
        print(f"\nwxsidecar: RSS {idle/1024:.1f} MiB idle, {load/1024:.1f} MiB after the runs; upstream connection reuse ratio {reuse:.4f}")
    for proto, opened, h2open in conns.get(mode, []):
        print(f"\nwxsidecar upstream over {proto}: {opened} connections opened over all runs, {h2open} HTTP/2 connections open at the end")
PY
