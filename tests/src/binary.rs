//! Where the `wasmesh` binary under test is.
//!
//! `env!("CARGO_BIN_EXE_wasmesh")` only exists inside the `wasmesh` package, so the harness
//! looks in the workspace's target directory (`CARGO_TARGET_DIR` respected) or takes
//! `WASMESH_BIN`. `cargo test` does not rebuild another package's binary, so, to never test
//! a stale proxy, the harness runs `cargo build -p wasmesh` once per test binary (a no-op
//! taking well under a second when `scripts/test.sh` has built it already; cargo does not
//! hold its build lock while tests run). `WASMESH_E2E_NO_BUILD=1` skips that build.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The path of the `wasmesh` binary, built (once per test process) if out of date.
pub fn wasmesh_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("WASMESH_BIN") {
            return PathBuf::from(p);
        }
        let bin = target_dir().join("debug").join("wasmesh");
        if std::env::var_os("WASMESH_E2E_NO_BUILD").is_none() || !bin.exists() {
            build(&bin);
        }
        bin
    })
    .clone()
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set (relative to the workspace root
/// when relative), else `target/`. The wasm filters are built under it too.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        None => workspace_root().join("target"),
    }
}

fn build(bin: &std::path::Path) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--quiet", "-p", "wasmesh"])
        .current_dir(workspace_root())
        .status();
    match status {
        Ok(s) if s.success() && bin.exists() => {}
        other => panic!(
            "cannot build the wasmesh binary ({other:?}); run `cargo build -p wasmesh` (or scripts/test.sh) first"
        ),
    }
}
