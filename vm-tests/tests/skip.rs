//! The skip mechanism itself: a test that cannot run says so on a line of
//! its own, and under CI=true a skip not listed as expected fails the run.
use std::{path::Path, process::Command};

use tpbpf_vm_tests::*;

const NAME: &str = "a_skip_is_visible_and_fails_under_ci_unless_expected";

/// This test binary, running only this test with a forced skip.
fn forced_skip(ci: bool, expected: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", NAME, "--test-threads=1"])
        .env("TPBPF_FORCE_SKIP", "1")
        .env_remove("CI")
        .env_remove("TPBPF_EXPECTED_SKIPS");
    if ci {
        cmd.env("CI", "true");
    }
    if let Some(file) = expected {
        cmd.env("TPBPF_EXPECTED_SKIPS", file);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_skip_is_visible_and_fails_under_ci_unless_expected() {
    if std::env::var_os("TPBPF_FORCE_SKIP").is_some() {
        skip("forced by the skip mechanism's own test");
        return;
    }
    let line = format!("SKIP {NAME}: forced by the skip mechanism's own test");

    // Outside CI: the test passes, and the SKIP line shows although libtest
    // captures the test's output.
    let (ok, out) = forced_skip(false, None);
    assert!(ok, "a skip outside CI must pass:\n{out}");
    assert!(out.contains(&line), "no visible SKIP line:\n{out}");

    // Under CI=true, not listed (the repository's own list): a failure.
    let (ok, out) = forced_skip(true, None);
    assert!(!ok, "an unexpected skip under CI=true passed:\n{out}");
    assert!(out.contains("unexpected SKIP under CI=true"), "{out}");
    assert!(out.contains(EXPECTED_SKIPS), "{out}");

    // Under CI=true, listed as expected for this machine kind: a pass.
    let list = std::env::temp_dir().join(unique_name("tpbpf-expected-skips"));
    std::fs::write(&list, format!("# a comment\n{NAME}  # forced\n")).unwrap();
    let (ok, out) = forced_skip(true, Some(&list));
    let _ = std::fs::remove_file(&list);
    assert!(ok, "an expected skip under CI=true failed:\n{out}");
    assert!(out.contains(&line), "{out}");
}

/// Every name in the repository's list is a test that exists, so a renamed
/// test does not leave a stale exemption behind.
#[test]
fn expected_skips_name_existing_tests() {
    let listed = std::fs::read_to_string(EXPECTED_SKIPS).unwrap();
    let tests_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let sources: String = std::fs::read_dir(&tests_dir)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect();
    for name in listed
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
    {
        assert!(
            sources.contains(&format!("fn {name}(")),
            "{EXPECTED_SKIPS} names {name}, which is no test in {}",
            tests_dir.display()
        );
    }
}
