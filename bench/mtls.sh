#!/usr/bin/env bash
# bench/mtls.sh: the cost of mesh mTLS between two sidecars.
#
#   oha → wasmesh A (outbound, plaintext listener) → [mTLS | plaintext] → wasmesh B
#       (inbound listener) → demo-upstream
#
# Three set-ups, measured in one run, interleaved over ROUNDS rounds (medians reported):
#   plain      A → B in plaintext, pooled connections
#   mtls       A → B over mTLS (TLS 1.3, ECDSA P-256 from `wasmesh ca`), pooled connections
#   handshake  mTLS with no connection reuse (max_idle_per_endpoint 0): every request is a
#              new TCP connection and a full TLS 1.3 handshake between A and B
# For each: saturation throughput (CONNS connections), p99 at a fixed RATE, and CPU time of
# both proxies per request; for `handshake`, handshakes per CPU-second of the two proxies
# (the handshake rate per core).
#
# Usage: bench/mtls.sh     Environment: DURATION [10] ROUNDS [3] RATE [1000] CONNS [32]
#                                       BUILD [1] OUT [bench/results/mtls.md] NICE [0]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
RATE=${RATE:-1000}
CONNS=${CONNS:-32}
BUILD=${BUILD:-1}
NICE=${NICE:-0}
OUT=${OUT:-$ROOT/bench/results/mtls.md}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
REL=$CARGO_TARGET_DIR/release

LOG_TAG=mtls
# shellcheck source=lib/common.sh
source "$ROOT/bench/lib/common.sh"
ticks() { # pids... → utime+stime ticks summed
    local t=0 p f
    for p in "$@"; do
        f=$(sed 's/.*) //' "/proc/$p/stat")
        t=$((t + $(awk '{print $12 + $13}' <<<"$f")))
    done
    echo "$t"
}

"$REL/wasmesh" ca init --dir "$TMP/ca" --force >/dev/null
"$REL/wasmesh" ca issue --dir "$TMP/ca" --spiffe-id spiffe://mesh.local/ns/bench/sa/a --out "$TMP/ca/a" >/dev/null
"$REL/wasmesh" ca issue --dir "$TMP/ca" --spiffe-id spiffe://mesh.local/ns/bench/sa/b --out "$TMP/ca/b" >/dev/null

UP=$(free_port)
nice -n "$NICE" "$REL/demo-upstream" --listen "127.0.0.1:$UP" --name up --body-size 128 >"$TMP/up.log" 2>&1 &
PIDS+=($!)
wait_line "$TMP/up.log" "listening on"

# One B with an mTLS listener and a plaintext one; one A per set-up.
B_TLS=$(free_port); B_PLAIN=$(free_port); B_ADMIN=$(free_port)
cat >"$TMP/b.json" <<EOF
{ "workers": 1, "admin": {"address": "127.0.0.1:$B_ADMIN"}, "access_log": {"enabled": false},
  "listeners": [
    {"name": "mtls", "address": "127.0.0.1:$B_TLS", "routes": [{"match": {"prefix": "/"}, "cluster": "up"}],
     "tls": {"mode": "strict", "cert": "$TMP/ca/b.crt", "key": "$TMP/ca/b.key", "trust_bundle": "$TMP/ca/ca.crt"}},
    {"name": "plain", "address": "127.0.0.1:$B_PLAIN", "routes": [{"match": {"prefix": "/"}, "cluster": "up"}]}],
  "clusters": [{"name": "up", "endpoints": [{"address": "127.0.0.1:$UP"}]}] }
EOF
nice -n "$NICE" "$REL/wasmesh" run "$TMP/b.json" >"$TMP/b.log" 2>&1 &
BPID=$!
PIDS+=($BPID)
wait_line "$TMP/b.log" "listener plain listening on"

declare -A APORT APID
for setup in plain mtls handshake; do
    port=$(free_port); admin=$(free_port)
    case $setup in
        plain) cl="{\"name\": \"b\", \"endpoints\": [{\"address\": \"127.0.0.1:$B_PLAIN\"}]}" ;;
        mtls|handshake)
            idle=''; [[ $setup == handshake ]] && idle=', "max_idle_per_endpoint": 0'
            cl="{\"name\": \"b\", \"endpoints\": [{\"address\": \"127.0.0.1:$B_TLS\"}]$idle,
                 \"tls\": {\"cert\": \"$TMP/ca/a.crt\", \"key\": \"$TMP/ca/a.key\", \"trust_bundle\": \"$TMP/ca/ca.crt\",
                           \"allowed_identities\": [\"spiffe://mesh.local/ns/bench/sa/b\"]}}" ;;
    esac
    cat >"$TMP/a-$setup.json" <<EOF
{ "workers": 1, "admin": {"address": "127.0.0.1:$admin"}, "access_log": {"enabled": false},
  "listeners": [{"name": "out", "address": "127.0.0.1:$port", "direction": "outbound",
                 "routes": [{"match": {"prefix": "/"}, "cluster": "b"}]}],
  "clusters": [$cl] }
EOF
    nice -n "$NICE" "$REL/wasmesh" run "$TMP/a-$setup.json" >"$TMP/a-$setup.log" 2>&1 &
    APID[$setup]=$!
    PIDS+=(${APID[$setup]})
    APORT[$setup]=$port
    wait_line "$TMP/a-$setup.log" "listener out listening on"
done

CLK=$(getconf CLK_TCK)
RESULTS=$TMP/results.jsonl
for round in $(seq 1 "$ROUNDS"); do
    for setup in plain mtls handshake; do
        for mode in sat rate; do
            args=(-z "${DURATION}s" -c "$CONNS" --no-tui --output-format json)
            [[ $mode == rate ]] && args+=(-q "$RATE")
            t0=$(ticks "${APID[$setup]}" "$BPID")
            nice -n "$NICE" "$OHA" "${args[@]}" "http://127.0.0.1:${APORT[$setup]}/" >"$TMP/oha.json" 2>/dev/null || true
            t1=$(ticks "${APID[$setup]}" "$BPID")
            python3 - "$setup" "$mode" "$round" "$TMP/oha.json" "$((t1 - t0))" "$CLK" >>"$RESULTS" <<'PY'
import json, sys
setup, mode, rnd, f, ticks, clk = sys.argv[1:7]
d = json.load(open(f))
codes = d.get("statusCodeDistribution") or {}
ok = int(codes.get("200", 0))
errors = sum(v for k, v in (d.get("errorDistribution") or {}).items() if k != "aborted due to deadline")
s = d.get("summary") or {}
p99 = ((d.get("latencyPercentiles") or {}).get("p99") or 0) * 1e3
cpu_s = int(ticks) / int(clk)
print(json.dumps({"setup": setup, "mode": mode, "round": int(rnd), "ok": ok, "errors": errors,
                  "rps": s.get("requestsPerSec") or 0, "p99_ms": p99,
                  "cpu_us_per_req": 1e6 * cpu_s / ok if ok else 0,
                  "per_cpu_s": ok / cpu_s if cpu_s else 0}))
PY
            log "round $round $setup $mode done"
        done
    done
done

python3 - "$RESULTS" "$DURATION" "$ROUNDS" "$RATE" "$CONNS" <<'PY' | tee "$OUT"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(setup, mode, key):
    xs = [r[key] for r in rows if r["setup"] == setup and r["mode"] == mode]
    return statistics.median(xs) if xs else 0.0
dur, rounds, rate, conns = sys.argv[2:6]
print("# mTLS between two sidecars\n")
print(f"oha → wasmesh A → wasmesh B → upstream, one worker each; {rounds} rounds × {dur} s, medians. "
      f"Saturation: {conns} connections; latency: {rate} req/s.\n")
print("| set-up | req/s (saturation) | vs plain | p99 at fixed rate (ms) | CPU of A+B per request (µs) | errors |")
print("|---|---|---|---|---|---|")
base = med("plain", "sat", "rps")
for s in ("plain", "mtls", "handshake"):
    rps = med(s, "sat", "rps")
    print(f"| {s} | {rps:,.0f} | {rps / base if base else 0:.2f}× | {med(s, 'rate', 'p99_ms'):.2f} | "
          f"{med(s, 'sat', 'cpu_us_per_req'):.1f} | {sum(r['errors'] for r in rows if r['setup'] == s)} |")
print(f"\nFull TLS 1.3 handshakes (ECDSA P-256, mutual) per CPU-second of the two proxies "
      f"(both ends of each handshake): {med('handshake', 'sat', 'per_cpu_s'):,.0f}.")
PY
