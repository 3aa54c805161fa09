//! `tpbpf doctor` against this machine's kernel: as root every requirement
//! is met; without privileges it fails with a remedy, and `-o json` parses.
use std::{os::unix::process::CommandExt, process::Command};

use serde_json::Value;
use tpbpf_vm_tests::*;

#[test]
fn doctor_as_root_meets_every_requirement() {
    if !require_root() {
        return;
    }
    let out = Command::new(tpbpf_bin())
        .args(["doctor", "-o", "json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).expect("doctor -o json must parse");
    let failed: Vec<_> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .collect();
    assert!(
        failed.is_empty(),
        "requirements missing on this machine: {failed:#?}"
    );
    assert_eq!(report["ok"], true);
    assert!(out.status.success());
    // Kernel TLS: available exactly when the kernel lists the ULP (the
    // probe, as root, may have loaded its module).
    let ktls = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "kernel TLS (TCP ULP tls)")
        .cloned()
        .expect("a kernel TLS row");
    let listed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .unwrap_or_default()
        .split_whitespace()
        .any(|u| u == "tls");
    assert_eq!(
        ktls["status"],
        if listed { "ok" } else { "warn" },
        "{ktls} (tcp_available_ulp lists tls: {listed})"
    );
    // The probes really ran: one row per program type the design uses.
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for hook in [
        "connect4",
        "connect6",
        "sendmsg4",
        "sendmsg6",
        "recvmsg4",
        "recvmsg6",
        "getpeername4",
        "getpeername6",
        "sock_ops",
        "sk_lookup",
        "sched_cls",
        "tcx",
    ] {
        assert!(
            names.iter().any(|n| n.contains(hook)),
            "no row for {hook}: {names:?}"
        );
    }
}

#[test]
fn doctor_without_privileges_fails_with_a_remedy() {
    if !require_root() {
        return;
    }
    // The build directory may be closed to other users (a clone in a 0700
    // home): nobody runs a copy it can reach.
    let bin = PublicCopy::of(&tpbpf_bin());
    let nobody = |args: &[&str]| {
        Command::new(bin.path())
            .args(args)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let out = nobody(&["doctor"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "doctor must exit non-zero without privileges:\n{table}"
    );
    assert!(table.contains("FAIL"), "{table}");
    assert!(
        table.contains("-> run tpbpf as root"),
        "each failure needs a remedy:\n{table}"
    );
    assert!(table.contains("requirements missing"), "{table}");

    let out = nobody(&["doctor", "-o", "json"]);
    assert!(!out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).expect("doctor -o json must parse");
    assert_eq!(report["ok"], false);
    for check in report["checks"].as_array().unwrap() {
        if check["status"] == "fail" {
            assert!(
                check["remedy"].as_str().is_some_and(|r| !r.is_empty()),
                "failure without remedy: {check}"
            );
        }
    }
    let bpf = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "bpf() syscall")
        .unwrap();
    assert_eq!(bpf["status"], "fail");
    assert!(bpf["detail"].as_str().unwrap().contains("EPERM"), "{bpf}");
}
