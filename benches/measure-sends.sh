#!/usr/bin/env bash
# Sends N template messages through a release wxsidecar to the fake WeChat
# (TLS, loopback) and prints: token fetches and TLS handshakes the fake saw,
# the sidecar's upstream counters, and the sidecar's idle RSS before and after.
# Usage: benches/measure-sends.sh [N]   (default 1000; needs a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
BIN=target/release/wxsidecar
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 2; }
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$BIN" fake-wechat --listen 127.0.0.1:0 --ca-out "$dir/ca.pem" > "$dir/fake.out" 2>/dev/null &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$dir/fake.out" 2>/dev/null && break; sleep 0.05; done
fport=$(sed -n 's/.*:\([0-9]*\)$/\1/p' "$dir/fake.out" | head -1)
port=$(free_port); admin=$(free_port)
cat > "$dir/c.yaml" <<YAML
listen: 127.0.0.1:$port
admin_listen: 127.0.0.1:$admin
upstream:
  url: https://localhost:$fport
  ca_file: $dir/ca.pem
accounts:
  - name: demo
    appid: wx0123456789abcdef
    secret: demo-secret-0123456789
YAML
RUST_LOG=warn "$BIN" run --config "$dir/c.yaml" 2> "$dir/side.log" &
spid=$!
pids+=($spid)
for _ in $(seq 200); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.05; done
sleep 1
rss() { awk '/VmRSS/ {print $2" "$3}' "/proc/$spid/status"; }
rss_idle=$(rss)

# One curl process, keep-alive, one request at a time: like an app.
python3 - "$N" "$port" > "$dir/curl.cfg" <<'PY'
import sys
n, port = int(sys.argv[1]), sys.argv[2]
body = '{\\"touser\\":\\"oUSER123\\",\\"template_id\\":\\"TPL_ORDER\\",\\"data\\":{\\"status\\":{\\"value\\":\\"shipped\\"}}}'
entry = f'url = "http://127.0.0.1:{port}/cgi-bin/message/template/send"\ndata = "{body}"\noutput = /dev/null\nwrite-out = "%{{http_code}}\\n"'
print("\nnext\n".join([entry] * n))
PY
start=$(date +%s.%N)
curl -s -K "$dir/curl.cfg" > "$dir/codes"
end=$(date +%s.%N)
ok=$(grep -c '^200$' "$dir/codes" || true)
sleep 1
rss_after=$(rss)
stats=$(curl -s --cacert "$dir/ca.pem" "https://localhost:$fport/__fake/stats")
status=$(curl -s "http://127.0.0.1:$admin/status")
python3 - "$N" "$ok" "$start" "$end" "$rss_idle" "$rss_after" "$stats" "$status" <<'PY'
import json, sys
n, ok, start, end, rss_idle, rss_after, stats, status = sys.argv[1:]
s, st = json.loads(stats), json.loads(status)
print(f"sends: {n}, HTTP 200: {ok}, wall time {float(end)-float(start):.2f} s")
print(f"fake: messages {s['messages']}, token fetches {sum(s['token_fetches'].values()) + sum(s['stable_token_fetches'].values())}, "
      f"TLS handshakes {s['tls_handshakes']} (one is this script's stats call), invalid-token calls {s['invalid_token_calls']}")
u = st['upstream']['hosts'][0]
print(f"sidecar upstream: connections opened {u['connections_opened']}, reused {u['connections_reused']}, requests {u['requests']}")
print(f"sidecar RSS: idle {rss_idle}, after the sends {rss_after}")
PY
