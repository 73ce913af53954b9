#!/usr/bin/env bash
# Runs schemathesis (PyPI) against /openapi.json of the example order domain: every operation
# of the document gets generated requests (valid and invalid), and each reply must be no 5xx,
# have a listed status code and media type, and a body that validates against the document.
#
# Installs a pinned schemathesis into a virtualenv under target/ (ignored by git), builds and
# starts `sourced serve` on a free loopback port with ARTIFACTS=examples/order and a fresh SQLite
# database in a temporary directory, runs with a bounded budget, and stops the server.
#
# Settings (environment): SCHEMATHESIS_VENV (default target/schemathesis-venv),
# SCHEMATHESIS_MAX_EXAMPLES (default 50 per operation and phase), SCHEMATHESIS_SEED (default a fixed
# one, so CI is reproducible; "random" for a new one), SCHEMATHESIS_TIME_LIMIT_SECS (default 240:
# the run is killed beyond it and fails).
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

work="$(mktemp -d)"
port="$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
LISTEN="127.0.0.1:$port" EVENT_STORE_URL="sqlite://$work/sourced.db" ARTIFACTS=examples/order \
    LOG_LEVEL=warn "$sourced" serve >"$work/server.log" 2>&1 &
server=$!
stop() {
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -rf "$work"
}
trap stop EXIT

# Ready within 30 s, or fail with the server's log.
for _ in $(seq 1 300); do
    if "$venv/bin/python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/healthz', timeout=1)" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$server" 2>/dev/null; then
        echo "error: sourced exited before serving:" >&2
        cat "$work/server.log" >&2
        exit 1
    fi
    sleep 0.1
done

seed_args=(--seed "$seed")
if [ "$seed" = random ]; then seed_args=(); fi
start=$(date +%s)
status=0
timeout --kill-after=10 "$time_limit" "$venv/bin/schemathesis" run "http://127.0.0.1:$port/openapi.json" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
    --max-examples "$max_examples" "${seed_args[@]}" --workers 1 --request-timeout 10 \
    --suppress-health-check all --no-color || status=$?
echo "schemathesis $SCHEMATHESIS_VERSION: exit $status after $(( $(date +%s) - start )) s"
if grep -q "panicked" "$work/server.log"; then
    echo "error: the server panicked:" >&2
    grep -A5 "panicked" "$work/server.log" >&2
    status=1
fi
exit "$status"
