//! Manifest reload triggers: SIGHUP, and changes in the manifest's directory.
//!
//! The directory is watched rather than the file so that editors' rename-into-place and
//! Kubernetes ConfigMap updates (which swap a `..data` symlink) are seen. Events are
//! debounced: a burst of writes becomes one reload.

use crate::server::{reload, Shared};
use notify::{RecursiveMode, Watcher};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

const DEBOUNCE: Duration = Duration::from_millis(150);

pub async fn watch(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let dir = shared
        .manifest_path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    let fs_tx = tx.clone();
    let manifest_name = shared.manifest_path.file_name().map(|n| n.to_os_string());
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            // Only the manifest's own events: other files in the directory (an access log
            // written next to it) would otherwise keep the debounce from ever settling.
            if !ev.kind.is_access()
                && ev
                    .paths
                    .iter()
                    .any(|p| concerns_manifest(p, manifest_name.as_deref()))
            {
                let _ = fs_tx.send(());
            }
        }
    });
    // Keep the watcher alive for the life of this task.
    let _watcher = match watcher {
        Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the manifest directory; reload on SIGHUP only");
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot create a file watcher; reload on SIGHUP only");
            None
        }
    };
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            None
        }
    };
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            Some(()) = rx.recv() => {}
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading the manifest");
            }
        }
        // Debounce: wait for the burst to settle, then reload once.
        loop {
            tokio::select! {
                _ = tokio::time::sleep(DEBOUNCE) => break,
                Some(()) = rx.recv() => {}
            }
        }
        let _ = reload(&shared).await;
    }
}

/// Whether a change to `path` may change the manifest: the file itself, or the `..data`
/// symlink swap (and its `..`-prefixed temporaries) Kubernetes uses for ConfigMap volumes.
fn concerns_manifest(path: &std::path::Path, manifest_name: Option<&std::ffi::OsStr>) -> bool {
    match path.file_name() {
        Some(f) => Some(f) == manifest_name || f.to_string_lossy().starts_with(".."),
        None => true,
    }
}
