//! The command line: `wasmesh run`, `wasmesh check`, `wasmesh filter new`, `wasmesh ca`,
//! `wasmesh --version`.

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
    /// A small mesh CA: create one, issue SPIFFE workload certificates from it.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a CA: DIR/ca.crt (the trust bundle to give every proxy) and DIR/ca.key (0600).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Lifetime of the CA certificate, in days (at most 100 years, as X.509 dates end
        /// in 9999).
        #[arg(long, default_value_t = crate::ca::DEFAULT_CA_DAYS,
              value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: u32,
        /// Replace an existing CA in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Issue a workload certificate with one SPIFFE ID: PREFIX.crt and PREFIX.key (0600).
    Issue {
        /// The CA's directory (from `wasmesh ca init`).
        #[arg(long)]
        dir: PathBuf,
        /// The workload's identity, e.g. spiffe://mesh.local/ns/shop/sa/checkout.
        #[arg(long)]
        spiffe_id: String,
        /// Where to write: PREFIX.crt and PREFIX.key.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in days (default: 24 hours; at most 36500).
        #[arg(long, conflicts_with = "hours",
              value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: Option<u32>,
        /// Lifetime in hours (default: 24; at most 876000).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=876_000))]
        hours: Option<u32>,
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

/// `wasmesh ca init` / `wasmesh ca issue`: what to print and the exit code.
pub fn ca(command: &CaCommand) -> (String, i32) {
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    match command {
        CaCommand::Init { dir, days, force } => match crate::ca::init(dir, *days, *force) {
            Ok(w) => (
                format!(
                    "wrote {} and {} (valid until unix {})\ngive {} to every proxy as its trust_bundle; keep {} secret\n",
                    w.cert.display(),
                    w.key.display(),
                    unix(w.not_after),
                    w.cert.display(),
                    w.key.display()
                ),
                0,
            ),
            Err(e) => (format!("wasmesh ca init: {e}\n"), 1),
        },
        CaCommand::Issue {
            dir,
            spiffe_id,
            out,
            days,
            hours,
        } => {
            let secs = match (days, hours) {
                (Some(d), _) => u64::from(*d) * 86_400,
                (None, Some(h)) => u64::from(*h) * 3_600,
                (None, None) => u64::from(crate::ca::DEFAULT_CERT_HOURS) * 3_600,
            };
            match crate::ca::issue(dir, spiffe_id, out, std::time::Duration::from_secs(secs)) {
                Ok(w) => (
                    format!(
                        "wrote {} and {} for {spiffe_id} (valid until unix {})\n",
                        w.cert.display(),
                        w.key.display(),
                        unix(w.not_after)
                    ),
                    0,
                ),
                Err(e) => (format!("wasmesh ca issue: {e}\n"), 1),
            }
        }
    }
}

/// `wasmesh check`: the errors, one a line, and the exit code.
pub fn check(manifest: &std::path::Path) -> (String, i32) {
    match crate::config::load(manifest) {
        Ok(m) => {
            let mut out: String = crate::config::warnings(&m)
                .iter()
                .map(|w| format!("{}: warning: {w}\n", manifest.display()))
                .collect();
            out.push_str(&format!(
                "{}: OK ({}, {}, {})\n",
                manifest.display(),
                count(m.listeners.len(), "listener"),
                count(m.clusters.len(), "cluster"),
                count(m.filters.len(), "filter")
            ));
            (out, 0)
        }
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
