//! The book's pages that say what to type: the getting-started page's
//! commands run as written against a lab of the test's own (the blocks
//! marked `<!-- book-test: machine -->` as root on this machine, `sudo `
//! dropped since the test is root; those marked `<!-- book-test: lab
//! shell -->` inside `tpbpf lab shell`), and every error message the
//! troubleshooting page is indexed by is one tpbpf still prints.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use tpbpf_vm_tests::*;

fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

/// The `sh` blocks after each `<!-- book-test: WHERE -->` marker, in order.
fn marked_blocks(page: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = page;
    while let Some(at) = rest.find("<!-- book-test: ") {
        rest = &rest[at + "<!-- book-test: ".len()..];
        let (place, after) = rest.split_once(" -->").expect("a closed marker");
        let block = after
            .split_once("```sh\n")
            .expect("a sh block after the marker")
            .1;
        let (body, next) = block.split_once("```").expect("the block ends");
        out.push((place.to_string(), body.to_string()));
        rest = next;
    }
    out
}

/// Takes the lab down whatever happens.
struct LabDown(String);

impl Drop for LabDown {
    fn drop(&mut self) {
        let _ = Command::new(tpbpf_bin())
            .args(["lab", "--name", &self.0, "down"])
            .output();
    }
}

#[test]
fn the_getting_started_page_runs_as_written() {
    if !require_root() {
        return;
    }
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        skip("the lab's servers are not installed (sudo bash xtask/setup.sh installs them)");
        return;
    }
    let page = std::fs::read_to_string(docs().join("getting-started.md")).unwrap();
    let blocks = marked_blocks(&page);
    assert!(
        blocks.iter().any(|(p, _)| p == "machine") && blocks.iter().any(|(p, _)| p == "lab shell"),
        "the page has no marked blocks: {blocks:?}"
    );
    let lab = unique_name("gs");
    let _down = LabDown(lab.clone());
    let home = TempDir::new("tpbpf-getting-started");
    // `tpbpf` is this build's.
    let bin_dir = tpbpf_bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let sh = |script: &str, shell: bool| {
        let mut cmd = if shell {
            let mut c = Command::new(tpbpf_bin());
            c.args(["lab", "shell", "--", "sh", "-e", "-x", "-c", script]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-e", "-x", "-c", script]);
            c
        };
        let out = cmd
            .current_dir(&home.0)
            .env("TPBPF_LAB", &lab)
            .env("PATH", &path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{text}");
        assert!(
            out.status.success(),
            "the page's commands failed:\n{script}\n{text}"
        );
        text
    };
    let mut shell_out = String::new();
    // Consecutive lab-shell blocks are one shell, as a reader types them.
    let mut pending = String::new();
    for (place, body) in &blocks {
        match place.as_str() {
            "machine" => {
                if !pending.is_empty() {
                    shell_out.push_str(&sh(&pending, true));
                    pending.clear();
                }
                let script: String = body
                    .lines()
                    .map(|l| l.strip_prefix("sudo ").unwrap_or(l))
                    .map(|l| format!("{l}\n"))
                    .collect();
                sh(&script, false);
            }
            "lab shell" => pending.push_str(body),
            other => panic!("unknown place `{other}`"),
        }
    }
    assert!(pending.is_empty(), "the page ends inside the lab shell");
    // What the page says each command shows.
    for said in [
        "served by nginx",
        "PONG",
        "hello from my laptop",
        "WEB_GREETING=hello from the lab",
    ] {
        assert!(shell_out.contains(said), "no `{said}` in:\n{shell_out}");
    }
    // The page's last step took the lab down.
    assert!(!Path::new("/run/netns").join(format!("{lab}-dev")).exists());
}

#[test]
fn every_message_the_troubleshooting_page_names_is_still_printed() {
    let page = std::fs::read_to_string(docs().join("troubleshooting.md")).unwrap();
    // Headings `### `message`` quote what tpbpf prints; `…` stands for a
    // part that varies.
    let messages: Vec<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("### `"))
        .filter_map(|l| l.strip_suffix('`'))
        .collect();
    assert!(messages.len() >= 10, "{messages:?}");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut sources = String::new();
    for dir in ["userspace", "agent/src"] {
        collect_rs(&root.join(dir), &mut sources);
    }
    for m in messages {
        for part in m.split('…').map(str::trim).filter(|p| p.len() >= 8) {
            assert!(
                sources.contains(part),
                "troubleshooting.md names `{m}`, but no source prints `{part}`"
            );
        }
    }
}

fn collect_rs(dir: &Path, into: &mut String) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_rs(&p, into);
        } else if p.extension().is_some_and(|x| x == "rs") {
            // A string continued over lines (`\` at the end) reads as one.
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let mut continued = false;
            for line in text.split('\n') {
                let line = if continued { line.trim_start() } else { line };
                match line.strip_suffix('\\') {
                    Some(head) => {
                        into.push_str(head);
                        continued = true;
                    }
                    None => {
                        into.push_str(line);
                        into.push('\n');
                        continued = false;
                    }
                }
            }
        }
    }
}
