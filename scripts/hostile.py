#!/usr/bin/env python3
"""Hostile and careless clients against a real Sourced binary, from outside (stdlib only).

Starts the binary on a loopback port with a fresh store (SQLite in a temporary directory, or a
fresh schema in the PostgreSQL database given with --postgres), sends what issue 14's attackers
sent, and prints one line per attack: what it expects, what came back, how long it took and the
server's resident memory afterwards. Exits 1 when any answer differs from what it expects.

    python3 scripts/hostile.py --bin target/release/sourced
    python3 scripts/hostile.py --bin target/release/sourced --postgres postgres://postgres@127.0.0.1:5432/test
    python3 scripts/hostile.py --bin target/release/sourced --tls

With --tls the server serves HTTPS with a certificate made by `openssl` for the run, every
attack goes over TLS, and attacks on the handshake itself are added.

CI runs it against the debug binary on both backends (statuses only: the timings there are a
debug build's). The figures in docs/benchmarks.md come from the release binary.
"""

import argparse
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
import warnings

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
    def __init__(self, binary, store_url, extra_env, tls=None):
        self.port = free_port()
        self.tls = tls  # an ssl.SSLContext trusting the server's certificate, or None
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
        if self.tls:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=self.tls)
        else:
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


def connect(s, timeout):
    """A socket to the server: TCP, or TLS over it (handshake done) when the server is TLS."""
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=timeout)
    return s.tls.wrap_socket(sock, server_hostname="127.0.0.1") if s.tls else sock


def read_until_closed(sock, deadline):
    """Reads until the server closes the socket or `deadline` passes: (closed, what came)."""
    got = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return False, got
        except OSError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def raw(s, payload, drip=None, wait=6.0):
    """Sends `payload` on a raw socket (then `drip` one byte a second, if given) and reads until the
    server closes or `wait` seconds pass. (status, {}, body): status 0 when it closed without a
    response, -1 when it was still open after `wait`."""
    sock = connect(s, wait)
    deadline = time.monotonic() + wait
    try:
        sock.sendall(payload)
        for b in drip or b"":
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
            try:
                sock.sendall(bytes([b]))
            except OSError:
                break
        closed, got = read_until_closed(sock, deadline)
        if not closed:
            return -1, {}, got
    finally:
        sock.close()
    if not got:
        return 0, {}, b""
    head, _, body = got.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, {}, body


def many_drippers(s, count=200, wait=8.0):
    """`count` sockets each sending one head byte a second; meanwhile a normal request must be
    answered; afterwards every socket must have been closed by the server. (status of the normal
    request, {}, b"<open sockets left>")."""
    socks = []
    for _ in range(count):
        sock = connect(s, 5)
        sock.setblocking(False)
        socks.append(sock)
    status, _, _ = 0, None, None
    closed = set()
    deadline = time.monotonic() + wait
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    i = 0
    while time.monotonic() < deadline and len(closed) < count:
        for n, sock in enumerate(socks):
            if n in closed:
                continue
            try:
                sock.send(head[i % len(head):i % len(head) + 1])
                if sock.recv(1) == b"":
                    closed.add(n)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except OSError:
                closed.add(n)
        if i == 1:
            status, _, _ = s.request("GET", "/healthz", timeout=5)
        i += 1
        time.sleep(1.0)
    for sock in socks:
        sock.close()
    return (status if len(closed) == count else -1), {}, f"{count - len(closed)} open".encode()


def timeouts(s):
    """Slow and idle clients (the server runs with 1.5 s timeouts)."""
    yield ("an idle socket is closed", 0, None, lambda: raw(s, b""))
    yield ("a partial head is closed", 0, None, lambda: raw(s, b"GET /healthz HTTP/1.1\r\nHo"))
    yield ("a head dripped a byte a second is closed", 0, None,
           lambda: raw(s, b"G", drip=b"ET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
    yield ("a slow body (1 of 100 bytes) gets 408", 408, "body-timeout",
           lambda: raw(s, b"PUT /slow/s1 HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                          b"content-length: 100\r\n\r\n{"))
    yield ("200 sockets dripping heads: /healthz answers, all closed", 200, None, lambda: many_drippers(s))
    yield ("a literal quote in the URL gets a problem", 400, "invalid-request",
           lambda: raw(s, b'GET /inj?qty="5" HTTP/1.1\r\nHost: x\r\n\r\n'))


def conditional(s):
    """RFC 9110 preconditions."""
    patch = '[{"op":"replace","path":"/a","value":2}]'
    jp = {"content-type": "application/json-patch+json"}
    yield ("setup: a document at version 1", 201, None, lambda: s.request("PUT", "/cond/c1", '{"a":1}'))
    yield ("If-Match W/\"1\" (weak never matches strongly)", 412, None,
           lambda: s.request("PATCH", "/cond/c1", patch, {**jp, "if-match": 'W/"1"'}))
    yield ("If-Match \"01\"", 412, None, lambda: s.request("PATCH", "/cond/c1", patch, {**jp, "if-match": '"01"'}))
    yield ("If-Match 1 (not an entity tag)", 400, None,
           lambda: s.request("PATCH", "/cond/c1", patch, {**jp, "if-match": "1"}))
    yield ("If-None-Match * on a PATCH of an existing document", 412, None,
           lambda: s.request("PATCH", "/cond/c1", patch, {**jp, "if-none-match": "*"}))
    yield ("If-Match \"7\", \"1\" (a list)", 200, None,
           lambda: s.request("PATCH", "/cond/c1", patch, {**jp, "if-match": '"7", "1"'}))
    yield ("If-None-Match \"2\" on GET", 304, None, lambda: s.request("GET", "/cond/c1", None, {"if-none-match": '"2"'}))
    yield ("POST /commands Prefer: return=minimal", 204, None, lambda: s.request("POST", "/commands", json.dumps(
        {"type": "create", "targetName": "cond", "targetId": "c2", "body": {}}), {"prefer": "return=minimal"}))
    yield ("setup: a create with an Idempotency-Key", 201, None,
           lambda: s.request("PUT", "/idem/i1", '{"a":1}', {"idempotency-key": "my-key-1"}))
    yield ("the key reused with other content names the key", 422, None,
           lambda: s.request("PUT", "/idem/i1", '{"a":2}', {"idempotency-key": "my-key-1"}))


def tcp(s, payload, wait=6.0):
    """Sends `payload` on a plain TCP socket (below TLS) and reads until the server closes or
    `wait` seconds pass: (0, {}, what came back) when it closed, (-1, ...) when still open."""
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=wait)
    try:
        sock.sendall(payload)
        closed, got = read_until_closed(sock, time.monotonic() + wait)
    finally:
        sock.close()
    return (0 if closed else -1), {}, got


def old_protocol(s):
    """A client that offers only TLS 1.1 or older: the handshake must fail (0), never succeed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        warnings.simplefilter("ignore", DeprecationWarning)  # offering them is the point
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        return 0, {}, b"this Python cannot even offer TLS 1.1"
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
    try:
        ctx.wrap_socket(sock).close()
    except (ssl.SSLError, OSError):
        return 0, {}, b""
    return 200, {}, b"handshake succeeded"


def untrusted(s):
    """A client that checks the certificate against the system's roots only: it must refuse."""
    ctx = ssl.create_default_context()
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
    try:
        ctx.wrap_socket(sock, server_hostname="127.0.0.1").close()
    except ssl.SSLCertVerificationError:
        return 0, {}, b""
    except (ssl.SSLError, OSError) as e:
        return -1, {}, str(e).encode()
    return 200, {}, b"trusted"


def tls_attacks(s):
    """The handshake itself (only with --tls)."""
    yield ("plain HTTP to the TLS port: closed, no HTTP answer", 0, None,
           lambda: tcp(s, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
    yield ("64 KiB of garbage instead of a ClientHello: closed", 0, None, lambda: tcp(s, os.urandom(65536)))
    yield ("a ClientHello cut short: closed at the timeout", 0, None,
           lambda: tcp(s, bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])))
    yield ("a record header claiming 16 MiB: closed", 0, None, lambda: tcp(s, bytes([0x16, 0x03, 0x03, 0xff, 0xff])))
    yield ("only TLS 1.0/1.1 offered: handshake refused", 0, None, lambda: old_protocol(s))
    yield ("a client trusting only the system's roots: refuses", 0, None, lambda: untrusted(s))
    yield ("after all that, /healthz over TLS", 200, None, lambda: s.request("GET", "/healthz", timeout=10))


def self_signed(tmp):
    """A certificate for 127.0.0.1 and localhost made with openssl, and a context trusting it."""
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"TLS_CERT": cert, "TLS_KEY": key}, ssl.create_default_context(cafile=cert)


def check_pointer(status, data):
    """The copy-from-missing problem must name /body/0/from."""
    _, body = problem(data)
    return body is not None and "/body/0/from" in json.dumps(body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/sourced")
    ap.add_argument("--postgres", help="a PostgreSQL URL; a fresh schema is created in it and dropped after")
    ap.add_argument("--tls", action="store_true", help="serve HTTPS (a certificate made for the run) and attack over TLS")
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

    timeouts_ms = {"IDLE_TIMEOUT_MS": "1500", "HEADER_READ_TIMEOUT_MS": "1500", "BODY_READ_TIMEOUT_MS": "1500"}
    tls_env, tls_ctx = self_signed(tmp) if args.tls else ({}, None)
    server = Server(args.bin, store_url, {**timeouts_ms, **tls_env}, tls=tls_ctx)
    failures = 0
    backend += " over TLS" if args.tls else ""
    print(f"backend: {backend}; binary: {args.bin}; pid {server.proc.pid}; RSS at start {rss_mb(server.proc.pid):.0f} MB")
    print(f"{'attack':<58} {'expected':<28} {'got':<28} {'ms':>8} {'RSS MB':>7}")
    try:
        extra = [*tls_attacks(server)] if args.tls else []
        for name, want_status, want_slug, send in [*attacks(server), *conditional(server), *timeouts(server), *extra]:
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
            if name.startswith("the key reused"):
                ok = ok and b"my-key-1" in data
            if server.proc.poll() is not None:
                ok = False
                slug = "the server exited"
            failures += 0 if ok else 1
            want = "closed" if want_status == 0 else f"{want_status} {want_slug or ''}".strip()
            got = f"{status} {slug or ''}".strip() if status >= 400 else {0: "closed", -1: "still open"}.get(status, str(status))
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
