//! Hot-swap: watch the directories holding the active filters' files and put changed
//! files in service.
//!
//! The directory itself is watched (not the files), so editors' rename-into-place and
//! symlink swaps are seen. Events are debounced briefly; then every slot whose file
//! lives in a directory that changed is re-read and hashed, and a new content is
//! compiled, instantiated and configured on this thread, off the request path. Only a
//! version that loaded is swapped in; a broken file leaves the old version serving.

use super::slot::FilterSlot;
use super::FilterHost;
use notify::{RecursiveMode, Watcher};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Quiet time after the last event before files are re-read.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// A running watcher; dropping it stops the watch (its thread exits).
pub struct FileWatcher {
    _watcher: notify::RecommendedWatcher,
}

/// Start watching the directories of `slots`' files.
pub fn start(host: Weak<FilterHost>, slots: Vec<Arc<FilterSlot>>) -> Result<FileWatcher, String> {
    let dirs: HashSet<PathBuf> = slots
        .iter()
        .flat_map(|s| std::iter::once(&s.path).chain(s.rollout.as_ref().map(|r| &r.path)))
        .filter_map(|p| p.parent().map(|p| p.to_path_buf()))
        .collect();
    let (tx, rx) = mpsc::channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })
    .map_err(|e| format!("cannot start the filter file watcher: {e}"))?;
    for d in &dirs {
        let d = if d.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            d.clone()
        };
        watcher
            .watch(&d, RecursiveMode::NonRecursive)
            .map_err(|e| format!("cannot watch {}: {e}", d.display()))?;
    }
    std::thread::Builder::new()
        .name("wasmesh-filter-watch".to_string())
        .spawn(move || run(host, slots, rx))
        .map_err(|e| format!("cannot start the filter watcher thread: {e}"))?;
    Ok(FileWatcher { _watcher: watcher })
}

fn run(
    host: Weak<FilterHost>,
    slots: Vec<Arc<FilterSlot>>,
    rx: mpsc::Receiver<notify::Result<notify::Event>>,
) {
    // The loop ends when the watcher (the sender) is dropped.
    while let Ok(first) = rx.recv() {
        let mut dirs: HashSet<PathBuf> = HashSet::new();
        let mut note = |ev: notify::Result<notify::Event>| match ev {
            Ok(ev) => dirs.extend(
                ev.paths
                    .iter()
                    .filter_map(|p| p.parent().map(|d| d.to_path_buf())),
            ),
            Err(e) => tracing::warn!(error = %e, "filter file watcher error"),
        };
        note(first);
        loop {
            match rx.recv_timeout(DEBOUNCE) {
                Ok(ev) => note(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        if host.upgrade().is_none() {
            return;
        }
        let changed = |p: &std::path::Path| {
            p.parent()
                .is_some_and(|dir| dirs.iter().any(|d| same_dir(d, dir)))
        };
        for slot in &slots {
            if changed(&slot.path) {
                reload(slot);
            }
            if let Some(r) = &slot.rollout {
                if changed(&r.path) {
                    if let Err(e) = slot.reload_rollout() {
                        tracing::debug!(filter = %slot.name, error = %e, "rollout file not reloaded");
                    }
                }
            }
        }
    }
}

fn same_dir(a: &std::path::Path, b: &std::path::Path) -> bool {
    a == b
        || std::fs::canonicalize(a)
            .ok()
            .zip(std::fs::canonicalize(b).ok())
            .is_some_and(|(x, y)| x == y)
}

/// Re-read a slot's file and swap it in if it changed and loads.
pub fn reload(slot: &FilterSlot) {
    // An unreadable file (removed, mid-rename) leaves the old version serving; the next
    // event retries. A file that fails to load is logged and shown by `swap_to`.
    if let Err(e) = slot.reload_file() {
        tracing::debug!(filter = %slot.name, error = %e, "filter file not reloaded");
    }
}
