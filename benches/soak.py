#!/usr/bin/env python3
"""Soak and abuse harness for a release wxsidecar (`make soak`).

Runs, against the fake WeChat over TLS and a real redis-server, all on
loopback and bounded in time:
  - mixed traffic (template sends, token and ticket calls) from several
    keep-alive clients, each send with a unique client_msg_id;
  - token revocations at the fake every 20 s, connection resets (2 % before
    and 2 % after the send takes effect), one Redis restart halfway;
  - 10,000 idle app connections held for a while, then closed;
  - 200 slowloris connections (a header byte every second);
  - a POST /refresh storm on the admin listener.
and reports RSS and open file descriptors at start, peak and end, RSS per
idle connection and 60 s after they closed, slowloris connections closed
after the header timeout, refreshes the storm got through, and any request
lost (no answer) or sent twice (a client_msg_id WeChat saw twice).

Usage: benches/soak.py [--seconds 600] [--idle 10000] [--slow 200]
Needs target/release/wxsidecar and redis-server. Prints a Markdown report.
"""

import argparse
import http.client
import json
import os
import random
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "wxsidecar")
APPID, SECRET = "wx0123456789abcdef", "demo-secret-0123456789"
ADMIN_TOKEN = "soak-admin-token-0123456789"
HEADER_TIMEOUT = 10


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_for(cond, limit=30.0, what="condition"):
    end = time.time() + limit
    while time.time() < end:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


class Proc:
    """The sidecar's RSS and fd count, sampled."""

    def __init__(self, pid):
        self.pid = pid
        self.samples = []

    def rss_kib(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def fds(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def sample(self, label=""):
        s = (time.time(), self.rss_kib(), self.fds(), label)
        self.samples.append(s)
        return s


def call(port, method, path, body=None, headers=None, timeout=20):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--idle", type=int, default=10000)
    ap.add_argument("--slow", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    if not os.access(BIN, os.X_OK):
        raise SystemExit("build first: cargo build --release")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = args.idle + args.slow + 200
    if hard < need:
        raise SystemExit(f"open-file hard limit {hard} < {need}: lower --idle")

    tmp = tempfile.mkdtemp(prefix="wxsidecar-soak-")
    procs = []

    def stop_all(*_):
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *a: (stop_all(), sys.exit(1)))
    try:
        run(args, tmp, procs)
    finally:
        stop_all()


def run(args, tmp, procs):
    fport, rport = free_port(), free_port()
    port, admin = free_port(), free_port()
    ca = os.path.join(tmp, "ca.pem")
    faults = json.dumps({"seed": 7, "rules": [{
        "path": "/cgi-bin/message/template/send",
        "reset_before_rate": 0.02, "reset_after_rate": 0.02}]})
    fake = subprocess.Popen(
        [BIN, "fake-wechat", "--listen", f"127.0.0.1:{fport}", "--ca-out", ca,
         "--h2", "--ticket-quota", "100000", "--faults", faults],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(fake)
    redis = lambda: subprocess.Popen(
        ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rds = redis()
    procs.append(rds)
    wait_for(lambda: os.path.exists(ca), what="the fake's CA")
    ctx = ssl.create_default_context(cafile=ca)

    def fake_req(method, path):
        c = http.client.HTTPSConnection("localhost", fport, context=ctx, timeout=10)
        c.request(method, path)
        r = c.getresponse()
        data = r.read()
        c.close()
        return json.loads(data) if data else None

    wait_for(lambda: fake_req("GET", "/__fake/stats") is not None, what="the fake")
    config = os.path.join(tmp, "c.yaml")
    with open(config, "w") as f:
        f.write(f"""listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
admin:
  token: {ADMIN_TOKEN}
limits:
  header_timeout: {HEADER_TIMEOUT}s
upstream:
  url: https://localhost:{fport}
  ca_file: {ca}
token:
  store: redis://127.0.0.1:{rport}/0
  daily_budget: 200
accounts:
  - name: demo
    appid: {APPID}
    secret: {SECRET}
""")
    log = open(os.path.join(tmp, "side.log"), "w")
    side = subprocess.Popen([BIN, "run", "--config", config],
                            env={**os.environ, "RUST_LOG": "warn"}, stdout=log, stderr=log)
    procs.append(side)
    wait_for(lambda: call(admin, "GET", "/readyz")[0] == 200, what="the sidecar")
    proc = Proc(side.pid)
    time.sleep(1)
    start = proc.sample("start")
    stop = threading.Event()
    results = {"sent": 0, "answered": 0, "no_answer": 0, "status": {}}
    lock = threading.Lock()

    def sampler():
        while not stop.is_set():
            try:
                proc.sample()
            except OSError:
                return
            time.sleep(1)

    def traffic(n):
        conn = None
        i = 0
        while not stop.is_set():
            i += 1
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            pick = random.random()
            if pick < 0.8:
                body = json.dumps({"touser": f"oSOAK{n}", "template_id": "TPL",
                                   "client_msg_id": f"soak-{n}-{i}",
                                   "data": {"k": {"value": "v"}}})
                req = ("POST", "/cgi-bin/message/template/send", body)
            elif pick < 0.9:
                req = ("GET", f"/cgi-bin/token?grant_type=client_credential&appid={APPID}&secret={SECRET}", None)
            else:
                req = ("GET", "/cgi-bin/ticket/getticket?type=jsapi", None)
            with lock:
                results["sent"] += 1
            try:
                conn.request(*req[:2], body=req[2])
                r = conn.getresponse()
                r.read()
                with lock:
                    results["answered"] += 1
                    results["status"][r.status] = results["status"].get(r.status, 0) + 1
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                with lock:
                    results["no_answer"] += 1
                conn.close()
                conn = None

    threads = [threading.Thread(target=sampler, daemon=True)]
    threads += [threading.Thread(target=traffic, args=(n,), daemon=True)
                for n in range(args.clients)]
    for t in threads:
        t.start()
    t0 = time.time()
    deadline = t0 + args.seconds
    events = []

    # Revocations every 20 s, all along.
    def revoker():
        while not stop.wait(20):
            fake_req("POST", f"/__fake/invalidate?appid={APPID}")
            events.append("revoked")

    threading.Thread(target=revoker, daemon=True).start()

    # Idle connections: opened, held 60 s, closed; RSS per connection.
    time.sleep(min(10, args.seconds / 10))
    before_idle = proc.sample("before idle")
    # Each makes one request first: a kept-alive app connection, idle.
    idle = []
    token_req = (f"GET /cgi-bin/token?grant_type=client_credential&appid={APPID}"
                 f"&secret={SECRET} HTTP/1.1\r\nHost: x\r\n\r\n").encode()
    for _ in range(args.idle):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(token_req)
        idle.append(s)
    for s in idle:
        s.settimeout(10)
        try:
            s.recv(65536)
        except OSError:
            pass
    held_rss = proc.sample(f"{args.idle} connections open")
    time.sleep(2)
    held_rss = proc.sample(f"{args.idle} connections held")
    idle_open = sum(1 for s in idle if alive(s))
    for s in idle:
        s.close()
    idle = []
    time.sleep(60)
    after_idle = proc.sample("60 s after they closed")

    # Slowloris: a header byte every second.
    slow = []
    for _ in range(args.slow):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /cgi-bin/x HTTP/1.1\r\n")
        slow.append(s)
    slow_start = time.time()
    closed_at = {}
    while time.time() - slow_start < HEADER_TIMEOUT * 3 and len(closed_at) < len(slow):
        for i, s in enumerate(slow):
            if i in closed_at:
                continue
            try:
                s.sendall(b"X")
                if not alive(s):
                    closed_at[i] = time.time() - slow_start
            except OSError:
                closed_at[i] = time.time() - slow_start
        time.sleep(1)
    for s in slow:
        s.close()

    # Redis restart halfway.
    while time.time() < t0 + args.seconds / 2:
        time.sleep(1)
    rds.kill()
    rds.wait()
    time.sleep(3)
    rds2 = redis()
    procs.append(rds2)
    events.append("redis restarted")

    # Admin refresh storm.
    before = fetches(fake_req)
    storm = {}
    for _ in range(300):
        st, _ = call(admin, "POST", "/refresh?account=demo",
                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        storm[st] = storm.get(st, 0) + 1
    storm_fetches = fetches(fake_req) - before
    unauth = call(admin, "POST", "/refresh?account=demo")[0]

    while time.time() < deadline:
        time.sleep(1)
    stop.set()
    time.sleep(2)
    end = proc.sample("end")
    stats = fake_req("GET", "/__fake/stats")
    peak = max(proc.samples, key=lambda s: s[1])
    peak_fd = max(s[2] for s in proc.samples)
    per_conn = (held_rss[1] - before_idle[1]) / max(1, args.idle)
    closed = sorted(closed_at.values())
    report = f"""## Soak ({args.seconds} s, {args.clients} clients, {args.idle} idle, {args.slow} slowloris)

| what | value |
|---|---|
| RSS start / peak / end | {start[1]/1024:.1f} / {peak[1]/1024:.1f} / {end[1]/1024:.1f} MiB |
| open fds start / peak / end | {start[2]} / {peak_fd} / {end[2]} |
| RSS with {args.idle} idle connections | {before_idle[1]/1024:.1f} → {held_rss[1]/1024:.1f} MiB: **{per_conn:.1f} KiB per connection** ({idle_open} still open after 2 s) |
| RSS 60 s after they closed | {after_idle[1]/1024:.1f} MiB ({(after_idle[1]-before_idle[1])/1024:+.1f} MiB against before) |
| slowloris closed (of {args.slow}) | {len(closed)}, after {closed[0] if closed else 0:.1f}–{closed[-1] if closed else 0:.1f} s (header_timeout {HEADER_TIMEOUT} s) |
| admin refresh storm (300 POSTs) | answers {storm}; fetches it caused: {storm_fetches}; without the token: {unauth} |
| requests sent / answered / no answer | {results['sent']} / {results['answered']} / {results['no_answer']} |
| answers by status | {dict(sorted(results['status'].items()))} |
| messages at the fake / sent twice (same client_msg_id) | {stats['messages']} / {stats['duplicate_messages']} |
| revocations, events | {events.count('revoked')}, {[e for e in events if e != 'revoked']} |
"""
    print(report)
    ok = stats["duplicate_messages"] == 0 and results["no_answer"] == 0 and side.poll() is None
    sys.exit(0 if ok else 1)


def alive(s):
    """Whether the peer has not closed `s` (a non-blocking peek)."""
    s.setblocking(False)
    try:
        data = s.recv(1, socket.MSG_PEEK)
        return data != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


def fetches(fake_req):
    s = fake_req("GET", "/__fake/stats")
    return sum(s.get("token_fetches", {}).values()) + sum(s.get("stable_token_fetches", {}).values())


if __name__ == "__main__":
    main()
