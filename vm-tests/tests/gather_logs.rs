//! `tpbpf gather-logs`: a tarball with each part (the bridge's log, the
//! last one `down` kept, status, doctor, version, the kubeconfig context,
//! every agent's log through the API), in which no token, key or
//! certificate appears, even where a log line carried one.
use std::process::Command;

use tpbpf_vm_tests::*;

/// A `key: value` field of the kubeconfig's text.
fn field(kubeconfig: &str, name: &str) -> String {
    std::fs::read_to_string(kubeconfig)
        .unwrap()
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(&format!("{name}: "))
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no {name} in {kubeconfig}"))
}

#[test]
fn gather_logs_has_every_part_and_no_credential() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("gl") else {
        return;
    };
    let (dev, kubeconfig) = (lab.dev_netns(), lab.kubeconfig());
    let cg = TestCgroup::new();
    let instance = Instance(unique_name("gl"));
    let out = Command::new(tpbpf_bin())
        .args(["--netns", &dev, "up", "--kubeconfig", &kubeconfig])
        .args(["--instance", &instance.0, "--cgroup"])
        .arg(cg.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Credentials planted in the bridge's log, as a careless log line
    // would carry them: the kubeconfig's own key (as given and as PEM),
    // another identity's token in a header and in JSON.
    use base64::Engine;
    let key_data = field(&kubeconfig, "client-key-data");
    let key_pem = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(&key_data)
            .unwrap(),
    )
    .unwrap();
    let tokens = std::fs::read_to_string(lab.state_dir().join("tokens.csv")).unwrap();
    let other: Vec<String> = tokens
        .lines()
        .filter_map(|l| l.split(',').next().map(str::to_string))
        .take(2)
        .collect();
    let log = std::path::Path::new("/run/tpbpf")
        .join(&instance.0)
        .join("tpbpfd.log");
    let planted = format!(
        "PLANTED key {key_data}\nPLANTED pem {key_pem}\nPLANTED Authorization: Bearer {}\nPLANTED {{\"token\":\"{}\"}}\n",
        other[0], other[1]
    );
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(planted.as_bytes())
        .unwrap();
    // `down` keeps the last log.
    let down = Command::new(tpbpf_bin())
        .args(["down", "--instance", &instance.0])
        .output()
        .unwrap();
    assert!(down.status.success());
    let last = std::path::Path::new("/run/tpbpf").join(format!("{}.last.log", instance.0));
    assert!(
        std::fs::read_to_string(&last).unwrap().contains("PLANTED"),
        "down did not keep the log at {}",
        last.display()
    );

    let dir = TempDir::new("tpbpf-gather");
    let tarball = dir.0.join("logs.tar.gz");
    let out = Command::new(tpbpf_bin())
        .args(["--netns", &dev, "gather-logs", "--instance", &instance.0])
        .args(["--kubeconfig", &kubeconfig, "-f"])
        .arg(&tarball)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = run(Command::new("tar").arg("-tzf").arg(&tarball));
    for part in [
        "MANIFEST.txt".to_string(),
        format!("logs/{}.last.log", instance.0),
        "status.json".into(),
        "doctor.json".into(),
        "version.json".into(),
        "config.json".into(),
        "agents/tpbpf-agent-node1.log".into(),
        "agents/tpbpf-agent-node2.log".into(),
    ] {
        assert!(
            listing.lines().any(|l| l == format!("tpbpf-logs/{part}")),
            "{part} missing from:\n{listing}"
        );
    }
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&dir.0));
    let all = |dir: &std::path::Path| -> String {
        let mut text = String::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    text.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        text
    };
    let text = all(&dir.0.join("tpbpf-logs"));
    assert!(text.contains("PLANTED key"), "the kept log is not in it");
    assert!(
        text.contains("intercept") || text.contains("agent"),
        "no agent log"
    );
    let key_line = key_pem.lines().nth(1).unwrap_or_default().to_string();
    for (what, secret) in [
        ("the kubeconfig's key data", key_data.as_str()),
        ("the kubeconfig's key", key_line.as_str()),
        ("a bearer token", other[0].as_str()),
        ("a token in JSON", other[1].as_str()),
    ] {
        assert!(!secret.is_empty());
        assert!(!text.contains(secret), "{what} is in the tarball");
    }
    assert!(
        !text.contains("PRIVATE KEY"),
        "a private key is in the tarball"
    );
}
