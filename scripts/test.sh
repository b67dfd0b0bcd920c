#!/usr/bin/env bash
# Run every test: unit tests, filter-host tests and end-to-end tests against the real binary.
# Filters are built once for wasm32 and shared by all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build-filters.sh
# One feature resolution for everything: `cargo build -p wasmesh` on its own resolves other
# features for shared dependencies than a workspace `cargo test` does (the test crate's
# dependencies turn some on) and would build wasmtime and friends a second time. So the
# binaries come from the same invocation shape as the tests, and the harness is told not to
# rebuild the proxy.
cargo build -p wasmesh -p demo-upstream -p wasmesh-e2e --all-targets
WASMESH_E2E_NO_BUILD=1 cargo test "$@"
# The filters' and the SDK's own unit tests (config parsing, token buckets, patterns), run
# natively: they are plain Rust apart from host calls, which only the proxy can answer.
filter_pkgs=(-p wasmesh-sdk)
for d in filters/*/; do
  [ -f "$d/Cargo.toml" ] || continue
  filter_pkgs+=(-p "$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$d/Cargo.toml" | head -n1)")
done
cargo test "${filter_pkgs[@]}" "$@"
