//! Filter files for hot-swap tests: distinct builds of `testkit` made by patching its
//! build stamp, rename-into-place installs into a proxy's `filter_dir`, content hashes,
//! and a process's open files. Building is [`crate::wasm_filters`]'.

use std::path::Path;

/// The bytes of built filter `name` (e.g. "testkit"), built once per process.
pub fn wasm(name: &str) -> Vec<u8> {
    let p = crate::wasm_filters::build(&[name]).remove(0);
    std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

const MARK: &[u8] = b"WASMESH-BUILD:";

/// A distinct build of `testkit` that stamps `x-testkit-build: {build:010}`: the ten
/// digits after its `WASMESH-BUILD:` marker (in a data segment) are overwritten. Same
/// length, same code: a valid component with another content hash and another stamp.
pub fn testkit_build(build: u64) -> Vec<u8> {
    let mut bytes = wasm("testkit");
    let digits = format!("{build:010}");
    assert_eq!(digits.len(), 10, "build ids have at most ten digits");
    let mut found = 0;
    let mut i = 0;
    while let Some(pos) = bytes[i..]
        .windows(MARK.len())
        .position(|w| w == MARK)
        .map(|p| p + i)
    {
        let at = pos + MARK.len();
        bytes[at..at + 10].copy_from_slice(digits.as_bytes());
        found += 1;
        i = at + 10;
    }
    assert_eq!(
        found, 1,
        "testkit.wasm must hold its build marker exactly once"
    );
    bytes
}

/// Write `bytes` to `dir/name` by rename-into-place (the watcher never sees half a file).
pub fn install(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, dir.join(name)).unwrap_or_else(|e| panic!("rename {name}: {e}"));
}

/// Hex sha256 of `bytes` (with the system's `sha256sum`, to keep the harness light).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("sha256sum: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(bytes).expect("write to sha256sum");
    }
    let out = child.wait_with_output().expect("sha256sum output");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Open file descriptors of process `pid`.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}
