#!/usr/bin/env bash
# Run the demo: demo upstreams (v1 on 127.0.0.1:3000, v2 on 127.0.0.1:3001, a flaky one
# failing half its requests on 127.0.0.1:3002) and
# wasmesh in front of them on 127.0.0.1:8080 (admin on 127.0.0.1:9901), with a chain of
# WebAssembly filters (telemetry, rate limit, headers, canary, fault, jwt, authz) dropped
# into examples/demo/filters/. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build-filters.sh
cargo build --release -p wasmesh -p demo-upstream
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
# Filters are dropped into the manifest's filter_dir, as a user would.
mkdir -p examples/demo/filters
for f in telemetry ratelimit headers canary fault jwt authz; do
  cp "target/wasm32-wasip2/filter/$f.wasm" "examples/demo/filters/$f.wasm.tmp"
  mv "examples/demo/filters/$f.wasm.tmp" "examples/demo/filters/$f.wasm"
done
./target/release/demo-upstream --listen 127.0.0.1:3000 --name demo-v1 &
pids+=($!)
./target/release/demo-upstream --listen 127.0.0.1:3001 --name demo-v2 &
pids+=($!)
# A misbehaving endpoint: half its answers are 503 (retries and outlier detection hide it).
./target/release/demo-upstream --listen 127.0.0.1:3002 --name demo-flaky --fail-percent 50 &
pids+=($!)
./target/release/wasmesh run examples/demo/manifest.json &
pids+=($!)
for _ in $(seq 1 100); do
  curl -fsS http://127.0.0.1:9901/ready >/dev/null 2>&1 && break
  sleep 0.1
done
cat <<'TXT'

wasmesh demo is up
  proxy:    http://127.0.0.1:8080   (demo-v1 on 127.0.0.1:3000, demo-v2 on 127.0.0.1:3001)
  admin:    http://127.0.0.1:9901   (/ready /metrics /clusters /filters /config)

Routing:
  curl -i http://127.0.0.1:8080/healthz                    # direct response
  curl -i http://127.0.0.1:8080/docs                       # redirect
  curl -i http://127.0.0.1:8080/api/hello                  # proxied (prefix rewrite, headers filter)
Filters (README.md, "The demo" has more):
  for i in $(seq 8); do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:8080/api/x; done; echo
                                                            # ratelimit: 5 then 429 (1 token/s)
  curl -s -H 'x-canary: always' http://127.0.0.1:8080/api/x # canary: answered by demo-v2
  curl -i http://127.0.0.1:8080/flaky/x                     # fault: 503 half the time
  for i in $(seq 40); do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:8080/resilient/x; done; echo
                                                            # retries + outlier detection: all 200
  curl -s http://127.0.0.1:9901/clusters                    # demo-flaky (:3002) ejected
  curl -i http://127.0.0.1:8080/admin/x                     # jwt: 401 without a token
  curl -i -H "authorization: Bearer $ALICE" http://127.0.0.1:8080/admin/x   # jwt+authz: 200
  curl -s -H 'x-tenant: acme' http://127.0.0.1:8080/flaky/x >/dev/null; \
    curl -s http://127.0.0.1:9901/metrics | grep wasmesh_filter_tenant_requests_total
  (ALICE and BOB tokens: see README.md)

Ctrl-C to stop.
TXT
wait
