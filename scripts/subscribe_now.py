#!/usr/bin/env python3
"""Issue 14, item 2: what subscriptions "after now" cost on a store with history.

Seeds a SQLite store with EVENTS events of about EVENT_BYTES each (one POST per event), restarts
the server (so nothing was committed since its start), then opens SUBSCRIBERS WebSocket
subscriptions with "after":"now" (and SSE streams with ?after=now) all at once, times a PUT sent
meanwhile, the time until every subscription is caught up, and the server's RSS (VmRSS, VmHWM).

    scripts/subscribe_now.py target/release/sourced [--events 19000] [--subscribers 64]

Standard library only (a minimal WebSocket client); prints one table row per phase.
"""

import argparse
import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def start(binary, db):
    env = {"LISTEN": "127.0.0.1:0", "EVENT_STORE_URL": f"sqlite://{db}", "LOG_FORMAT": "json",
           "LOG_LEVEL": "info", "PATH": os.environ.get("PATH", "")}
    proc = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        try:
            addr = json.loads(line).get("fields", {}).get("addr")
        except ValueError:
            continue
        if addr:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            host, port = addr.rsplit(":", 1)
            return proc, (host, int(port))
    raise SystemExit("sourced exited before listening")


def stop(proc):
    proc.send_signal(2)  # SIGINT: graceful
    proc.wait(timeout=60)


def request(addr, method, path, body=None):
    conn = http.client.HTTPConnection(*addr, timeout=120)
    data = None if body is None else json.dumps(body)
    conn.request(method, path, body=data, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    out = resp.read()
    conn.close()
    return resp.status, out


def seed(addr, events, event_bytes):
    pad = "x" * event_bytes

    def one(i):
        status, out = request(addr, "POST", "/order", {"id": f"o{i}", "pad": pad})
        assert status == 201, (status, out[:200])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(events)))


def rss_kib(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def ws_subscribe(addr, caught_up_s, i, t0):
    s = socket.create_connection(addr, timeout=120)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    assert buf.startswith(b"HTTP/1.1 101"), buf[:100]
    buf = buf.split(b"\r\n\r\n", 1)[1]
    payload = json.dumps({"op": "subscribe", "sub": "s", "after": "now"}).encode()
    mask = os.urandom(4)
    frame = bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[j % 4] for j, b in enumerate(payload))
    s.sendall(frame)
    while True:
        while len(buf) < 2:
            buf += s.recv(65536)
        n = buf[1] & 0x7F
        head = 2
        if n == 126:
            while len(buf) < 4:
                buf += s.recv(65536)
            n, head = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            while len(buf) < 10:
                buf += s.recv(65536)
            n, head = int.from_bytes(buf[2:10], "big"), 10
        while len(buf) < head + n:
            buf += s.recv(65536)
        text, buf = buf[head:head + n], buf[head + n:]
        if b"caught-up" in text:
            caught_up_s[i] = time.monotonic() - t0
            return s


def sse_subscribe(addr, caught_up_s, i, t0):
    s = socket.create_connection(addr, timeout=120)
    s.sendall(f"GET /events?after=now HTTP/1.0\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    buf = b""
    while b"caught-up" not in buf:
        chunk = s.recv(65536)
        assert chunk, buf[:200]
        buf += chunk
    caught_up_s[i] = time.monotonic() - t0
    return s


def phase(name, addr, pid, subscribe, subscribers):
    caught_up = [None] * subscribers
    t0 = time.monotonic()
    with ThreadPoolExecutor(subscribers + 1) as pool:
        futures = [pool.submit(subscribe, addr, caught_up, i, t0) for i in range(subscribers)]
        time.sleep(0.05)  # the subscriptions are starting: now a write
        p0 = time.monotonic()
        status, _ = request(addr, "PUT", "/order/put-" + name.split()[0] + str(int(time.time() * 1000)), {"during": name})
        put_ms = (time.monotonic() - p0) * 1000
        assert status in (200, 201), status
        sockets = [f.result() for f in futures]
    rss, hwm = rss_kib(pid)
    for s in sockets:
        s.close()
    print(f"| {name} | {subscribers} | {max(caught_up):.2f} | {put_ms:.1f} | {rss // 1024} | {hwm // 1024} |")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--events", type=int, default=19_000)
    ap.add_argument("--event-bytes", type=int, default=9_000)
    ap.add_argument("--subscribers", type=int, default=64)
    ap.add_argument("--sse", type=int, default=20)
    ap.add_argument("--dir")
    args = ap.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="subscribe-now-")
    db = os.path.join(work, "sourced.db")
    if not os.path.exists(db):
        proc, addr = start(args.binary, db)
        t = time.monotonic()
        seed(addr, args.events, args.event_bytes)
        print(f"seeded {args.events} events in {time.monotonic() - t:.1f} s", file=sys.stderr)
        stop(proc)
    sizes = {f: os.path.getsize(os.path.join(work, f)) // (1 << 20) for f in os.listdir(work)}
    print(f"files after a graceful stop (MiB): {sizes}")
    proc, addr = start(args.binary, db)
    p0 = time.monotonic()
    request(addr, "PUT", "/order/idle", {"idle": True})
    idle_ms = (time.monotonic() - p0) * 1000
    rss, _ = rss_kib(proc.pid)
    print(f"restarted: a PUT alone {idle_ms:.1f} ms, RSS {rss // 1024} MiB "
          "(note: this PUT commits, so the 'before' build knows its head from here on)")
    print("| phase | subscriptions | all caught up (s) | PUT meanwhile (ms) | RSS after (MiB) | RSS peak (MiB) |")
    print("|---|---|---|---|---|---|")
    stop(proc)
    # Fresh restarts: no commit since start when the subscriptions arrive.
    for name, subscribe, n in [("ws after=now", ws_subscribe, args.subscribers), ("sse after=now", sse_subscribe, args.sse)]:
        proc, addr = start(args.binary, db)
        phase(name, addr, proc.pid, subscribe, n)
        stop(proc)
    sizes = {f: os.path.getsize(os.path.join(work, f)) // (1 << 20) for f in os.listdir(work)}
    print(f"files after the last graceful stop (MiB): {sizes}")


if __name__ == "__main__":
    main()
