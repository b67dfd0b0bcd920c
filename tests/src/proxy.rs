//! [`Proxy`]: the real `wasmesh run` process, started on `127.0.0.1:0` and waited on until
//! ready; killed on drop.

use crate::client::{self, Resp};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a proxy may take to print its addresses and answer `/ready`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `wasmesh run MANIFEST`.
pub struct Proxy {
    child: Child,
    dir: PathBuf,
    manifest_path: PathBuf,
    stdout_path: PathBuf,
    admin: SocketAddr,
    listeners: HashMap<String, SocketAddr>,
    stderr: Arc<Mutex<String>>,
    exit: Option<ExitStatus>,
}

/// A fresh, empty directory for one proxy's files (removed when the proxy is dropped).
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "wasmesh-e2e-{}-{}-{}",
        std::process::id(),
        tag,
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// Fill in what every test manifest needs but no test cares about: an admin endpoint on a
/// free port and one data-plane worker (predictable on 2 cores).
/// Why [`Proxy::try_start`] did not give a running proxy.
#[derive(Debug)]
pub struct StartFailure {
    /// The exit status, when the process exited (not when it was only late).
    pub status: Option<ExitStatus>,
    pub stderr: String,
    /// The whole story, with the manifest.
    pub message: String,
}

fn with_test_defaults(mut m: Value) -> Value {
    if let Some(obj) = m.as_object_mut() {
        obj.entry("admin")
            .or_insert_with(|| serde_json::json!({"address": "127.0.0.1:0"}));
        obj.entry("workers").or_insert_with(|| serde_json::json!(1));
    }
    m
}

/// Write `text` to `path` the way editors and ConfigMaps do: to a temporary file in the same
/// directory, then rename it into place (readers never see half a file).
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

impl Proxy {
    /// Start the proxy with `manifest` and wait until it is ready: every listener's address
    /// printed, then `/ready` answering 200.
    pub async fn start(manifest: Value) -> Proxy {
        Self::start_with(manifest, &[]).await
    }

    /// [`Proxy::start`] with extra environment variables (e.g. `WASMESH_LOG`).
    pub async fn start_with(manifest: Value, env: &[(&str, &str)]) -> Proxy {
        match Self::try_start(manifest, env).await {
            Ok(p) => p,
            Err(f) => panic!("{}", f.message),
        }
    }

    /// Start the proxy as [`Proxy::start_with`] does; why it did not start (it exited, or
    /// was not ready in time) is an `Err` instead of a panic.
    pub async fn try_start(manifest: Value, env: &[(&str, &str)]) -> Result<Proxy, StartFailure> {
        let manifest = with_test_defaults(manifest);
        let expected: Vec<String> = manifest["listeners"]
            .as_array()
            .map(|ls| {
                ls.iter()
                    .filter_map(|l| l["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let dir = temp_dir("proxy");
        let manifest_path = dir.join("manifest.json");
        write_atomically(&manifest_path, &pretty(&manifest));
        let stdout_path = dir.join("stdout.log");
        let stdout = std::fs::File::create(&stdout_path).expect("create stdout capture");

        let mut cmd = Command::new(crate::binary::wasmesh_bin());
        cmd.arg("run")
            .arg(&manifest_path)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn wasmesh: {e}"));

        // stderr is read on a thread for the life of the process: kept for failure messages,
        // and its lines are forwarded until the addresses have been seen.
        let stderr_text = Arc::new(Mutex::new(String::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let pipe = child.stderr.take().expect("stderr is piped");
        {
            let stderr_text = stderr_text.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut s) = stderr_text.lock() {
                        s.push_str(&line);
                        s.push('\n');
                    }
                    let _ = tx.send(line);
                }
            });
        }

        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let mut admin = None;
        let mut listeners = HashMap::new();
        let fail = |why: &str, status: Option<ExitStatus>, text: &Arc<Mutex<String>>| {
            let captured = text.lock().map(|s| s.clone()).unwrap_or_default();
            StartFailure {
                status,
                message: format!("wasmesh did not start: {why}\n--- manifest ---\n{}\n--- stderr so far ---\n{captured}", pretty(&manifest)),
                stderr: captured,
            }
        };
        while admin.is_none() || !expected.iter().all(|n| listeners.contains_key(n)) {
            let line = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(line)) => line,
                Ok(None) => {
                    let status = child.wait().ok();
                    return Err(fail(
                        &format!("the process exited ({status:?})"),
                        status,
                        &stderr_text,
                    ));
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(
                        &format!("no addresses after {START_TIMEOUT:?}"),
                        None,
                        &stderr_text,
                    ));
                }
            };
            if let Some(a) = line.strip_prefix("admin listening on ") {
                admin = a.trim().parse::<SocketAddr>().ok();
            } else if let Some(rest) = line.strip_prefix("listener ") {
                if let Some((name, addr)) = rest.split_once(" listening on ") {
                    if let Ok(addr) = addr.trim().parse::<SocketAddr>() {
                        listeners.insert(name.to_string(), addr);
                    }
                }
            }
        }
        let admin = admin.expect("admin address seen");
        let mut proxy = Proxy {
            child,
            dir,
            manifest_path,
            stdout_path,
            admin,
            listeners,
            stderr: stderr_text,
            exit: None,
        };
        // Readiness: /ready answers 200 once every filter has loaded.
        loop {
            if let Ok(r) = client::try_get(admin, "/ready").await {
                if r.status == 200 {
                    break;
                }
            }
            if let Ok(Some(status)) = proxy.child.try_wait() {
                proxy.exit = Some(status);
                return Err(StartFailure {
                    status: Some(status),
                    message: format!(
                        "wasmesh exited before it was ready ({status})\n{}",
                        proxy.stderr()
                    ),
                    stderr: proxy.stderr(),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(StartFailure {
                    status: None,
                    message: format!(
                        "wasmesh /ready never answered 200 within {START_TIMEOUT:?}\n{}",
                        proxy.stderr()
                    ),
                    stderr: proxy.stderr(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(proxy)
    }

    /// Run `wasmesh run` with a manifest expected to fail at start; its exit status and
    /// stderr. Panics if it is still running after 30 s.
    pub async fn start_failure(manifest: Value) -> (ExitStatus, String) {
        Self::start_failure_with(manifest, &[]).await
    }

    /// [`Proxy::start_failure`] with these environment variables set.
    pub async fn start_failure_with(manifest: Value, env: &[(&str, &str)]) -> (ExitStatus, String) {
        let manifest = with_test_defaults(manifest);
        let dir = temp_dir("fail");
        let path = dir.join("manifest.json");
        write_atomically(&path, &pretty(&manifest));
        let mut child = Command::new(crate::binary::wasmesh_bin())
            .arg("run")
            .arg(&path)
            .current_dir(&dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn wasmesh: {e}"));
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("wasmesh kept running with a manifest that should fail");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        let _ = std::fs::remove_dir_all(&dir);
        (status, stderr)
    }

    /// The bound address of listener `name`.
    pub fn listener(&self, name: &str) -> SocketAddr {
        *self
            .listeners
            .get(name)
            .unwrap_or_else(|| panic!("no listener `{name}`; have {:?}", self.listeners.keys()))
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest_path(&self) -> &Path {
        &self.manifest_path
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Replace the manifest on disk (rename into place), with the same test defaults as
    /// [`Proxy::start`]. The proxy's directory watcher picks it up.
    pub fn write_manifest(&self, manifest: Value) {
        write_atomically(&self.manifest_path, &pretty(&with_test_defaults(manifest)));
    }

    /// Write raw text as the manifest (e.g. invalid JSON).
    pub fn write_manifest_text(&self, text: &str) {
        write_atomically(&self.manifest_path, text);
    }

    /// GET a path on the admin endpoint.
    pub async fn admin_get(&self, path: &str) -> Resp {
        client::try_get(self.admin, path)
            .await
            .unwrap_or_else(|e| panic!("admin GET {path}: {e}\n{}", self.stderr()))
    }

    /// POST an empty body to a path on the admin endpoint.
    pub async fn admin_post(&self, path: &str) -> Resp {
        client::Req::post(path).send(self.admin).await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.text()
    }

    /// The sum of every series of metric `name` whose labels include all of `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics().await, name, labels)
    }

    /// The proxy's stdout so far (the access log, one line per request).
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// The access log lines written so far, parsed.
    pub fn access_log_lines(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.stdout_path).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.is_object())
            .collect()
    }

    /// Wait (up to 5 s) for an access log line that satisfies `pred`; the log is written
    /// off the request path, so it may trail the response a little.
    pub async fn log_entry(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let found = crate::eventually(Duration::from_secs(5), what, || {
            let lines = self.access_log_lines();
            let hit = lines.into_iter().find(|l| pred(l));
            async move { hit }
        })
        .await;
        found
    }

    /// Poll `check` (every 20 ms, up to `timeout`) until it returns `Some`; on timeout the
    /// panic message carries the proxy's stderr.
    pub async fn wait_for<T, F, Fut>(&self, timeout: Duration, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        crate::eventually_or(timeout, what, check, || {
            format!("--- wasmesh stderr ---\n{}", self.stderr())
        })
        .await
    }

    /// The access log line of the request with this `x-request-id`.
    pub async fn log_for_request_id(&self, id: &str) -> Value {
        self.log_entry(&format!("access log line for request id {id}"), |l| {
            l["request_id"] == id
        })
        .await
    }

    fn proc_status_kib(&self, field: &str) -> u64 {
        let text =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    /// Peak resident memory of the proxy so far (`VmHWM`), in KiB.
    pub fn vm_hwm_kib(&self) -> u64 {
        self.proc_status_kib("VmHWM")
    }

    /// Current resident memory of the proxy (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.proc_status_kib("VmRSS")
    }

    /// Reset the kernel's peak-RSS counter (`VmHWM`) to the current RSS, so a test measures
    /// the peak of its own scenario (Linux `clear_refs` value 5).
    pub fn reset_hwm(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5").is_ok()
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child, which
        // is not reaped until `wait_exit` or drop, so it cannot have been reused.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    /// Ask for a reload.
    pub fn sighup(&self) {
        self.signal(libc::SIGHUP);
    }

    /// Ask for a graceful shutdown (drain).
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Wait (up to `timeout`) for the process to exit; its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.exit {
            return s;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    self.exit = Some(s);
                    return s;
                }
                Ok(None) => {}
                Err(e) => panic!("waiting for wasmesh: {e}"),
            }
            if tokio::time::Instant::now() > deadline {
                panic!("wasmesh did not exit within {timeout:?}\n{}", self.stderr());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::env::var_os("WASMESH_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// Sum of the series of `name` in Prometheus text whose labels include all of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}
