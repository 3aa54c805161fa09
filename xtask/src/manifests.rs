//! The manifest security linter: checkov on what `tpbpf install` applies,
//! with every skip justified in deploy/checkov.yaml and docs/security.md.
use std::{env, process::Command};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{cargo, root_dir};

/// checkov, installed by setup.sh into its own virtualenv (its pinned
/// dependencies would replace other tools' in a shared Python); TPBPF_CHECKOV
/// names another.
const CHECKOV: &str = "/opt/tpbpf/checkov/bin/checkov";

/// Runs checkov on what `tpbpf install` applies and fails on a finding that
/// deploy/checkov.yaml does not skip, on a skip that no longer matches a
/// finding, and on a skip docs/security.md does not explain.
///
/// Only the rendered install manifest is linted: the chart's template
/// (deploy/helm/tpbpf/templates) is Go-template text that checkov's
/// Kubernetes parser reads as no object at all, and checkov's helm framework
/// needs the helm binary, which Debian 12 lacks. The chart is rendered from
/// the same objects (userspace/deploy, whose test compares the two).
pub fn lint() -> Result<()> {
    let checkov = env::var_os("TPBPF_CHECKOV").unwrap_or_else(|| CHECKOV.into());
    let out = cargo()
        .args([
            "run",
            "-q",
            "-p",
            "tpbpf",
            "--",
            "install",
            "--dry-run",
            "-o",
            "yaml",
        ])
        .args([
            "--cluster-cidr",
            "10.96.0.0/12",
            "--cluster-cidr",
            "10.244.0.0/16",
        ])
        .args(["--allow-cidr", "192.0.2.0/24"])
        .output()
        .context("running `tpbpf install --dry-run`")?;
    if !out.status.success() {
        bail!(
            "`tpbpf install --dry-run` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = root_dir().join("target/checkov");
    std::fs::create_dir_all(&dir)?;
    let manifest = dir.join("install.yaml");
    std::fs::write(&manifest, &out.stdout)?;

    // No --config-file: every check runs, and the skip list is applied
    // here, so a skip that matches nothing any more is seen.
    let config = root_dir().join("deploy/checkov.yaml");
    let skips = checkov_skips(&std::fs::read_to_string(&config)?)?;
    let report = Command::new(&checkov)
        .args([
            "--framework",
            "kubernetes",
            "--skip-download",
            "-o",
            "json",
            "-f",
        ])
        .arg(&manifest)
        // Offline: no guideline download (--skip-download), no PyPI
        // version check.
        .env("CKV_SKIP_PACKAGE_UPDATE_CHECK", "true")
        .output()
        .with_context(|| {
            format!("running {checkov:?}: `sudo bash xtask/setup.sh` installs checkov")
        })?;
    let report: Value = serde_json::from_slice(&report.stdout).with_context(|| {
        format!(
            "reading checkov's JSON report: {}",
            String::from_utf8_lossy(&report.stderr)
        )
    })?;
    let summary = &report["summary"];
    let passed = summary["passed"].as_u64().unwrap_or(0);
    if passed == 0 || summary["parsing_errors"].as_u64() != Some(0) {
        bail!(
            "checkov checked nothing in {}: {summary}",
            manifest.display()
        );
    }
    let failed = report["results"]["failed_checks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut found: Vec<&str> = failed
        .iter()
        .filter_map(|f| f["check_id"].as_str())
        .collect();
    found.sort();
    found.dedup();
    println!(
        "checkov {}: {passed} passed, {} failed, of which skipped in deploy/checkov.yaml: {}",
        summary["checkov_version"].as_str().unwrap_or("?"),
        failed.len(),
        found
            .iter()
            .filter(|id| skips.contains(&id.to_string()))
            .count()
    );
    let mut problems = Vec::new();
    for f in &failed {
        let id = f["check_id"].as_str().unwrap_or("?");
        if !skips.iter().any(|s| s == id) {
            problems.push(format!(
                "{id} \"{}\" on {}: fix it in userspace/deploy, or skip it with its reason in deploy/checkov.yaml and docs/security.md",
                f["check_name"].as_str().unwrap_or("?"),
                f["resource"].as_str().unwrap_or("?")
            ));
        }
    }
    let docs = std::fs::read_to_string(root_dir().join("docs/security.md"))?;
    for id in &skips {
        if !found.contains(&id.as_str()) {
            problems.push(format!("{id} is skipped in deploy/checkov.yaml but nothing fails it now: remove it there and in docs/security.md"));
        }
        if !docs.contains(&format!("`{id}`")) {
            problems.push(format!("{id} is skipped in deploy/checkov.yaml but docs/security.md (Manifest linter findings) does not say why"));
        }
    }
    if !problems.is_empty() {
        bail!("manifest linter:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

/// The check IDs under `skip-check:` in deploy/checkov.yaml, each of which
/// must have its reason on the comment line above it.
fn checkov_skips(config: &str) -> Result<Vec<String>> {
    let mut skips = Vec::new();
    let mut in_list = false;
    let mut previous = "";
    for line in config.lines() {
        let t = line.trim();
        if !line.starts_with([' ', '#', '-']) && !t.is_empty() {
            in_list = t == "skip-check:";
        } else if let Some(id) = t.strip_prefix("- ").filter(|_| in_list) {
            if !previous.starts_with('#') {
                bail!("deploy/checkov.yaml skips {id} without a reason (a comment line above it)");
            }
            skips.push(id.trim().to_string());
        }
        previous = t;
    }
    Ok(skips)
}
