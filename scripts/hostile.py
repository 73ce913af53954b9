#!/usr/bin/env python3
"""Hostile and careless clients against a real Sourced binary, from outside (stdlib only).

Starts the binary on a loopback port with a fresh store (SQLite in a temporary directory, or a
fresh schema in the PostgreSQL database given with --postgres), sends what issue 14's attackers
sent, and prints one line per attack: what it expects, what came back, how long it took and the
server's resident memory afterwards. Exits 1 when any answer differs from what it expects.

    python3 scripts/hostile.py --bin target/release/sourced
    python3 scripts/hostile.py --bin target/release/sourced --postgres postgres://postgres@127.0.0.1:5432/test

CI runs it against the debug binary on both backends (statuses only: the timings there are a
debug build's). The figures in docs/benchmarks.md come from the release binary.
"""

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

PREFIX = "urn:sourced:problem:"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Server:
    def __init__(self, binary, store_url, extra_env):
        self.port = free_port()
        env = dict(os.environ)
        env.update({"EVENT_STORE_URL": store_url, "LISTEN": f"127.0.0.1:{self.port}", "RUST_LOG": "warn"})
        env.update(extra_env)
        self.proc = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(300):  # 30 s at most
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited at start: {self.proc.stderr.read().decode()}")
            try:
                status, _, _ = self.request("GET", "/healthz")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("the server did not answer /healthz within 30 s")

    def request(self, method, path, body=None, headers=None, timeout=120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            hdrs = dict(headers or {})
            if body is not None and not isinstance(body, bytes):
                body = body.encode()
            if body is not None:
                hdrs.setdefault("content-type", "application/json")
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), data
        finally:
            conn.close()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def problem(data):
    try:
        body = json.loads(data)
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    slug = body.get("type", "")
    return (slug[len(PREFIX):] if slug.startswith(PREFIX) else slug), body


def attacks(s):
    """(name, expected status, expected problem slug or None, callable returning (status, headers, data))."""
    big = {"id": "big", "a": [123] * 200_000}  # 800 KB, under the 1 MiB document limit
    copies = [{"op": "copy", "from": "/a", "path": "/b"}] + [
        {"op": "copy", "from": "/b", "path": f"/c{i}"} for i in range(999)
    ]
    yield ("setup: an 800 KB document with a 200 000-element array", 201, None,
           lambda: s.request("PUT", "/amp/big", json.dumps(big)))
    yield ("patch amplification: 1 000 copies of the array", 413, "document-too-large",
           lambda: s.request("PATCH", "/amp/big", json.dumps(copies),
                             {"content-type": "application/json-patch+json"}))
    yield ("the document is unchanged after the refused patch", 200, None,
           lambda: s.request("GET", "/amp/big"))
    yield ("body nested 100 000 deep", 422, "too-deep",
           lambda: s.request("PUT", "/deep/d1", "[" * 100_000 + "]" * 100_000))
    yield ("body nested 65 deep", 422, "too-deep",
           lambda: s.request("PUT", "/deep/d2", '{"a":' + "[" * 64 + "]" * 64 + "}"))
    yield ("a 30-digit integer", 422, "unstorable-value",
           lambda: s.request("PUT", "/num/n1", '{"a":123456789012345678901234567890}'))
    yield ("negative zero", 422, "unstorable-value",
           lambda: s.request("PUT", "/num/n2", '{"a":-0}'))
    yield ("a decimal with more digits than a double keeps", 422, "unstorable-value",
           lambda: s.request("PUT", "/num/n3", '{"a":0.12345678901234567890123}'))
    yield ("an exact large integer is kept", 201, None,
           lambda: s.request("PUT", "/num/n4", '{"a":18446744073709551615}'))
    yield ("duplicate member names", 400, "invalid-json",
           lambda: s.request("PUT", "/dup/d1", '{"a":1,"a":2}'))
    yield ("U+0000 in a string", 422, "unstorable-value",
           lambda: s.request("PUT", "/inj/nul1", '{"a":"a\\u0000b"}'))
    yield ("U+0000 in a member name", 422, "unstorable-value",
           lambda: s.request("PUT", "/inj/nul2", '{"a\\u0000":1}'))
    yield ("U+0000 in a command envelope", 422, "unstorable-value",
           lambda: s.request("POST", "/commands", json.dumps(
               {"type": "create", "aggregateType": "inj", "aggregateId": "nul3", "body": {"a": "x\u0000"}})))
    yield ("U+0000 in a list filter", 400, None,
           lambda: s.request("GET", "/inj?a=%22x%00%22"))
    yield ("lists of the type still answer", 200, None,
           lambda: s.request("GET", "/inj?sort=a"))
    yield ("id '..'", 400, None, lambda: s.request("PUT", "/ty/%2e%2e", "{}"))
    yield ("id '.'", 400, None, lambda: s.request("PUT", "/ty/%2e", "{}"))
    yield ("setup: a small document", 201, None, lambda: s.request("PUT", "/ptr/p1", '{"a":1}'))
    yield ("pointer with ~2", 400, None, lambda: s.request(
        "PATCH", "/ptr/p1", '[{"op":"add","path":"/a~2","value":1}]', {"content-type": "application/json-patch+json"}))
    yield ("copy from a missing member", 422, None, lambda: s.request(
        "PATCH", "/ptr/p1", '[{"op":"copy","from":"/nope","path":"/b"}]',
        {"content-type": "application/json-patch+json"}))


def check_pointer(status, data):
    """The copy-from-missing problem must name /body/0/from."""
    _, body = problem(data)
    return body is not None and "/body/0/from" in json.dumps(body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/sourced")
    ap.add_argument("--postgres", help="a PostgreSQL URL; a fresh schema is created in it and dropped after")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="sourced-hostile-")
    schema = None
    if args.postgres:
        schema = "hostile_" + uuid.uuid4().hex[:12]
        subprocess.run(["psql", args.postgres, "-qc", f"CREATE SCHEMA {schema}"], check=True)
        sep = "&" if "?" in args.postgres else "?"
        store_url = f"{args.postgres}{sep}options=-csearch_path%3D{schema}"
        backend = "postgres"
    else:
        store_url = f"sqlite://{tmp}/sourced.db"
        backend = "sqlite"

    server = Server(args.bin, store_url, {})
    failures = 0
    print(f"backend: {backend}; binary: {args.bin}; pid {server.proc.pid}; RSS at start {rss_mb(server.proc.pid):.0f} MB")
    print(f"{'attack':<58} {'expected':<28} {'got':<28} {'ms':>8} {'RSS MB':>7}")
    try:
        for name, want_status, want_slug, send in attacks(server):
            t0 = time.monotonic()
            try:
                status, _, data = send()
                slug, _ = problem(data)
            except OSError as e:
                status, slug, data = 0, f"error: {e}", b""
            ms = (time.monotonic() - t0) * 1000
            ok = status == want_status and (want_slug is None or slug == want_slug)
            if name.startswith("copy from a missing"):
                ok = ok and check_pointer(status, data)
            if server.proc.poll() is not None:
                ok = False
                slug = "the server exited"
            failures += 0 if ok else 1
            want = f"{want_status} {want_slug or ''}".strip()
            got = f"{status} {slug or ''}".strip() if status >= 400 else str(status)
            mark = "" if ok else "   <-- FAIL"
            print(f"{name[:58]:<58} {want:<28} {got[:28]:<28} {ms:8.1f} {rss_mb(server.proc.pid):7.0f}{mark}")
    finally:
        server.stop()
        if schema:
            quiet = dict(os.environ, PGOPTIONS="-c client_min_messages=warning")
            subprocess.run(["psql", args.postgres, "-qc", f"DROP SCHEMA {schema} CASCADE"], check=False, env=quiet)
    print(f"{failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
