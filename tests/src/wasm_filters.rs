//! The filters under `filters/`, built for `wasm32-wasip2` (profile `filter`) once per test
//! process, and copied into a fresh directory per test for the proxy's `filter_dir` (so a
//! test's hot-swaps and a concurrent build of the workspace never meet).
//!
//! `WASMESH_E2E_NO_BUILD=1` skips the build (the files must already be in
//! `target/wasm32-wasip2/filter/`, e.g. from `scripts/build-filters.sh`).

use std::path::PathBuf;
use std::sync::Mutex;

/// Where `scripts/build-filters.sh` puts the components. Also used by the proxy crate's
/// filter-host tests and chain benchmark.
pub fn built_dir() -> PathBuf {
    crate::binary::target_dir()
        .join("wasm32-wasip2")
        .join("filter")
}

/// Build every filter with `scripts/build-filters.sh` (which also installs the wasm
/// targets on a fresh machine) and return [`built_dir`]. For the proxy crate's
/// filter-host tests and chain benchmark; the end-to-end tests build only the filters
/// they use ([`build`]).
pub fn build_all() -> Result<PathBuf, String> {
    let root = crate::binary::workspace_root();
    let status = std::process::Command::new("bash")
        .arg(root.join("scripts/build-filters.sh"))
        .current_dir(&root)
        .stdout(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => Ok(built_dir()),
        other => Err(format!("scripts/build-filters.sh failed ({other:?})")),
    }
}

/// Build the filter crates `pkgs` (once per process and package) and return the path of
/// each `.wasm`, in order.
pub fn build(pkgs: &[&str]) -> Vec<PathBuf> {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| !built.iter().any(|b| b == p))
        .collect();
    if !missing.is_empty() && std::env::var_os("WASMESH_E2E_NO_BUILD").is_none() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--profile",
            "filter",
            "--target",
            "wasm32-wasip2",
        ])
        .current_dir(crate::binary::workspace_root());
        for p in &missing {
            cmd.args(["-p", p]);
        }
        let status = cmd.status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "cannot build filters {missing:?} ({status:?}); run scripts/build-filters.sh"
        );
    }
    built.extend(missing.iter().map(|s| s.to_string()));
    pkgs.iter()
        .map(|p| {
            let f = built_dir().join(format!("{p}.wasm"));
            assert!(f.exists(), "{} is missing", f.display());
            f
        })
        .collect()
}

/// A fresh directory holding `NAME.wasm` for each filter crate in `pkgs` (built if needed).
pub fn filter_dir(pkgs: &[&str]) -> PathBuf {
    let dir = crate::proxy::temp_dir("filters");
    for (pkg, src) in pkgs.iter().zip(build(pkgs)) {
        let dst = dir.join(format!("{pkg}.wasm"));
        std::fs::copy(&src, &dst)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dst.display()));
    }
    dir
}
