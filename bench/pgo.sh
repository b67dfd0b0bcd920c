#!/usr/bin/env bash
# bench/pgo.sh: build wasmesh with profile-guided optimization (PGO).
#
#   bench/pgo.sh        -> target/pgo/production/wasmesh
#
# 1. builds the `production` profile instrumented (-Cprofile-generate), in its own target
#    dir (the flags differ, so nothing is shared with the ordinary build);
# 2. trains it: the proxy with the benchmark's manifests (no filters; three filters; 100%
#    tracing; access logging to a file) serves the demo upstream over HTTP/1.1 and h2c for
#    TRAIN_SECS seconds each, then drains and exits, which writes the profile;
# 3. merges the profile (llvm-profdata, from rustup's llvm-tools component) and builds the
#    `production` profile again with -Cprofile-use.
#
# The training load is the benchmark's own kind of traffic, small requests over keep-alive
# connections: the profile tells the compiler which code is hot (to lay it out together
# and inline along it) and which is cold (error paths, TLS set-up, reloads). The figures
# of a PGO build are reported beside the ordinary build's, never instead of them.
#
# Environment: TRAIN_SECS [4]; PGO_DIR [$CARGO_TARGET_DIR/pgo, target/pgo] (PGO_GEN_DIR, PGO_DATA: where the
# instrumented build and its profile go, under PGO_DIR by default); INSTALL [1] (0: do not `rustup
# component add llvm-tools` nor `cargo install oha`).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TRAIN_SECS=${TRAIN_SECS:-4}
PGO_DIR=${PGO_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/pgo}
INSTALL=${INSTALL:-1}
GEN_DIR=${PGO_GEN_DIR:-$PGO_DIR/gen}
DATA=${PGO_DATA:-$PGO_DIR/data}
RELEASE=${CARGO_TARGET_DIR:-$ROOT/target}/release

log() { printf '[pgo] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$sysroot/lib/rustlib/$host/bin/llvm-profdata
if [[ ! -x $PROFDATA ]]; then
    [[ $INSTALL == 1 ]] || die "llvm-profdata missing: rustup component add llvm-tools"
    log "rustup component add llvm-tools"
    rustup component add llvm-tools >&2
fi
OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")
if [[ ! -x $OHA ]]; then
    [[ $INSTALL == 1 ]] || die "oha missing: cargo install oha"
    log "cargo install oha"
    cargo install oha --locked >&2
fi

log "building the filters, the demo upstream and the OTLP sink"
./scripts/setup.sh >&2
./scripts/build-filters.sh >&2
cargo build --release -p demo-upstream >&2
cargo build --release -p wasmesh-e2e --bin otlp-sink >&2

log "building the instrumented proxy (production profile, -Cprofile-generate)"
rm -rf "$DATA"
mkdir -p "$PGO_DIR" "$DATA"
CARGO_TARGET_DIR=$GEN_DIR RUSTFLAGS="-Cprofile-generate=$DATA" \
    cargo build --profile production -p wasmesh >&2

TMP=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_line() { # FILE PATTERN: wait for a process to print its address
    for _ in $(seq 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    die "no '$2' in $1"
}

"$RELEASE/demo-upstream" --listen 127.0.0.1:0 --name bench --body-size 128 --threads 1 \
    > "$TMP/upstream.out" 2>&1 &
pids+=($!)
wait_line "$TMP/upstream.out" 'listening on'
UPSTREAM=$(awk '/listening on/ {print $NF}' "$TMP/upstream.out")
"$RELEASE/otlp-sink" --listen 127.0.0.1:0 > "$TMP/otlp.out" 2>&1 &
pids+=($!)
wait_line "$TMP/otlp.out" 'listening on'
OTLP=$(awk '/listening on/ {print $NF}' "$TMP/otlp.out")

train() { # TEMPLATE [SED-EXPRESSION]
    local port admin m=$TMP/manifest.json
    port=$(free_port)
    admin=$(free_port)
    sed -e "${2:-}" -e "s|@PORT@|$port|g" -e "s|@H2_PORT@|$port|g" -e "s|@ADMIN_PORT@|$admin|g" \
        -e "s|@UPSTREAM@|$UPSTREAM|g" -e "s|@ROOT@|$ROOT|g" -e "s|@TMP@|$TMP|g" \
        -e "s|@OTLP@|$OTLP|g" -e "s|@USER_LINE@||g" \
        "$ROOT/bench/templates/$1" > "$m"
    log "training on $1 ${2:+($2)}"
    "$GEN_DIR/production/wasmesh" run "$m" > "$TMP/proxy.out" 2>&1 &
    local proxy=$!
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$admin/ready" > /dev/null 2>&1 && break
        sleep 0.1
    done
    curl -sf "http://127.0.0.1:$admin/ready" > /dev/null || die "proxy not ready: $(cat "$TMP/proxy.out")"
    "$OHA" --no-tui -z "${TRAIN_SECS}s" -c 64 "http://127.0.0.1:$port/" > /dev/null
    "$OHA" --no-tui --http2 -z "${TRAIN_SECS}s" -c 16 -p 4 "http://127.0.0.1:$port/" > /dev/null
    # A normal exit (drain, then exit 0) is what writes the profile.
    kill -TERM "$proxy"
    wait "$proxy" || die "the instrumented proxy did not exit cleanly"
}
train wasmesh.json
train wasmesh-filter3.json
train wasmesh-tracing.json
train wasmesh.json 's|"access_log": {"enabled": false}|"access_log": {"enabled": true, "path": "@TMP@/access.log"}|'

log "merging the profile"
"$PROFDATA" merge -o "$PGO_DIR/merged.profdata" "$DATA"

log "building the optimized proxy (production profile, -Cprofile-use)"
CARGO_TARGET_DIR=$PGO_DIR RUSTFLAGS="-Cprofile-use=$PGO_DIR/merged.profdata" \
    cargo build --profile production -p wasmesh >&2
log "done: $PGO_DIR/production/wasmesh"
