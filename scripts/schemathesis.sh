#!/usr/bin/env bash
# Runs schemathesis (PyPI) against /openapi.json of the example order domain: every operation
# of the document gets generated requests (valid and invalid), and each reply must be no 5xx,
# have a listed status code and media type, and a body that validates against the document.
# Twice: with AUTH=none, then with AUTH=keys and rate limits on (the document then declares its
# security schemes and 401/403/429; schemathesis sends a key made here whose role may do
# everything, and its generated X-Tenant values meet 403s).
#
# Installs a pinned schemathesis into a virtualenv under target/ (ignored by git), builds and
# starts `sourced serve` on a free loopback port with the example order domain and a fresh SQLite
# database in a temporary directory, runs with a bounded budget, and stops the server.
#
# Settings (environment): SCHEMATHESIS_VENV (default target/schemathesis-venv),
# SCHEMATHESIS_MAX_EXAMPLES (default 50 per operation and phase), SCHEMATHESIS_SEED (default a fixed
# one, so CI is reproducible; "random" for a new one), SCHEMATHESIS_TIME_LIMIT_SECS (default 240 per
# pass: the run is killed beyond it and fails).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
venv="${SCHEMATHESIS_VENV:-target/schemathesis-venv}"
max_examples="${SCHEMATHESIS_MAX_EXAMPLES:-50}"
seed="${SCHEMATHESIS_SEED:-20261127}"
time_limit="${SCHEMATHESIS_TIME_LIMIT_SECS:-240}"

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "version $SCHEMATHESIS_VERSION\$"; then
    echo "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
"$venv/bin/schemathesis" --version

cargo build --quiet -p sourced-server --bin sourced
target_dir="${CARGO_TARGET_DIR:-target}"
sourced="$target_dir/debug/sourced"
python="$venv/bin/python"

work="$(mktemp -d)"
server=
stop() {
    if [ -n "$server" ]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    server=
}
trap 'stop; rm -rf "$work"' EXIT

# One pass: `sourced serve` with the settings given as NAME=VALUE arguments, then schemathesis
# with the headers in the array `headers`. Sets `status` to the pass's result.
pass() {
    local label="$1"
    shift
    local dir="$work/$label"
    mkdir -p "$dir"
    local port
    port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    env LISTEN="127.0.0.1:$port" EVENT_STORE_URL="sqlite://$dir/sourced.db" LOG_LEVEL=warn "$@" \
        "$sourced" serve >"$dir/server.log" 2>&1 &
    server=$!
    # Ready within 30 s, or fail with the server's log.
    for _ in $(seq 1 300); do
        if "$python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/healthz', timeout=1)" 2>/dev/null; then
            break
        fi
        if ! kill -0 "$server" 2>/dev/null; then
            echo "error: sourced exited before serving ($label):" >&2
            cat "$dir/server.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    local seed_args=(--seed "$seed")
    if [ "$seed" = random ]; then seed_args=(); fi
    local start
    start=$(date +%s)
    status=0
    echo "== schemathesis, $label"
    timeout --kill-after=10 "$time_limit" "$venv/bin/schemathesis" run "http://127.0.0.1:$port/openapi.json" \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
        --max-examples "$max_examples" "${seed_args[@]}" --workers 1 --request-timeout 10 \
        --suppress-health-check all --no-color "${headers[@]}" || status=$?
    echo "schemathesis $SCHEMATHESIS_VERSION ($label): exit $status after $(( $(date +%s) - start )) s"
    if grep -q "panicked" "$dir/server.log"; then
        echo "error: the server panicked ($label):" >&2
        grep -A5 "panicked" "$dir/server.log" >&2
        status=1
    fi
    stop
}

headers=()
pass auth-none ARTIFACTS=examples/order
overall=$status

# With authentication: the example set plus a permissions.yaml whose role may do everything,
# and one fresh key of that role in the keys file (stored as its SHA-256, as `sourced key new`
# writes it).
cp -r examples/order "$work/artifacts"
printf 'roles:\n  ops:\n    - {types: ["*"], actions: ["*"]}\n' >"$work/artifacts/permissions.yaml"
key="$("$python" -c 'import base64, secrets; print("sk_" + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("="))')"
hash="$("$python" -c 'import hashlib, sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest())' "$key")"
echo "- {hash: \"sha256:$hash\", principal: ops, tenant: default, roles: [ops]}" >"$work/keys.yaml"
headers=(-H "Authorization: Bearer $key")
pass auth-keys ARTIFACTS="$work/artifacts" AUTH=keys AUTH_KEYS_FILE="$work/keys.yaml" \
    RATE_LIMIT_PER_SEC=1000 RATE_LIMIT_BURST=1000
if [ "$status" -ne 0 ]; then overall=$status; fi
exit "$overall"
