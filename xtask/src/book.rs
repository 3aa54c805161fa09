//! The docs as a book (mdBook, from crates.io): the reference pages are
//! generated from the tpbpf binary (`tpbpf __reference`: its commands from
//! clap, the project file's keys from its JSON Schema), every page of docs/
//! must be in the summary, then `mdbook build` writes target/book.
use std::{fs, process::Command};

use anyhow::{bail, Context, Result};

use crate::{cargo, root_dir, run, step};

pub fn build() -> Result<()> {
    let root = root_dir();
    let docs = root.join("docs");
    step("the book: reference pages from tpbpf itself (commands, project file keys)");
    run(cargo().args(["build", "-q", "-p", "tpbpf"]))?;
    run(Command::new(root.join("target/debug/tpbpf"))
        .arg("__reference")
        .arg(docs.join("reference")))?;

    step("the book: every page of docs/ is in docs/SUMMARY.md");
    let summary = fs::read_to_string(docs.join("SUMMARY.md")).context("reading docs/SUMMARY.md")?;
    let mut missing = Vec::new();
    for e in fs::read_dir(&docs)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") && name != "SUMMARY.md" && !summary.contains(&format!("({name})"))
        {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        missing.sort();
        bail!(
            "docs/SUMMARY.md does not list {}: add each where a reader would look for it",
            missing.join(", ")
        );
    }

    step("the book: mdbook build docs (into target/book)");
    let mdbook = which_mdbook().context(
        "mdbook is not installed: `bash xtask/setup.sh` installs it (cargo install mdbook)",
    )?;
    run(Command::new(mdbook).arg("build").arg(&docs))?;
    let index = root.join("target/book/index.html");
    if !index.is_file() {
        bail!("mdbook built no {}", index.display());
    }
    println!("the book: {}", index.display());
    Ok(())
}

fn which_mdbook() -> Option<std::path::PathBuf> {
    let home = std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo/bin"));
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(home)
        .map(|d| d.join("mdbook"))
        .find(|p| p.is_file())
}
