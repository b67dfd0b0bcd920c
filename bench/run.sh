#!/usr/bin/env bash
# bench/run.sh: measure an upstream directly, through wasmesh, through nginx and through
# HAProxy, in one run, on one machine. See BENCHMARKS.md for the method.
#
# Usage: bench/run.sh                 full run (5 rounds x 10 s per measurement)
#        QUICK=1 bench/run.sh         smoke test (2 rounds x 3 s)
#
# Environment knobs (defaults in brackets):
#   QUICK [0]            1: REPEATS=2 DURATION=3 WARMUP=1 unless those are set
#   REPEATS [5]          interleaved rounds; the report shows the median
#   DURATION [10]        seconds per measurement
#   WARMUP [5]           seconds of warm-up load per scenario (HTTP/1.1, and HTTP/2 if H2=1)
#   SCENARIOS ["direct wasmesh nginx haproxy"]   columns, in this order
#   H2 [1]               0: skip the HTTP/2 saturation runs
#   CONNS [64]           oha connections (HTTP/1.1 saturation and fixed-rate runs)
#   H2_CONNS [16] H2_PARALLEL [4]   HTTP/2: connections x streams per connection
#   RATE [2000]          requests/s of the fixed-rate latency runs
#   BODY_SIZE [128]      bytes the upstream answers with
#   IDLE_CONNS [2000]    idle keep-alive connections opened at the end to measure each
#                        proxy's RSS per idle connection (0: skip)
#   PROXY_CPU [0] LOAD_CPU [1]      CPUs for the proxy, and for oha + the upstream
#   NICE [0]             e.g. -10 (root): run proxies, upstream and oha at that niceness so
#                        other work on a shared machine perturbs the figures less
#   OUT [bench/results/latest.md]   where the markdown report goes (also printed on stdout)
#   INSTALL [1] BUILD [1]           0: do not install missing tools / do not cargo build
#   KEEP_TMP [0]         1: keep the temp dir (configs, logs, raw oha JSON)
#
# Progress goes to stderr; the markdown report to stdout and $OUT.
# Exit status: 0, or 3 if a scenario could not be measured (the report says why).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
LIB=$BENCH/lib/benchlib.py

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    REPEATS=${REPEATS:-2} DURATION=${DURATION:-3} WARMUP=${WARMUP:-1}
else
    REPEATS=${REPEATS:-5} DURATION=${DURATION:-10} WARMUP=${WARMUP:-5}
fi
SCENARIOS=${SCENARIOS:-"direct wasmesh nginx haproxy"}
H2=${H2:-1}
CONNS=${CONNS:-64}
H2_CONNS=${H2_CONNS:-16}
H2_PARALLEL=${H2_PARALLEL:-4}
RATE=${RATE:-2000}
BODY_SIZE=${BODY_SIZE:-128}
IDLE_CONNS=${IDLE_CONNS:-2000}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
NICE=${NICE:-0}
OUT=${OUT:-$BENCH/results/latest.md}
INSTALL=${INSTALL:-1}
BUILD=${BUILD:-1}
KEEP_TMP=${KEEP_TMP:-0}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
RELEASE=$CARGO_TARGET_DIR/release
# wasmesh is measured as it is deployed: the `production` profile (fat LTO, see Cargo.toml).
PROXY_PROFILE=${PROXY_PROFILE:-production}
WASMESH_BIN=$CARGO_TARGET_DIR/$PROXY_PROFILE/wasmesh

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ------------------------------------------------------------------ scenarios
# A scenario is one column of the report: a name, a kind (direct, wasmesh, nginx,
# haproxy) and, for proxies, a config template. To add a column, e.g. wasmesh with one
# pass-through filter, write a manifest template and add a line:
#     scenario wasmesh-passthrough wasmesh "$BENCH/templates/wasmesh-passthrough.json"
# then run with SCENARIOS="direct wasmesh wasmesh-passthrough nginx haproxy".
# Templates may use @PORT@ @H2_PORT@ @ADMIN_PORT@ @UPSTREAM@ @TMP@ @ROOT@ @USER_LINE@.
declare -A KIND=() TEMPLATE=() PORT=() H2PORT=() PID=() SKIPPED=() ADMIN=() BIN=()
# scenario NAME KIND [TEMPLATE [BINARY]]: BINARY for wasmesh scenarios, $WASMESH_BIN by default.
scenario() { KIND[$1]=$2; TEMPLATE[$1]=${3:-}; BIN[$1]=${4:-$WASMESH_BIN}; }

scenario direct  direct
scenario wasmesh wasmesh "$BENCH/templates/wasmesh.json"
scenario nginx   nginx   "$BENCH/templates/nginx.conf"
scenario haproxy haproxy "$BENCH/templates/haproxy.cfg"
# wasmesh with WebAssembly filters: one pass-through filter, and a chain of three
# of reference filters (headers, ratelimit with a limit never reached, authz allowing all).
scenario wasmesh-filter1 wasmesh "$BENCH/templates/wasmesh-filter1.json"
scenario wasmesh-filter3 wasmesh "$BENCH/templates/wasmesh-filter3.json"
# wasmesh exporting every request's spans (100% sampling) over OTLP/gRPC to otlp-sink, a
# small collector that answers every export and counts its spans by walking the protobuf
# wire format (tests/src/bin/otlp-sink.rs): it shares the load CPU, and decoding every
# span into messages there took a quarter of that CPU from oha and the upstream. Compare
# with the plain `wasmesh` column; the dropped-span count is printed at the end of the run.
scenario wasmesh-tracing wasmesh "$BENCH/templates/wasmesh-tracing.json"
# The same with `tracing.compression: gzip` (otlp-sink decompresses each export).
scenario wasmesh-tracing-gzip wasmesh "$BENCH/templates/wasmesh-tracing-gzip.json"
# The same proxy built with profile-guided optimization (bench/pgo.sh, which trains it on
# this kind of traffic): reported beside the ordinary build, never instead of it.
PGO_BIN=${PGO_DIR:-$CARGO_TARGET_DIR/pgo}/production/wasmesh
scenario wasmesh-pgo wasmesh "$BENCH/templates/wasmesh.json" "$PGO_BIN"
scenario wasmesh-filter3-pgo wasmesh "$BENCH/templates/wasmesh-filter3.json" "$PGO_BIN"

read -r -a NAMES <<<"$SCENARIOS"
for n in "${NAMES[@]}"; do
    [[ -n ${KIND[$n]:-} ]] || die "unknown scenario '$n' (known: ${!KIND[*]})"
done
uses_kind() { local n; for n in "${NAMES[@]}"; do [[ ${KIND[$n]} == "$1" ]] && return 0; done; return 1; }
# Scenarios whose template exports spans need the OTLP sink.
uses_otlp() { local n; for n in "${NAMES[@]}"; do [[ -n ${TEMPLATE[$n]} ]] && grep -q '@OTLP@' "${TEMPLATE[$n]}" && return 0; done; return 1; }
skip() { SKIPPED[$1]=$2; log "SKIPPING $1: $2"; }

# ------------------------------------------------------------------ tools
SUDO=
[[ $EUID -eq 0 ]] || SUDO=sudo
APT_UPDATED=0
apt_install() {
    [[ $INSTALL == 1 ]] || die "$1 is missing and INSTALL=0"
    if [[ $APT_UPDATED == 0 ]]; then
        log "apt-get update"
        $SUDO apt-get update -qq >&2
        APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >&2
}

command -v python3 >/dev/null || die "python3 is required"
command -v taskset >/dev/null || apt_install util-linux
if uses_kind nginx && ! command -v nginx >/dev/null; then
    apt_install nginx-light || apt_install nginx
fi
if uses_kind haproxy && ! command -v haproxy >/dev/null; then
    apt_install haproxy
fi
OHA=$(command -v oha || true)
[[ -n $OHA ]] || { [[ -x $HOME/.cargo/bin/oha ]] && OHA=$HOME/.cargo/bin/oha; } || true
if [[ -z $OHA ]]; then
    [[ $INSTALL == 1 ]] || die "oha is missing and INSTALL=0"
    log "cargo install oha --locked (takes a few minutes)"
    cargo install oha --locked >&2
    OHA=$HOME/.cargo/bin/oha
fi
"$OHA" --help | grep -q -- '--output-format' || die "$OHA is too old: need --output-format json (oha >= 1.5)"

# ------------------------------------------------------------------ build
if [[ $BUILD == 1 ]]; then
    cd "$ROOT"
    if uses_kind wasmesh; then
        log "cargo build --profile $PROXY_PROFILE -p wasmesh; cargo build --release -p demo-upstream"
        if [[ " ${NAMES[*]} " == *" wasmesh-filter"* ]]; then
            log "scripts/build-filters.sh (filter scenarios)"
            "$ROOT/scripts/build-filters.sh" >&2 || die "scripts/build-filters.sh failed"
        fi
        if uses_otlp; then
            log "cargo build --release -p wasmesh-e2e --bin otlp-sink"
            cargo build --release -p wasmesh-e2e --bin otlp-sink >&2 || die "cannot build otlp-sink"
        fi
        cargo build --release -p demo-upstream >&2 || die "cannot build demo-upstream"
        if ! cargo build --profile "$PROXY_PROFILE" -p wasmesh >&2; then
            for n in "${NAMES[@]}"; do
                if [[ ${KIND[$n]} == wasmesh ]]; then skip "$n" "cargo build --profile $PROXY_PROFILE -p wasmesh failed"; fi
            done
        fi
        if [[ " ${NAMES[*]} " == *"-pgo "* ]]; then
            log "bench/pgo.sh (PGO scenarios; builds the proxy twice, about 20 minutes)"
            if ! INSTALL=$INSTALL "$BENCH/pgo.sh"; then
                for n in "${NAMES[@]}"; do
                    if [[ $n == *-pgo ]]; then skip "$n" "bench/pgo.sh failed"; fi
                done
            fi
        fi
    else
        log "cargo build --release -p demo-upstream"
        cargo build --release -p demo-upstream >&2
    fi
fi
[[ -x $RELEASE/demo-upstream ]] || die "$RELEASE/demo-upstream not found (BUILD=0?)"
for n in "${NAMES[@]}"; do
    if [[ ${KIND[$n]} == wasmesh && -z ${SKIPPED[$n]:-} && ! -x ${BIN[$n]} ]]; then
        skip "$n" "${BIN[$n]} not found"
    fi
done

# ------------------------------------------------------------------ environment
NCPU=$(nproc)
# Command prefixes (arrays, not functions, so `$!` is the process itself and `timeout` can
# run them): taskset execs the command.
ON_PROXY_CPU=()
ON_LOAD_CPU=()
if [[ $NICE != 0 ]]; then
    ON_PROXY_CPU=(nice -n "$NICE")
    ON_LOAD_CPU=(nice -n "$NICE")
fi
if ((NCPU < 2)); then
    log "only $NCPU CPU: no pinning"
    PIN_NOTE="not pinned (1 CPU)"
else
    ON_PROXY_CPU+=(taskset -c "$PROXY_CPU")
    ON_LOAD_CPU+=(taskset -c "$LOAD_CPU")
    PIN_NOTE="proxy on CPU $PROXY_CPU, oha and upstream on CPU $LOAD_CPU"
fi
[[ $NICE == 0 ]] || PIN_NOTE+="; niceness $NICE"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
CLK_TCK=$(getconf CLK_TCK)

TMP=$(mktemp -d "${TMPDIR:-/tmp}/wasmesh-bench.XXXXXX")
RAW=$TMP/raw
mkdir -p "$RAW"
RUNS=$TMP/runs.jsonl
MEM=$TMP/mem.jsonl
: >"$RUNS"
: >"$MEM"
STARTED=()   # pids we started, killed on exit

cleanup() {
    local p
    for p in "${STARTED[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${STARTED[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ $KEEP_TMP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_ports() { python3 "$LIB" free-ports "$1"; }

render() { # render TEMPLATE OUT NAME
    local user_line=""
    [[ $EUID -eq 0 ]] && user_line="user root root;"
    sed -e "s|@PORT@|${PORT[$3]}|g" -e "s|@H2_PORT@|${H2PORT[$3]}|g" \
        -e "s|@ADMIN_PORT@|${ADMIN_PORT:-0}|g" -e "s|@UPSTREAM@|$UPSTREAM|g" \
        -e "s|@TMP@|$TMP|g" -e "s|@OTLP@|${OTLP:-127.0.0.1:4317}|g" -e "s|@ROOT@|$ROOT|g" -e "s|@USER_LINE@|$user_line|g" \
        "$1" >"$2"
}

# ------------------------------------------------------------------ upstream
log "starting demo-upstream --body-size $BODY_SIZE --threads 1 on CPU $LOAD_CPU"
"${ON_LOAD_CPU[@]}" "$RELEASE/demo-upstream" --listen 127.0.0.1:0 --name bench \
    --body-size "$BODY_SIZE" --threads 1 >"$TMP/upstream.out" 2>&1 &
STARTED+=($!)
for _ in $(seq 100); do
    grep -q 'listening on' "$TMP/upstream.out" && break
    sleep 0.05
done
UPSTREAM=$(awk '/listening on/ {print $NF}' "$TMP/upstream.out")
[[ -n $UPSTREAM ]] || die "demo-upstream did not start: $(cat "$TMP/upstream.out")"
log "upstream at $UPSTREAM"

# The OTLP sink shares the load CPU with oha and the upstream: it is the collector a
# traced proxy would export to, not part of the proxy's cost.
OTLP=""
if uses_otlp; then
    [[ -x $RELEASE/otlp-sink ]] || die "$RELEASE/otlp-sink not found (BUILD=0?)"
    "${ON_LOAD_CPU[@]}" "$RELEASE/otlp-sink" --listen 127.0.0.1:0 >"$TMP/otlp-sink.out" 2>&1 &
    STARTED+=($!)
    for _ in $(seq 100); do
        grep -q 'listening on' "$TMP/otlp-sink.out" && break
        sleep 0.05
    done
    OTLP=$(awk '/listening on/ {print $NF}' "$TMP/otlp-sink.out")
    [[ -n $OTLP ]] || die "otlp-sink did not start: $(cat "$TMP/otlp-sink.out")"
    log "OTLP sink at $OTLP"
fi

# ------------------------------------------------------------------ proxies
# start_KIND NAME: start the scenario's process pinned to PROXY_CPU, set PORT, H2PORT
# and PID (empty for direct), wait until it serves. Return non-zero on failure.
start_direct() {
    PORT[$1]=${UPSTREAM##*:}
    H2PORT[$1]=${UPSTREAM##*:}
    PID[$1]=""
}

start_wasmesh() {
    local n=$1 ports cfg=$TMP/$1.json
    mapfile -t ports < <(free_ports 2)
    PORT[$n]=${ports[0]}
    H2PORT[$n]=${ports[0]}        # HTTP/1.1 and h2c on one port
    ADMIN_PORT=${ports[1]}
    ADMIN[$n]=$ADMIN_PORT
    render "${TEMPLATE[$n]}" "$cfg" "$n"
    "${ON_PROXY_CPU[@]}" "${BIN[$n]}" run "$cfg" >"$TMP/$n.log" 2>&1 &
    PID[$n]=$!
    STARTED+=("${PID[$n]}")
    python3 "$LIB" wait-http "http://127.0.0.1:$ADMIN_PORT/ready" 60 200 "${PID[$n]}" || return 1
}

start_nginx() {
    local n=$1 ports cfg=$TMP/$1.conf
    mapfile -t ports < <(free_ports 2)
    PORT[$n]=${ports[0]}
    H2PORT[$n]=${ports[1]}
    render "${TEMPLATE[$n]}" "$cfg" "$n"
    "${ON_PROXY_CPU[@]}" nginx -p "$TMP/" -e "$TMP/nginx-error.log" -c "$cfg" -g 'daemon off;' \
        >"$TMP/$n.log" 2>&1 &
    PID[$n]=$!
    STARTED+=("${PID[$n]}")
    python3 "$LIB" wait-http "http://127.0.0.1:${PORT[$n]}/" 20 200 "${PID[$n]}" || return 1
}

start_haproxy() {
    local n=$1 ports cfg=$TMP/$1.cfg
    mapfile -t ports < <(free_ports 2)
    PORT[$n]=${ports[0]}
    H2PORT[$n]=${ports[1]}
    render "${TEMPLATE[$n]}" "$cfg" "$n"
    "${ON_PROXY_CPU[@]}" haproxy -db -f "$cfg" >"$TMP/$n.log" 2>&1 &
    PID[$n]=$!
    STARTED+=("${PID[$n]}")
    python3 "$LIB" wait-http "http://127.0.0.1:${PORT[$n]}/" 20 200 "${PID[$n]}" || return 1
}

# oha_run OUTFILE ARGS... : one oha run pinned to LOAD_CPU, JSON to OUTFILE.
oha_run() {
    local out=$1; shift
    timeout $((DURATION + WARMUP + 60)) "${ON_LOAD_CPU[@]}" "$OHA" --no-tui --output-format json \
        --worker-threads 1 "$@" >"$out" 2>"$out.err"
}

# smoke N: a few requests over HTTP/1.1 (and h2c) must all get 200 with BODY_SIZE bytes.
smoke() {
    local n=$1
    python3 "$LIB" check "http://127.0.0.1:${PORT[$n]}/" "$BODY_SIZE" || return 1
    oha_run "$TMP/$n-smoke.json" -n 20 -c 2 "http://127.0.0.1:${PORT[$n]}/" || return 1
    python3 - "$TMP/$n-smoke.json" <<'EOF' || return 1
import json, sys
d = json.load(open(sys.argv[1]))
codes = d.get("statusCodeDistribution") or {}
sys.exit(0 if codes.get("200") == 20 else f"HTTP/1.1 smoke test: {codes} {d.get('errorDistribution')}")
EOF
    if [[ $H2 == 1 ]]; then
        oha_run "$TMP/$n-smoke2.json" --http2 -n 20 -c 1 -p 2 "http://127.0.0.1:${H2PORT[$n]}/" || return 1
        python3 - "$TMP/$n-smoke2.json" <<'EOF' || return 1
import json, sys
d = json.load(open(sys.argv[1]))
codes = d.get("statusCodeDistribution") or {}
sys.exit(0 if codes.get("200") == 20 else f"h2c smoke test: {codes} {d.get('errorDistribution')}")
EOF
    fi
}

MEASURED=()
for n in "${NAMES[@]}"; do
    [[ -z ${SKIPPED[$n]:-} ]] || continue
    log "starting $n (${KIND[$n]})"
    if ! "start_${KIND[$n]}" "$n" || ! smoke "$n"; then
        skip "$n" "did not start or failed the smoke test (log: $(tail -c 300 "$TMP/$n.log" 2>/dev/null | tr '\n' ' '))"
        if [[ -n ${PID[$n]:-} ]]; then kill -TERM "${PID[$n]}" 2>/dev/null || true; fi
        continue
    fi
    if [[ -n ${PID[$n]} ]]; then python3 "$LIB" mem-record "${PID[$n]}" "$n" start >>"$MEM"; fi
    MEASURED+=("$n")
done
((${#MEASURED[@]} > 0)) || die "nothing to measure"

# ------------------------------------------------------------------ measure
MODES=(h1)
if [[ $H2 == 1 ]]; then MODES+=(h2); fi
MODES+=(lat)

mode_args() { # mode_args NAME MODE SECONDS: the oha arguments of one run
    local n=$1 secs=$3
    case $2 in
    h1) echo "-c $CONNS -z ${secs}s http://127.0.0.1:${PORT[$n]}/" ;;
    h2) echo "--http2 -c $H2_CONNS -p $H2_PARALLEL -z ${secs}s http://127.0.0.1:${H2PORT[$n]}/" ;;
    lat) echo "-c $CONNS -q $RATE --latency-correction -z ${secs}s http://127.0.0.1:${PORT[$n]}/" ;;
    esac
}

# measure NAME MODE ROUND: one oha run, with the proxy's CPU time around it.
measure() {
    local n=$1 mode=$2 rnd=$3 out=$RAW/$1-$2-$3.json t0="" t1 ticks=- args
    read -r -a args <<<"$(mode_args "$n" "$mode" "$DURATION")"
    if [[ -n ${PID[$n]} ]]; then t0=$(python3 "$LIB" cpu-ticks "${PID[$n]}"); fi
    if ! oha_run "$out" "${args[@]}"; then
        log "oha failed for $n $mode round $rnd: $(head -c 300 "$out.err")"
        return 0
    fi
    if [[ -n $t0 ]]; then
        t1=$(python3 "$LIB" cpu-ticks "${PID[$n]}")
        ticks=$((t1 - t0))
    fi
    python3 "$LIB" record "$out" "$n" "$mode" "$rnd" "$ticks" "$CLK_TCK" >>"$RUNS"
    tail -n 1 "$RUNS" | python3 "$LIB" progress >&2
}

log "warm-up: ${WARMUP}s per scenario and protocol"
for n in "${MEASURED[@]}"; do
    for mode in h1 h2; do
        if [[ $mode == h2 && $H2 != 1 ]]; then continue; fi
        read -r -a args <<<"$(mode_args "$n" "$mode" "$WARMUP")"
        oha_run "$RAW/$n-warmup-$mode.json" "${args[@]}" || log "warm-up of $n $mode failed"
    done
done
sleep 2
for n in "${MEASURED[@]}"; do
    if [[ -n ${PID[$n]} ]]; then python3 "$LIB" mem-record "${PID[$n]}" "$n" idle >>"$MEM"; fi
done

SNAP0=$(python3 "$LIB" cpu-snapshot $$)
log "measuring: $REPEATS round(s) x ${#MODES[@]} modes x ${#MEASURED[@]} scenarios x ${DURATION}s"
for rnd in $(seq "$REPEATS"); do
    for mode in "${MODES[@]}"; do
        for n in "${MEASURED[@]}"; do
            measure "$n" "$mode" "$rnd"
            sleep 1
        done
    done
done
SNAP1=$(python3 "$LIB" cpu-snapshot $$)
FOREIGN=$(python3 "$LIB" foreign-cpu "$SNAP0" "$SNAP1" "$CLK_TCK")
log "other processes used ${FOREIGN}% of the machine's CPU during the measurements"

for n in "${MEASURED[@]}"; do
    if [[ -n ${PID[$n]} ]]; then python3 "$LIB" mem-record "${PID[$n]}" "$n" end >>"$MEM"; fi
done
# Memory per idle client connection: what a sidecar pays for the connections its clients'
# pools keep open.
if ((IDLE_CONNS > 0)); then
    for n in "${MEASURED[@]}"; do
        [[ -n ${PID[$n]} ]] || continue
        if python3 "$LIB" idle-conns "${PORT[$n]}" "${PID[$n]}" "$n" "$IDLE_CONNS" >"$TMP/$n-idle.json"; then
            cat "$TMP/$n-idle.json" >>"$MEM"
        else
            log "$n: idle-connection measurement failed"
        fi
        sleep 1
    done
fi
# Tracing scenarios: spans exported and dropped over the whole run (target: none dropped).
for n in "${MEASURED[@]}"; do
    if [[ -n ${ADMIN[$n]:-} ]] && grep -q '@OTLP@' "${TEMPLATE[$n]}"; then
        sleep 2   # the last batch leaves within batch_delay (1 s)
        python3 - "http://127.0.0.1:${ADMIN[$n]}/metrics" "$n" <<'EOF' >&2
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
v = {l.split()[0]: float(l.split()[1]) for l in text.splitlines()
     if l.startswith("wasmesh_tracing_spans_")}
print(f"[bench] {sys.argv[2]}: spans exported {v.get('wasmesh_tracing_spans_exported_total', 0):.0f}, "
      f"dropped {v.get('wasmesh_tracing_spans_dropped_total', 0):.0f}")
EOF
    fi
done

# ------------------------------------------------------------------ report
versions() {
    local v=()
    v+=("$(rustc --version 2>/dev/null | cut -d' ' -f1-2)")
    uses_kind wasmesh && v+=("wasmesh $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo uncommitted)")
    uses_kind nginx && v+=("$(nginx -v 2>&1 | sed 's/^nginx version: //')")
    uses_kind haproxy && v+=("haproxy $(haproxy -v 2>/dev/null | head -n1 | awk '{print $3}')")
    v+=("$("$OHA" --version)")
    local IFS=, joined
    joined="${v[*]}"
    echo "${joined//,/, }"
}
SKIPPED_JSON=$(for n in "${!SKIPPED[@]}"; do printf '%s\t%s\n' "$n" "${SKIPPED[$n]}"; done |
    python3 -c 'import json, sys; print(json.dumps(dict(l.rstrip("\n").split("\t", 1) for l in sys.stdin if l.strip())))')
CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || echo unknown)
META_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
META_MACHINE="$NCPU CPUs ($CPU_MODEL), Linux $(uname -r); $PIN_NOTE"
META_VERSIONS=$(versions)
META_SCENARIOS="${NAMES[*]}"
META_SKIPPED=$SKIPPED_JSON
export META_DATE META_MACHINE META_VERSIONS META_SCENARIOS META_SKIPPED FOREIGN \
    QUICK REPEATS DURATION CONNS H2_CONNS H2_PARALLEL RATE BODY_SIZE
python3 - >"$TMP/meta.json" <<'EOF'
import json, os
e = os.environ
print(json.dumps({
    "date": e["META_DATE"], "machine": e["META_MACHINE"], "versions": e["META_VERSIONS"],
    "scenarios": e["META_SCENARIOS"].split(), "skipped": json.loads(e["META_SKIPPED"]),
    "foreign_cpu_pct": float(e["FOREIGN"]), "quick": e["QUICK"] == "1",
    "repeats": int(e["REPEATS"]), "duration": int(e["DURATION"]), "conns": int(e["CONNS"]),
    "h2_conns": int(e["H2_CONNS"]), "h2_parallel": int(e["H2_PARALLEL"]),
    "rate": int(e["RATE"]), "body_size": int(e["BODY_SIZE"]),
}))
EOF

mkdir -p "$(dirname "$OUT")"
python3 "$LIB" report "$RUNS" "$MEM" "$TMP/meta.json" >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
cp "$RUNS" "${OUT%.md}-runs.jsonl"
cat "$OUT"
log "report written to $OUT (raw runs: ${OUT%.md}-runs.jsonl)"
((${#SKIPPED[@]} == 0)) || exit 3
