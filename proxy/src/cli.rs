//! The command line: `wasmesh run`, `wasmesh check`, `wasmesh filter new`, `wasmesh --version`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "wasmesh",
    version,
    about = "A WebAssembly-extensible service-mesh sidecar proxy"
)]
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
    Check { manifest: PathBuf },
    /// Filter authoring tools.
    Filter {
        #[command(subcommand)]
        command: FilterCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum FilterCommand {
    /// Create a filter crate from the template, ready for
    /// `cargo build --release --target wasm32-wasip2` (see docs/writing-filters.md).
    New {
        /// The crate's name; may be a path (`/tmp/x/myfilter`): its last part is the name.
        name: PathBuf,
        /// Directory to create (default: NAME).
        #[arg(long)]
        path: Option<PathBuf>,
        /// The wasmesh SDK directory (default: $WASMESH_SDK_PATH, else the sdk/ of the
        /// sources this binary was built from).
        #[arg(long)]
        sdk_path: Option<PathBuf>,
    },
}

/// `wasmesh filter new`: what to print and the exit code.
pub fn filter_new(
    name: &std::path::Path,
    path: Option<&std::path::Path>,
    sdk_path: Option<&std::path::Path>,
) -> (String, i32) {
    match crate::scaffold::new_filter(name, path, sdk_path) {
        Ok(created) => (created.next_steps(), 0),
        Err(e) => (format!("wasmesh filter new: {e}\n"), 1),
    }
}

/// `wasmesh check`: the errors, one a line, and the exit code.
pub fn check(manifest: &std::path::Path) -> (String, i32) {
    match crate::config::load(manifest) {
        Ok(m) => (
            format!(
                "{}: OK ({}, {}, {})\n",
                manifest.display(),
                count(m.listeners.len(), "listener"),
                count(m.clusters.len(), "cluster"),
                count(m.filters.len(), "filter")
            ),
            0,
        ),
        Err(errs) => {
            let n = errs.0.len();
            (
                format!("{errs}\n{n} error{} found\n", if n == 1 { "" } else { "s" }),
                1,
            )
        }
    }
}

fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}
