//! The `wasmesh` binary: parse the command line, set up logging, call the library.

use clap::Parser;

// With the `mimalloc` feature: glibc's allocator is about a sixth of a proxied request's
// instructions (many small, short-lived allocations); mimalloc's thread-local free lists
// make those nearly free, at the price of more idle memory (see BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::io::Write;
use wasmesh::cli::{Cli, Command, FilterCommand};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { manifest } => {
            let (out, code) = wasmesh::cli::check(&manifest);
            if code == 0 {
                print!("{out}");
            } else {
                eprint!("{out}");
            }
            std::process::ExitCode::from(code as u8)
        }
        Command::Run { manifest } => run(manifest),
        Command::Ca { command } => {
            let (out, code) = wasmesh::cli::ca(&command);
            if code == 0 {
                print!("{out}");
            } else {
                eprint!("{out}");
            }
            std::process::ExitCode::from(code as u8)
        }
        Command::Filter {
            command:
                FilterCommand::New {
                    name,
                    path,
                    sdk_path,
                },
        } => {
            let (out, code) = wasmesh::cli::filter_new(&name, path.as_deref(), sdk_path.as_deref());
            if code == 0 {
                print!("{out}");
            } else {
                eprint!("{out}");
            }
            std::process::ExitCode::from(code as u8)
        }
    }
}

fn run(manifest: std::path::PathBuf) -> std::process::ExitCode {
    // Logs go to stderr; stdout carries the access log by default.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WASMESH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // The control plane (admin, reloads, DNS, filter compilation) gets its own small runtime;
    // the data plane runs on the worker threads the server starts.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("wasmesh-control")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wasmesh: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(wasmesh::server::run(
        &manifest,
        shutdown_signal(),
        |started| {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "wasmesh {} ready", env!("CARGO_PKG_VERSION"));
            let _ = writeln!(err, "admin listening on {}", started.admin_addr);
            for l in &started.shared.listeners {
                let _ = writeln!(err, "listener {} listening on {}", l.name, l.address);
            }
        },
    ));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wasmesh: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
