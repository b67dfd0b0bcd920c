#!/usr/bin/env bash
# Run every test: unit tests, filter-host tests and end-to-end tests against the real binary.
# Filters are built once for wasm32 and shared by all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build-filters.sh
cargo build -p wasmesh -p demo-upstream
cargo test "$@"
