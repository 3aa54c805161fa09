//! What `tpbpf install` applies: valid against the Kubernetes schemas of
//! several versions (kubernetes-validate, strict: no unknown fields).
use std::process::Command;

use tpbpf_vm_tests::*;

#[test]
fn install_manifests_validate_against_several_kubernetes_versions() {
    // `python3 -m`: no PATH entry or pyenv shim needed.
    let validator = || {
        let mut c = Command::new("python3");
        c.args(["-m", "kubernetes_validate"]);
        c
    };
    if !validator()
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        skip("kubernetes-validate is not installed (sudo bash xtask/setup.sh installs it)");
        return;
    }
    let out = run(Command::new(tpbpf_bin()).args([
        "install",
        "--dry-run",
        "-o",
        "yaml",
        "--cluster-cidr",
        "10.96.0.0/12",
        "--cluster-cidr",
        "10.244.0.0/16",
        "--allow-cidr",
        "192.0.2.0/24",
    ]));
    assert_eq!(
        out.matches("\nkind: ").count() + usize::from(out.starts_with("kind: ")),
        8,
        "{out}"
    );
    let file = std::env::temp_dir().join(format!("{}.yaml", unique_name("tpbpf-install")));
    std::fs::write(&file, &out).unwrap();
    for version in ["1.29", "1.31", "1.33", "1.35"] {
        let v = validator()
            .args(["--strict", "--quiet", "-k", version])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            v.status.success(),
            "Kubernetes {version} rejects the install manifests:\n{}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
    let _ = std::fs::remove_file(&file);
}
