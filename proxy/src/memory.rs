//! Giving memory back after a burst of traffic.
//!
//! glibc's allocator keeps freed memory in its arenas (one per worker thread, and more
//! under contention) for reuse, so after a load peak a sidecar sits on memory it no longer
//! needs. A background thread watches the process's CPU time and, once the proxy has gone
//! quiet after being busy, asks glibc to return free pages to the kernel (`malloc_trim`).
//! It never runs on the request path and costs nothing while traffic flows; with the
//! `mimalloc` feature (its own reclaim policy) or off glibc it does nothing.

/// Start the idle-trim thread (once per process).
pub fn spawn_idle_trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
    glibc::spawn_idle_trim();
}

#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
mod glibc {
    use std::time::Duration;

    /// How often the CPU time is sampled.
    const TICK: Duration = Duration::from_millis(500);
    /// Below this much CPU per tick the process counts as idle.
    const IDLE_CPU: Duration = Duration::from_millis(5);

    pub fn spawn_idle_trim() {
        let spawned = std::thread::Builder::new()
            .name("wasmesh-trim".into())
            .spawn(|| {
                let mut last = cpu_time();
                let mut busy_since_trim = false;
                loop {
                    std::thread::sleep(TICK);
                    let now = cpu_time();
                    let used = now.saturating_sub(last);
                    last = now;
                    if used >= IDLE_CPU {
                        busy_since_trim = true;
                    } else if busy_since_trim {
                        busy_since_trim = false;
                        trim();
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "no idle-trim thread");
        }
    }

    /// utime + stime of the whole process, from /proc/self/stat.
    fn cpu_time() -> Duration {
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
            return Duration::ZERO;
        };
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            return Duration::ZERO;
        };
        let mut f = rest.split_ascii_whitespace().skip(11);
        let ticks: u64 = f.next().and_then(|u| u.parse().ok()).unwrap_or(0)
            + f.next().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        // USER_HZ is 100 on every Linux the proxy targets.
        Duration::from_millis(ticks * 10)
    }

    fn trim() {
        // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it takes no
        // pointers from us.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
