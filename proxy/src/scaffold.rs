//! `wasmesh filter new NAME`: a new filter crate from the template in
//! `examples/filter-template/` (embedded in the binary), ready to build with
//! `cargo build --release --target wasm32-wasip2`, inside or outside this repository.
//!
//! The generated crate is a workspace of its own, pins its edition and `rust-version`,
//! carries the template's `Cargo.lock` (so it builds offline once the crates are in the
//! local cargo registry), and depends on the SDK by an absolute `path`: the SDK is not on
//! crates.io. The SDK directory is `--sdk-path`, else `$WASMESH_SDK_PATH`, else the `sdk/`
//! of the repository this binary was built from.

use std::path::{Path, PathBuf};

/// The template's files: (path in the new crate, content).
const FILES: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        include_str!("../../examples/filter-template/Cargo.toml"),
    ),
    (
        "Cargo.lock",
        include_str!("../../examples/filter-template/Cargo.lock"),
    ),
    (
        "src/lib.rs",
        include_str!("../../examples/filter-template/src/lib.rs"),
    ),
    (
        ".gitignore",
        include_str!("../../examples/filter-template/.gitignore"),
    ),
];

/// The template's package name and SDK dependency, replaced in the copy.
const TEMPLATE_NAME: &str = "filter-template";
const TEMPLATE_SDK_DEP: &str = r#"wasmesh-sdk = { path = "../../sdk" }"#;

/// The SDK next to the sources this binary was built from.
pub fn default_sdk_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("sdk")
}

/// Why a filter crate could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error("`{0}` is not a valid crate name: use lower-case letters, digits, `-` and `_`, starting with a letter")]
    BadName(String),
    #[error("{0} already exists and is not empty")]
    Exists(PathBuf),
    #[error("no wasmesh SDK at {0} (no Cargo.toml naming `wasmesh-sdk`): give --sdk-path or set WASMESH_SDK_PATH")]
    NoSdk(PathBuf),
    #[error("the SDK path {0} cannot be written in Cargo.toml (it contains a quote or a newline)")]
    SdkPath(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What was created.
#[derive(Debug)]
pub struct Created {
    pub dir: PathBuf,
    pub name: String,
    pub sdk: PathBuf,
}

impl Created {
    /// What to do next, for the terminal.
    pub fn next_steps(&self) -> String {
        let wasm = self.name.replace('-', "_");
        format!(
            "created filter `{name}` in {dir} (SDK: {sdk})\n\n\
             build it:\n  cd {dir}\n  cargo build --release --target wasm32-wasip2\n\n\
             then copy target/wasm32-wasip2/release/{wasm}.wasm into the manifest's filter_dir\n\
             and add {{\"name\": \"{name}\", \"file\": \"{wasm}.wasm\"}} to its `filters`\n\
             (see docs/writing-filters.md)\n",
            name = self.name,
            dir = self.dir.display(),
            sdk = self.sdk.display(),
        )
    }
}

fn valid_name(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ScaffoldError + '_ {
    move |source| ScaffoldError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Create the crate `name` in `dir` (default: `name` itself, as a path: its last component
/// is the crate name), using the SDK at `sdk` (default: see the module doc).
pub fn new_filter(
    name: &Path,
    dir: Option<&Path>,
    sdk: Option<&Path>,
) -> Result<Created, ScaffoldError> {
    let crate_name = name
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    if !valid_name(&crate_name) {
        return Err(ScaffoldError::BadName(name.display().to_string()));
    }
    let dir = dir.unwrap_or(name).to_path_buf();
    let sdk = match sdk {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("WASMESH_SDK_PATH") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => default_sdk_path(),
        },
    };
    let sdk = sdk
        .canonicalize()
        .map_err(|_| ScaffoldError::NoSdk(sdk.clone()))?;
    let sdk_manifest = std::fs::read_to_string(sdk.join("Cargo.toml")).unwrap_or_default();
    if !sdk_manifest.contains("name = \"wasmesh-sdk\"") {
        return Err(ScaffoldError::NoSdk(sdk));
    }
    let sdk_text = sdk.to_str().unwrap_or_default();
    if sdk_text.is_empty() || sdk_text.contains(['\'', '\n', '\r']) {
        return Err(ScaffoldError::SdkPath(sdk));
    }
    if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(ScaffoldError::Exists(dir));
    }
    for (rel, content) in FILES {
        let text = render(rel, content, &crate_name, sdk_text);
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    Ok(Created {
        dir,
        name: crate_name,
        sdk,
    })
}

/// A template file with the crate's name and SDK path put in.
fn render(rel: &str, content: &str, name: &str, sdk: &str) -> String {
    match rel {
        // A TOML literal string: no escapes, so any path without a quote or newline fits.
        "Cargo.toml" => content
            .replacen(
                &format!("name = \"{TEMPLATE_NAME}\""),
                &format!("name = \"{name}\""),
                1,
            )
            .replacen(
                TEMPLATE_SDK_DEP,
                &format!("wasmesh-sdk = {{ path = '{sdk}' }}"),
                1,
            ),
        "Cargo.lock" => content.replacen(
            &format!("name = \"{TEMPLATE_NAME}\""),
            &format!("name = \"{name}\""),
            1,
        ),
        _ => content.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_has_what_render_replaces() {
        let toml = FILES.iter().find(|(p, _)| *p == "Cargo.toml").map(|f| f.1);
        let toml = toml.unwrap_or_default();
        assert!(toml.contains(TEMPLATE_SDK_DEP));
        assert!(toml.contains(&format!("name = \"{TEMPLATE_NAME}\"")));
        let out = render("Cargo.toml", toml, "my-filter", "/opt/wasmesh/sdk");
        assert!(out.contains("name = \"my-filter\""));
        assert!(out.contains("wasmesh-sdk = { path = '/opt/wasmesh/sdk' }"));
        assert!(out.contains("[workspace]"));
    }

    #[test]
    fn names() {
        assert!(valid_name("my-filter_2"));
        assert!(!valid_name("My"));
        assert!(!valid_name("2x"));
        assert!(!valid_name(""));
    }

    #[test]
    fn creates_and_refuses_to_overwrite() {
        let base = std::env::temp_dir().join(format!("wasmesh-scaffold-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join("hello");
        let created = new_filter(&dir, None, None).expect("created");
        assert_eq!(created.name, "hello");
        let toml = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap_or_default();
        assert!(toml.contains("name = \"hello\""), "{toml}");
        assert!(dir.join("src/lib.rs").exists() && dir.join("Cargo.lock").exists());
        assert!(matches!(
            new_filter(&dir, None, None),
            Err(ScaffoldError::Exists(_))
        ));
        assert!(matches!(
            new_filter(&base.join("x"), None, Some(&base)),
            Err(ScaffoldError::NoSdk(_))
        ));
        let _ = std::fs::remove_dir_all(&base);
    }
}
