#!/usr/bin/env bash
# What a fresh machine lacks: the wasm targets filters are built for.
set -euo pipefail
if command -v rustup >/dev/null 2>&1; then
  installed=$(rustup target list --installed)
  for t in wasm32-wasip2 wasm32-wasip1; do
    grep -qx "$t" <<<"$installed" || rustup target add "$t"
  done
fi
