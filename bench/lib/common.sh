# Shared by bench/resilience.sh and bench/mtls.sh (sourced). Expects LOG_TAG, INSTALL, BUILD
# and CARGO_TARGET_DIR to be set; provides log, die, OHA, the release build, a temp dir
# whose processes (PIDS) are killed on exit, free_port and wait_line.

log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() { log "error: $*"; exit 1; }

OHA=$(command -v oha || true)
[[ -n $OHA ]] || { [[ -x $HOME/.cargo/bin/oha ]] && OHA=$HOME/.cargo/bin/oha; } || true
if [[ -z $OHA ]]; then
    [[ ${INSTALL:-1} == 1 ]] || die "oha is missing and INSTALL=0"
    log "cargo install oha --locked (takes a few minutes)"
    cargo install oha --locked >&2
    OHA=$HOME/.cargo/bin/oha
fi
if [[ ${BUILD:-1} == 1 ]]; then
    log "cargo build --release -p wasmesh -p demo-upstream"
    cargo build --release -p wasmesh -p demo-upstream >&2
fi

TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT

# A free loopback port.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_line FILE PATTERN: wait (up to 10 s) for a readiness line.
wait_line() {
    for _ in $(seq 1 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
    die "timed out waiting for '$2' in $1"
}
