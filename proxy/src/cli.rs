//! The command line: `wasmesh run`, `wasmesh check`, `wasmesh --version`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "wasmesh", version, about = "A WebAssembly-extensible service-mesh sidecar proxy")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy with a manifest.
    Run {
        /// The manifest (JSON).
        manifest: PathBuf,
    },
    /// Validate a manifest; print every error found and exit non-zero if there are any.
    Check {
        manifest: PathBuf,
    },
}

/// `wasmesh check`: the errors, one a line, and the exit code.
pub fn check(manifest: &std::path::Path) -> (String, i32) {
    match crate::config::load(manifest) {
        Ok(m) => (
            format!(
                "{}: OK ({} listeners, {} clusters, {} filters)\n",
                manifest.display(),
                m.listeners.len(),
                m.clusters.len(),
                m.filters.len()
            ),
            0,
        ),
        Err(errs) => {
            let n = errs.0.len();
            (format!("{errs}\n{n} error{} found\n", if n == 1 { "" } else { "s" }), 1)
        }
    }
}
