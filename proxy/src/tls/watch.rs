//! Certificate rotation: watch the directories of a TLS owner's files and reload on change.
//!
//! Directories are watched, not files: cert-manager, SPIRE helpers and Kubernetes secret
//! volumes replace files by rename or by swapping a `..data` symlink, which a watch on the
//! old file would miss. Events are debounced so a cert and key written one after the other
//! load together. The task ends when its owner is dropped (a reload replaced it).

use super::Rotate;
use notify::{RecursiveMode, Watcher};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How long the files must be quiet before they are loaded.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// How often a task checks that its owner still exists when no event comes.
const LIVENESS: Duration = Duration::from_secs(5);

/// Start watching `owner`'s files on the current Tokio runtime.
pub fn spawn(owner: &Arc<dyn Rotate>) {
    let weak: Weak<dyn Rotate> = Arc::downgrade(owner);
    let name = owner.owner().clone();
    let dirs: BTreeSet<PathBuf> = owner
        .files()
        .paths()
        .iter()
        .map(|p| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    let names: Vec<std::ffi::OsString> = owner
        .files()
        .paths()
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            // Only our files (or a `..data` symlink swap): an access log written next to
            // them would otherwise keep the debounce from settling.
            let ours = ev.paths.iter().any(|p| match p.file_name() {
                Some(f) => names.iter().any(|n| n == f) || f.to_string_lossy().starts_with(".."),
                None => true,
            });
            if ours && !ev.kind.is_access() {
                let _ = tx.send(());
            }
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(owner = %name, error = %e, "cannot watch TLS files; certificates will not rotate");
            return;
        }
    };
    for d in &dirs {
        if let Err(e) = watcher.watch(d, RecursiveMode::NonRecursive) {
            tracing::warn!(owner = %name, dir = %d.display(), error = %e, "cannot watch a TLS directory; certificates there will not rotate");
        }
    }
    tokio::spawn(async move {
        let _watcher = watcher;
        loop {
            match tokio::time::timeout(LIVENESS, rx.recv()).await {
                Ok(Some(())) => {}
                Ok(None) => return,
                Err(_) => {
                    if weak.strong_count() == 0 {
                        return;
                    }
                    continue;
                }
            }
            // Debounce: wait for the burst of writes to settle.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
            match weak.upgrade() {
                Some(o) => {
                    let _ = o.reload();
                }
                None => return,
            }
        }
    });
}
