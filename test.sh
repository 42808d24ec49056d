#!/usr/bin/env bash
# Builds the guests and runs every test (unit, runtime integration, end to end).
# Needs the packages in guests/requirements.txt and tests/python/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")"
./guests/build.sh
cargo build --release --workspace
cargo test --release --workspace
# The official Tensorlake Python SDK against a real `stasis serve`.
./tests/python/run.sh
