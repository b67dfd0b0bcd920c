#!/usr/bin/env bash
# Build every filter crate under filters/ for wasm32-wasip2, once, with the `filter`
# profile (LTO, panic=abort, stripped). Output: target/wasm32-wasip2/filter/NAME.wasm
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
pkgs=()
for d in filters/*/; do
  [ -f "$d/Cargo.toml" ] || continue
  pkgs+=(-p "$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$d/Cargo.toml" | head -n1)")
done
[ ${#pkgs[@]} -eq 0 ] && exit 0
cargo build --profile filter --target wasm32-wasip2 "${pkgs[@]}"
