#!/usr/bin/env bash
# The Python SDK suite: starts `stasis serve` on a free loopback port with a fresh data
# directory (MicroPython in its default image), creates API keys, runs pytest on
# tests/python, and stops the server. Installs nothing: it needs the built binary
# (`cargo build --release`), guests/build/micropython.wasm (`./guests/build.sh`) and
# `pip install -r tests/python/requirements.txt`. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."

bin="${STASIS_BIN:-target/release/stasis}"
micropython=guests/build/micropython.wasm
[ -x "$bin" ] || { echo "run.sh: $bin is missing: cargo build --release" >&2; exit 2; }
[ -f "$micropython" ] || { echo "run.sh: $micropython is missing: ./guests/build.sh" >&2; exit 2; }
python3 -c 'import tensorlake, pytest' 2>/dev/null \
    || { echo "run.sh: pip install -r tests/python/requirements.txt" >&2; exit 2; }

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        wait "$server_pid" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

data="$work/data"
mkdir -p "$work/image/bin"
cp "$micropython" "$work/image/bin/micropython.wasm"
"$bin" image add default "$work/image" --data-dir "$data"
export STASIS_NAMESPACE=sdk-tests STASIS_OTHER_NAMESPACE=sdk-other
STASIS_KEY="$("$bin" keys create --namespace "$STASIS_NAMESPACE" --data-dir "$data")"
STASIS_OTHER_KEY="$("$bin" keys create --namespace "$STASIS_OTHER_NAMESPACE" --data-dir "$data")"
export STASIS_KEY STASIS_OTHER_KEY

"$bin" serve --listen 127.0.0.1:0 --data-dir "$data" >"$work/stdout" 2>"$work/server.log" &
server_pid=$!
line=""
for _ in $(seq 600); do
    line="$(head -n 1 "$work/stdout" 2>/dev/null || true)"
    [ -n "$line" ] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$line" ]; then
    echo "run.sh: the server did not start:" >&2
    cat "$work/server.log" >&2
    exit 1
fi
STASIS_URL="${line#stasis: listening on }"
export STASIS_URL
echo "run.sh: stasis serve at $STASIS_URL (pid $server_pid)"

status=0
python3 -m pytest -q -p no:cacheprovider tests/python "$@" || status=$?
if [ "$status" -ne 0 ]; then
    echo "run.sh: server log:" >&2
    tail -n 50 "$work/server.log" >&2
fi
exit "$status"
