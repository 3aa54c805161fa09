//! What the guest's logs say: pass, fail or skip per test, and the
//! record of each kernel's run in docs/kernels.json and docs/kernels.md.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    path::Path,
};

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::root_dir;

use super::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Outcome {
    Pass,
    Fail,
    Skip,
    /// The binary was selected but never reported (killed, or the guest
    /// ended first).
    NotRun,
}

pub(super) struct TestResult {
    pub(super) binary: String,
    pub(super) test: String,
    pub(super) outcome: Outcome,
    /// A skip's reason, or what ended a binary that did not report.
    pub(super) note: String,
}

pub(super) fn collect(out: &Path, selected: &[Selected]) -> Result<Vec<TestResult>> {
    let status = fs::read_to_string(out.join("status")).unwrap_or_default();
    let mut results = Vec::new();
    for s in selected {
        let name = &s.bin.name;
        let log = fs::read_to_string(out.join(format!("logs/{name}.log"))).unwrap_or_default();
        let code = status.lines().find_map(|l| {
            l.strip_prefix(&format!("{name} "))
                .and_then(|c| c.trim().parse::<i32>().ok())
        });
        let mut skips = BTreeMap::new();
        for l in log.lines() {
            if let Some(rest) = l.strip_prefix("SKIP ") {
                if let Some((test, reason)) = rest.split_once(": ") {
                    skips.insert(test.to_string(), reason.to_string());
                }
            }
        }
        let mut seen = BTreeSet::new();
        for l in log.lines() {
            let Some(rest) = l.strip_prefix("test ") else {
                continue;
            };
            let Some((test, result)) = rest.rsplit_once(" ... ") else {
                continue;
            };
            let test = test.to_string();
            let (outcome, note) = match result.trim() {
                "ok" => match skips.get(&test) {
                    Some(r) => (Outcome::Skip, r.clone()),
                    None => (Outcome::Pass, String::new()),
                },
                "FAILED" => (Outcome::Fail, failure_of(&log, &test)),
                "ignored" => (Outcome::Skip, "ignored".into()),
                _ => continue,
            };
            seen.insert(test.clone());
            results.push(TestResult {
                binary: name.clone(),
                test,
                outcome,
                note,
            });
        }
        let finished = log.contains("test result:");
        if !finished {
            let note = match code {
                Some(137) => "killed at --binary-timeout".to_string(),
                Some(c) => format!("exited {c} before reporting"),
                None => "did not run".to_string(),
            };
            results.push(TestResult {
                binary: name.clone(),
                test: "(binary)".into(),
                outcome: if code.is_some() {
                    Outcome::Fail
                } else {
                    Outcome::NotRun
                },
                note,
            });
        }
    }
    Ok(results)
}

/// What a failed test's output says of the cause: tpbpf's own error line
/// or the verifier's verdict where there is one, else the panic's place and
/// its first line.
pub(super) fn failure_of(log: &str, test: &str) -> String {
    let marker = format!("---- {test} stdout ----");
    let Some(at) = log.find(&marker) else {
        return String::new();
    };
    let block = &log[at + marker.len()..];
    let block = block.split("\n---- ").next().unwrap_or(block);
    let lines: Vec<&str> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let cause = lines
        .iter()
        .find(|l| l.contains("tpbpf: error:") && !l.ends_with("did not start:"))
        .or_else(|| {
            lines
                .iter()
                .find(|l| l.contains("verifier_log:") || l.contains("Verifier output:"))
        })
        .map(|l| l.to_string());
    let text = cause.unwrap_or_else(|| {
        let mut it = lines.iter().skip_while(|l| !l.contains("panicked at"));
        let place = it
            .next()
            .and_then(|l| l.split("panicked at ").nth(1))
            .unwrap_or("")
            .trim_end_matches(':')
            .to_string();
        format!("{place}: {}", it.next().unwrap_or(&""))
    });
    text.chars().take(240).collect()
}

pub(super) fn counts(results: &[TestResult]) -> (usize, usize, usize) {
    let n = |o| results.iter().filter(|r| r.outcome == o).count();
    (n(Outcome::Pass), n(Outcome::Fail), n(Outcome::Skip))
}

pub(super) fn print_results(results: &[TestResult]) {
    println!();
    for r in results {
        let word = match r.outcome {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
            Outcome::NotRun => "NOT RUN",
        };
        if r.note.is_empty() {
            println!("{word:<7} {}::{}", r.binary, r.test);
        } else {
            println!("{word:<7} {}::{}  ({})", r.binary, r.test, r.note);
        }
    }
}

/// Merges this run into docs/kernels.json (one object per kernel line)
/// and rewrites the matrix in docs/kernels.md from it.
pub(super) fn record(
    kernel: &Kernel,
    results: &[TestResult],
    guest_secs: f64,
    partial: bool,
) -> Result<()> {
    let json_path = root_dir().join("docs/kernels.json");
    let mut all: BTreeMap<String, Value> = fs::read_to_string(&json_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let line = kernel
        .release
        .split('.')
        .take(2)
        .collect::<Vec<_>>()
        .join(".");
    let mut tests = serde_json::Map::new();
    for r in results {
        let word = match r.outcome {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Skip => "skip",
            Outcome::NotRun => "not run",
        };
        tests.insert(
            format!("{}::{}", r.binary, r.test),
            json!({ "result": word, "note": r.note }),
        );
    }
    let package = format!("{} {}", kernel.package, kernel.version);
    // A partial run of the same package updates its tests in a whole-suite
    // entry (a re-run of what failed); anything else replaces the entry.
    let (tests, partial, guest_secs) = match all.get(&line) {
        Some(old)
            if partial
                && old["partial"] == false
                && old["package"].as_str() == Some(package.as_str()) =>
        {
            let mut merged = old["tests"].as_object().cloned().unwrap_or_default();
            merged.extend(tests);
            (
                merged,
                false,
                old["guest_seconds"].as_f64().unwrap_or(0.0) + guest_secs,
            )
        }
        _ => (tests, partial, guest_secs),
    };
    let n = |word: &str| tests.values().filter(|t| t["result"] == word).count();
    let (pass, fail, skip) = (n("pass"), n("fail"), n("skip"));
    all.insert(
        line,
        json!({
            "release": kernel.release,
            "package": package,
            "partial": partial,
            "guest_seconds": guest_secs.round() as u64,
            "passed": pass, "failed": fail, "skipped": skip,
            "tests": tests,
        }),
    );
    fs::write(&json_path, serde_json::to_string_pretty(&all)? + "\n")?;
    write_matrix(&all)?;
    println!("recorded in docs/kernels.json and docs/kernels.md");
    Ok(())
}

pub(super) const MATRIX_BEGIN: &str =
    "<!-- matrix: written by `cargo xtask vm-test --record`; do not edit -->";

pub(super) const MATRIX_END: &str = "<!-- end of matrix -->";

pub(super) fn write_matrix(all: &BTreeMap<String, Value>) -> Result<()> {
    let md_path = root_dir().join("docs/kernels.md");
    let text = fs::read_to_string(&md_path)
        .unwrap_or_else(|_| format!("# Kernels\n\n{MATRIX_BEGIN}\n{MATRIX_END}\n"));
    let (Some(b), Some(e)) = (text.find(MATRIX_BEGIN), text.find(MATRIX_END)) else {
        bail!("docs/kernels.md has lost its matrix markers ({MATRIX_BEGIN} … {MATRIX_END})");
    };
    let mut names = BTreeSet::new();
    for v in all.values() {
        if let Some(t) = v["tests"].as_object() {
            names.extend(t.keys().cloned());
        }
    }
    let mut kernels: Vec<(&String, &Value)> = all.iter().collect();
    kernels.sort_by_key(|(k, _)| {
        k.split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0))
            .collect::<Vec<_>>()
    });
    let mut m = String::new();
    writeln!(m, "{MATRIX_BEGIN}\n")?;
    writeln!(
        m,
        "| kernel | package | run | passed | failed | skipped | guest time |"
    )?;
    writeln!(m, "|---|---|---|---|---|---|---|")?;
    for (k, v) in &kernels {
        writeln!(
            m,
            "| {k} ({}) | {} | {} | {} | {} | {} | {} s |",
            v["release"].as_str().unwrap_or("?"),
            v["package"].as_str().unwrap_or("?"),
            if v["partial"] == true {
                "subset"
            } else {
                "whole suite"
            },
            v["passed"],
            v["failed"],
            v["skipped"],
            v["guest_seconds"].as_f64().unwrap_or(0.0).round() as u64
        )?;
    }
    writeln!(m)?;
    write!(m, "| test |")?;
    for (k, _) in &kernels {
        write!(m, " {k} |")?;
    }
    writeln!(m)?;
    write!(m, "|---|")?;
    for _ in &kernels {
        write!(m, "---|")?;
    }
    writeln!(m)?;
    let mut notes = Vec::new();
    for name in &names {
        write!(m, "| `{name}` |")?;
        for (k, v) in &kernels {
            let t = &v["tests"][name.as_str()];
            let cell = match t["result"].as_str() {
                None => "".to_string(),
                Some(r) => {
                    let note = t["note"].as_str().unwrap_or("");
                    if note.is_empty() || r == "pass" {
                        r.to_string()
                    } else {
                        notes.push(format!("{k}, `{name}`: {note}"));
                        format!("{r} [{}]", notes.len())
                    }
                }
            };
            write!(m, " {cell} |")?;
        }
        writeln!(m)?;
    }
    if !notes.is_empty() {
        writeln!(m)?;
        for (i, n) in notes.iter().enumerate() {
            writeln!(m, "{}. {}", i + 1, n.replace('|', "\\|"))?;
        }
    }
    writeln!(m, "\n{MATRIX_END}")?;
    let new = format!(
        "{}{}{}",
        &text[..b],
        m,
        &text[e + MATRIX_END.len()..].trim_start_matches('\n')
    );
    fs::write(&md_path, new)?;
    Ok(())
}
