//! `wasmesh check`: golden files of what a user sees. Each `golden/NAME.json` is checked
//! from this crate's directory with a relative path (messages name the file as given) and
//! the output compared with `golden/NAME.txt`. `UPDATE_GOLDEN=1` rewrites the `.txt` files.

use std::path::PathBuf;
use std::process::Command;
use wasmesh_e2e::binary::wasmesh_bin;

/// Run `wasmesh check golden/NAME.json` (or `golden/NAME.yaml` when there is one);
/// compare its output with `golden/NAME.txt`.
fn check_golden(name: &str, expect_code: i32) {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let file = if crate_dir.join(format!("golden/{name}.yaml")).exists() {
        format!("golden/{name}.yaml")
    } else {
        format!("golden/{name}.json")
    };
    let out = Command::new(wasmesh_bin())
        .args(["check", &file])
        .current_dir(&crate_dir)
        .output()
        .expect("run wasmesh check");
    // Success goes to stdout, errors to stderr; never both.
    let (text, other) = if expect_code == 0 {
        (&out.stdout, &out.stderr)
    } else {
        (&out.stderr, &out.stdout)
    };
    let text = String::from_utf8_lossy(text).into_owned();
    assert!(
        other.is_empty(),
        "{name}: unexpected output on the other stream: {}",
        String::from_utf8_lossy(other)
    );
    assert_eq!(out.status.code(), Some(expect_code), "{name}: {text}");

    let golden = crate_dir.join("golden").join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &text).expect("write golden file");
        return;
    }
    let want = std::fs::read_to_string(&golden).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            golden.display()
        )
    });
    assert!(
        text == want,
        "`wasmesh check {file}` output changed (UPDATE_GOLDEN=1 to accept):\n--- want\n{want}--- got\n{text}"
    );
}

#[test]
fn every_semantic_error_is_reported_with_its_path() {
    check_golden("check_errors", 1);
}

#[test]
fn a_type_error_names_the_field_and_position() {
    check_golden("check_syntax", 1);
}

#[test]
fn an_unknown_field_lists_the_known_ones() {
    check_golden("check_unknown_field", 1);
}

#[test]
fn a_valid_manifest_is_summarised() {
    check_golden("check_ok", 0);
}

#[test]
fn a_setting_that_does_nothing_is_a_warning_not_an_error() {
    check_golden("check_warning", 0);
}

#[test]
fn yaml_manifests_are_checked_like_json() {
    check_golden("check_yaml_ok", 0);
    check_golden("check_yaml_type", 1);
    check_golden("check_yaml_errors", 1);
}

#[test]
fn a_missing_file_is_one_clear_error() {
    let out = Command::new(wasmesh_bin())
        .args(["check", "golden/does-not-exist.json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run wasmesh check");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("golden/does-not-exist.json: cannot read the manifest:"),
        "{err}"
    );
    assert!(err.ends_with("1 error found\n"), "{err}");
}
