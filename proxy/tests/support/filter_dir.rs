//! Where `scripts/build-filters.sh` puts the filter components: cargo's target directory
//! (`CARGO_TARGET_DIR` when set, relative to the workspace root when relative), then
//! `wasm32-wasip2/filter`. Shared by the filter-host tests and the chain benchmark.

use std::path::{Path, PathBuf};

pub fn filter_dir(workspace_root: &Path) -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() => d,
        Some(d) => workspace_root.join(d),
        None => workspace_root.join("target"),
    };
    target.join("wasm32-wasip2").join("filter")
}
