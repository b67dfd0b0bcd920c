#!/usr/bin/env bash
# bench/resilience.sh: one of three endpoints fails 50% of its requests (at random).
# Clients send a fixed rate through wasmesh; the report shows, for each set-up, the
# success rate clients see, the p99 latency added against three healthy endpoints, and
# the share of all upstream attempts that still reached the bad endpoint.
#
# Set-ups: healthy (baseline: three good endpoints), none (no protection), retries
# (retry_on 5xx, 2 retries), outlier (outlier detection only), both.
#
# Usage: bench/resilience.sh               (RATE=1000 DURATION=15)
# Environment: RATE [1000] DURATION [15] CONNS [32] SETUPS ["healthy none retries outlier both"]
#              BUILD [1] INSTALL [1] OUT [bench/results/resilience.md] NICE [0]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RATE=${RATE:-1000}
DURATION=${DURATION:-15}
CONNS=${CONNS:-32}
SETUPS=${SETUPS:-"healthy none retries outlier both"}
BUILD=${BUILD:-1}
INSTALL=${INSTALL:-1}
NICE=${NICE:-0}
OUT=${OUT:-$ROOT/bench/results/resilience.md}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
REL=$CARGO_TARGET_DIR/release

LOG_TAG=resilience
# shellcheck source=lib/common.sh
source "$ROOT/bench/lib/common.sh"

start_upstream() { # name port fail_percent
    nice -n "$NICE" "$REL/demo-upstream" --listen "127.0.0.1:$2" --name "$1" --body-size 128 \
        --fail-percent "$3" >"$TMP/$1.log" 2>&1 &
    PIDS+=($!)
    wait_line "$TMP/$1.log" "listening on"
}

GOOD1=$(free_port); GOOD2=$(free_port); GOOD3=$(free_port); BAD=$(free_port)
start_upstream good1 "$GOOD1" 0
start_upstream good2 "$GOOD2" 0
start_upstream good3 "$GOOD3" 0
start_upstream bad "$BAD" 50

manifest() { # setup port admin_port
    local third=$BAD retry='' outlier=''
    [[ $1 == healthy ]] && third=$GOOD3
    case $1 in retries|both) retry=', "retry_policy": {"retry_on": "5xx", "num_retries": 2, "retry_back_off": {"base_interval": "5ms"}}' ;; esac
    case $1 in outlier|both) outlier=', "outlier_detection": {"consecutive_5xx": 3, "interval": "1s", "base_ejection_time": "30s", "max_ejection_percent": 50}' ;; esac
    cat <<EOF
{
  "workers": 1,
  "admin": {"address": "127.0.0.1:$3"},
  "access_log": {"enabled": false},
  "listeners": [{"name": "in", "address": "127.0.0.1:$2",
    "routes": [{"match": {"prefix": "/"}, "cluster": "svc"$retry}]}],
  "clusters": [{"name": "svc", "endpoints": [
    {"address": "127.0.0.1:$GOOD1"}, {"address": "127.0.0.1:$GOOD2"}, {"address": "127.0.0.1:$third"}]$outlier}]
}
EOF
}

RESULTS=$TMP/results.jsonl
for setup in $SETUPS; do
    port=$(free_port); admin=$(free_port)
    manifest "$setup" "$port" "$admin" >"$TMP/$setup.json"
    nice -n "$NICE" "$REL/wasmesh" run "$TMP/$setup.json" >"$TMP/$setup.log" 2>&1 &
    pid=$!
    PIDS+=($pid)
    wait_line "$TMP/$setup.log" "listener in listening on"
    log "$setup: $RATE req/s for ${DURATION}s"
    nice -n "$NICE" "$OHA" -z "${DURATION}s" -q "$RATE" -c "$CONNS" --no-tui --output-format json \
        "http://127.0.0.1:$port/" >"$TMP/$setup.oha.json" 2>/dev/null || true
    curl -s "http://127.0.0.1:$admin/clusters" >"$TMP/$setup.clusters.json" || echo '[]' >"$TMP/$setup.clusters.json"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    python3 - "$setup" "$TMP/$setup.oha.json" "$TMP/$setup.clusters.json" "$BAD" >>"$RESULTS" <<'PY'
import json, sys
setup, oha_file, clusters_file, bad = sys.argv[1:5]
d = json.load(open(oha_file))
codes = {str(k): v for k, v in (d.get("statusCodeDistribution") or {}).items()}
# oha aborts the requests in flight at the deadline: not a failure of the target.
errors = {k: v for k, v in (d.get("errorDistribution") or {}).items() if k != "aborted due to deadline"}
total = sum(codes.values()) + sum(errors.values())
ok = codes.get("200", 0)
p99 = ((d.get("latencyPercentiles") or {}).get("p99") or 0) * 1e3
c = json.load(open(clusters_file))
clusters = c if isinstance(c, list) else c.get("clusters", [])
eps = [e for cl in clusters for e in cl.get("endpoints", [])]
attempts = sum(e.get("total_requests", 0) for e in eps)
to_bad = sum(e.get("total_requests", 0) for e in eps if e.get("address", "").endswith(":" + bad))
print(json.dumps({"setup": setup, "requests": total, "ok": ok, "p99_ms": p99,
                  "attempts": attempts, "to_bad": to_bad}))
PY
done

python3 - "$RESULTS" "$RATE" "$DURATION" <<'PY' | tee "$OUT"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
base = next((r["p99_ms"] for r in rows if r["setup"] == "healthy"), None)
print(f"# Resilience: one of three endpoints failing 50% of requests\n")
print(f"{sys.argv[2]} req/s for {sys.argv[3]} s per set-up (oha, fixed rate), one wasmesh worker.\n")
print("| set-up | success | p99 (ms) | added p99 vs healthy (ms) | attempts to the bad endpoint |")
print("|---|---|---|---|---|")
for r in rows:
    succ = 100.0 * r["ok"] / r["requests"] if r["requests"] else 0.0
    added = f"{r['p99_ms'] - base:+.2f}" if base is not None and r["setup"] != "healthy" else "–"
    share = f"{100.0 * r['to_bad'] / r['attempts']:.2f}% ({r['to_bad']})" if r["attempts"] else "–"
    if r["setup"] == "healthy":
        share = "– (no bad endpoint)"
    print(f"| {r['setup']} | {succ:.3f}% | {r['p99_ms']:.2f} | {added} | {share} |")
PY
