#!/usr/bin/env bash
# Run the demo: a demo upstream on 127.0.0.1:3000 and wasmesh in front of it on
# 127.0.0.1:8080 (admin on 127.0.0.1:9901). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build-filters.sh
cargo build --release -p wasmesh -p demo-upstream
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
./target/release/demo-upstream --listen 127.0.0.1:3000 --name demo &
pids+=($!)
./target/release/wasmesh run examples/demo/manifest.json &
pids+=($!)
for _ in $(seq 1 100); do
  curl -fsS http://127.0.0.1:9901/ready >/dev/null 2>&1 && break
  sleep 0.1
done
cat <<'TXT'

wasmesh demo is up
  proxy:    http://127.0.0.1:8080   (in front of demo-upstream on 127.0.0.1:3000)
  admin:    http://127.0.0.1:9901   (/ready /metrics /clusters /filters /config)

Try:
  curl -i http://127.0.0.1:8080/api/hello
  curl -i http://127.0.0.1:8080/healthz
  curl -i http://127.0.0.1:8080/docs
  curl -s http://127.0.0.1:9901/metrics | grep wasmesh_requests_total

Ctrl-C to stop.
TXT
wait
