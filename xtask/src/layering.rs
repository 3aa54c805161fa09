//! The workspace's shape, checked: which crate may depend on which (from
//! `cargo metadata`'s resolved graph), and how long a product source file
//! may grow.
//!
//! The graph check is a pure function over [`Graph`], so its tests feed it
//! hand-made metadata; [`check_workspace`] runs it, and the file-size rule,
//! on the real workspace.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{cargo, root_dir, step};

/// The most lines a product source file may have; past it, split the file
/// by job.
pub const MAX_LINES: usize = 800;

/// The root service and the eBPF loader never link the cluster, tunnel or
/// HTTP/TLS stacks, nor the lab.
const RULE_ROOT: &str =
    "rule 1 (the root service and the loader stay off the cluster, tunnel and HTTP stacks)";
const ROOT_SUBJECTS: &[&str] = &["tpbpfd", "tpbpf-loader"];
const ROOT_FORBIDDEN: &[&str] = &[
    "tpbpf-kube",
    "tpbpf-mux",
    "hyper",
    "rustls",
    "kube",
    "kube-client",
    "tpbpf-lab",
    "tpbpf-lab-api",
];

/// Only the root service's side loads eBPF programs.
const RULE_NO_AYA: &str = "rule 2 (the user's side, the cluster and the tunnel never link aya)";
const NO_AYA_SUBJECTS: &[&str] = &["tpbpf-userside", "tpbpf-kube", "tpbpf-mux", "tpbpf-proto"];
const NO_AYA_FORBIDDEN: &[&str] = &["aya"];

/// A contract between processes depends on serde at most, so every process
/// can take it.
const RULE_CONTRACT: &str = "rule 3 (contract crates depend on serde only)";
/// The contract crates by name; any other member named `*-api` is one too,
/// except the lab's API server.
const CONTRACT_SUBJECTS: &[&str] = &["tpbpf-agent-api", "tpbpf-bridge-api", "tpbpf-proto"];
const NOT_A_CONTRACT: &[&str] = &["tpbpf-lab-api"];
const CONTRACT_ALLOWED: &[&str] = &["serde"];

/// The lab is a test bench: the CLI's `lab` command, the tasks and the
/// privileged tests use it, no product crate does.
const RULE_LAB: &str = "rule 4 (only the CLI, xtask and the privileged tests use the lab)";
const LAB_CRATES: &[&str] = &["tpbpf-lab", "tpbpf-lab-api"];
const LAB_USERS: &[&str] = &[
    "tpbpf",
    "xtask",
    "tpbpf-vm-tests",
    "tpbpf-lab",
    "tpbpf-lab-api",
];

/// The agent runs in the cluster: it shares contracts with the developer's
/// machine, not code.
const RULE_AGENT: &str = "rule 5 (the agent links neither side of the developer's machine)";
const AGENT_SUBJECTS: &[&str] = &["tpbpf-agent"];
const AGENT_FORBIDDEN: &[&str] = &["tpbpfd", "tpbpf-userside", "tpbpf-kube"];

/// The resolved dependency graph, normal and build dependencies only (a
/// dev-dependency does not ship).
///
/// Cargo resolves features for the whole workspace at once, so an edge here
/// can come from a feature another member turns on; a path that surprises
/// is worth checking with `cargo tree -p CRATE -e normal,build -i DEP`.
#[derive(Debug, Default)]
pub struct Graph {
    /// By package id.
    crates: BTreeMap<String, Crate>,
}

#[derive(Debug)]
struct Crate {
    name: String,
    /// A workspace member, not a crate from a registry.
    member: bool,
    /// Package ids, in the order of their names.
    deps: Vec<String>,
}

/// One dependency that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: &'static str,
    /// The crate the rule is about.
    pub krate: String,
    /// From `krate` to the crate it must not depend on, both included.
    pub path: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let to = self.path.last().map_or("?", String::as_str);
        write!(
            f,
            "{}: {} depends on {to}: {}",
            self.rule,
            self.krate,
            self.path.join(" -> ")
        )
    }
}

/// What [`check`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub violations: Vec<Violation>,
    /// Rules (or parts of one) whose crate is not in the workspace yet.
    pub skipped: Vec<String>,
}

impl Graph {
    /// The graph in `cargo metadata --format-version 1`'s output.
    pub fn from_metadata(metadata: &Value) -> Result<Graph> {
        let members: BTreeSet<&str> = metadata["workspace_members"]
            .as_array()
            .context("cargo metadata: no `workspace_members` list")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let mut names = BTreeMap::new();
        for p in metadata["packages"]
            .as_array()
            .context("cargo metadata: no `packages` list")?
        {
            let id = p["id"]
                .as_str()
                .context("cargo metadata: a package without an id")?;
            let name = p["name"]
                .as_str()
                .with_context(|| format!("cargo metadata: package {id} has no name"))?;
            names.insert(id, name);
        }
        let nodes = metadata["resolve"]["nodes"]
            .as_array()
            .context("cargo metadata: no `resolve.nodes` (was it run with --no-deps?)")?;
        let mut crates = BTreeMap::new();
        for node in nodes {
            let id = node["id"]
                .as_str()
                .context("cargo metadata: a resolve node without an id")?;
            let name = *names
                .get(id)
                .with_context(|| format!("cargo metadata: resolve node {id} is not a package"))?;
            let mut deps = Vec::new();
            for dep in node["deps"].as_array().into_iter().flatten() {
                let pkg = dep["pkg"].as_str().with_context(|| {
                    format!("cargo metadata: a dependency of {name} without a pkg")
                })?;
                // `kind` is null for a normal dependency.
                let ships = dep["dep_kinds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|k| k["kind"].as_str() != Some("dev"));
                if ships {
                    let dep_name = names.get(pkg).with_context(|| {
                        format!("cargo metadata: {name} depends on {pkg}, which is not a package")
                    })?;
                    deps.push((*dep_name, pkg.to_string()));
                }
            }
            deps.sort();
            deps.dedup();
            crates.insert(
                id.to_string(),
                Crate {
                    name: name.to_string(),
                    member: members.contains(id),
                    deps: deps.into_iter().map(|(_, id)| id).collect(),
                },
            );
        }
        Ok(Graph { crates })
    }

    /// The id of the workspace member called `name`.
    fn member(&self, name: &str) -> Option<&str> {
        self.crates
            .iter()
            .find(|(_, c)| c.member && c.name == name)
            .map(|(id, _)| id.as_str())
    }

    fn members(&self) -> impl Iterator<Item = (&str, &Crate)> {
        self.crates
            .iter()
            .filter(|(_, c)| c.member)
            .map(|(id, c)| (id.as_str(), c))
    }

    fn name<'a>(&'a self, id: &'a str) -> &'a str {
        self.crates.get(id).map_or(id, |c| c.name.as_str())
    }

    fn deps(&self, id: &str) -> &[String] {
        self.crates.get(id).map_or(&[], |c| c.deps.as_slice())
    }

    /// The shortest path from `from` to each crate named in `forbidden` it
    /// reaches, not looking past a forbidden crate (the first one on a path
    /// is the one to remove).
    fn reach(&self, from: &str, forbidden: &[&str]) -> Vec<Vec<String>> {
        let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = VecDeque::from([from]);
        let mut found = Vec::new();
        let mut reported = BTreeSet::new();
        while let Some(id) = queue.pop_front() {
            for dep in self.deps(id) {
                if dep == from || parent.contains_key(dep.as_str()) {
                    continue;
                }
                parent.insert(dep, id);
                let name = self.name(dep);
                if !forbidden.contains(&name) {
                    queue.push_back(dep);
                    continue;
                }
                if reported.insert(name) {
                    let mut path = vec![name.to_string()];
                    let mut at = id;
                    while at != from {
                        path.push(self.name(at).to_string());
                        at = parent[at];
                    }
                    path.push(self.name(from).to_string());
                    path.reverse();
                    found.push(path);
                }
            }
        }
        found
    }
}

/// Every rule over `graph`.
pub fn check(graph: &Graph) -> Report {
    let mut report = Report::default();
    for (rule, subjects, forbidden) in [
        (RULE_ROOT, ROOT_SUBJECTS, ROOT_FORBIDDEN),
        (RULE_NO_AYA, NO_AYA_SUBJECTS, NO_AYA_FORBIDDEN),
        (RULE_AGENT, AGENT_SUBJECTS, AGENT_FORBIDDEN),
    ] {
        for subject in subjects {
            let Some(id) = graph.member(subject) else {
                report.skipped.push(missing(rule, subject));
                continue;
            };
            for path in graph.reach(id, forbidden) {
                report.violations.push(Violation {
                    rule,
                    krate: subject.to_string(),
                    path,
                });
            }
        }
    }
    contracts(graph, &mut report);
    lab_users(graph, &mut report);
    report
        .violations
        .sort_by(|a, b| (a.rule, &a.krate, &a.path).cmp(&(b.rule, &b.krate, &b.path)));
    report
}

fn missing(rule: &str, subject: &str) -> String {
    let rule = rule.split(" (").next().unwrap_or(rule);
    format!("{rule}: no crate {subject} in the workspace yet, skipped for it")
}

fn contracts(graph: &Graph, report: &mut Report) {
    let mut subjects: BTreeSet<&str> = CONTRACT_SUBJECTS.iter().copied().collect();
    for (_, c) in graph.members() {
        if c.name.ends_with("-api") && !NOT_A_CONTRACT.contains(&c.name.as_str()) {
            subjects.insert(&c.name);
        }
    }
    for subject in subjects {
        let Some(id) = graph.member(subject) else {
            report.skipped.push(missing(RULE_CONTRACT, subject));
            continue;
        };
        for dep in graph.deps(id) {
            let name = graph.name(dep);
            if !CONTRACT_ALLOWED.contains(&name) {
                report.violations.push(Violation {
                    rule: RULE_CONTRACT,
                    krate: subject.to_string(),
                    path: vec![subject.to_string(), name.to_string()],
                });
            }
        }
    }
}

fn lab_users(graph: &Graph, report: &mut Report) {
    let labs: Vec<&str> = LAB_CRATES
        .iter()
        .copied()
        .filter(|lab| graph.member(lab).is_some())
        .collect();
    if labs.is_empty() {
        report
            .skipped
            .push(missing(RULE_LAB, &LAB_CRATES.join(" or ")));
        return;
    }
    for (id, c) in graph.members() {
        if LAB_USERS.contains(&c.name.as_str()) {
            continue;
        }
        for dep in graph.deps(id) {
            let name = graph.name(dep);
            if labs.contains(&name) {
                report.violations.push(Violation {
                    rule: RULE_LAB,
                    krate: c.name.clone(),
                    path: vec![c.name.clone(), name.to_string()],
                });
            }
        }
    }
}

/// The product's source files: `userspace/*/src` and `agent/src`, without
/// benchmarks (`userspace/mux-bench`, `benches/`), tests (`tests/`) and
/// kernel code (`bpf/`). The lab crates count: they ship in the CLI.
pub fn product_sources(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = vec![root.join("agent/src")];
    let userspace = root.join("userspace");
    let entries = std::fs::read_dir(&userspace)
        .with_context(|| format!("reading {}", userspace.display()))?;
    for e in entries.flatten() {
        if e.file_name() != "mux-bench" {
            dirs.push(e.path().join("src"));
        }
    }
    let mut files = Vec::new();
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                if !["tests", "benches", "bpf"]
                    .iter()
                    .any(|d| e.file_name() == *d)
                {
                    dirs.push(path);
                }
            } else if path.extension().is_some_and(|x| x == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The files of `files` (with their texts) longer than `max` lines, longest
/// first.
pub fn too_long<'a>(
    files: impl IntoIterator<Item = (&'a Path, &'a str)>,
    max: usize,
) -> Vec<(&'a Path, usize)> {
    let mut long: Vec<_> = files
        .into_iter()
        .map(|(path, text)| (path, text.lines().count()))
        .filter(|&(_, n)| n > max)
        .collect();
    long.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    long
}

/// Both checks on this workspace, each run to the end before either fails.
pub fn check_workspace() -> Result<()> {
    step("crate boundaries (cargo metadata's resolved graph, normal and build dependencies)");
    let boundaries = crate_boundaries();
    if let Err(e) = &boundaries {
        println!("{e:#}");
    }

    step(&format!("no product source file over {MAX_LINES} lines"));
    let sizes = file_sizes();
    if let Err(e) = &sizes {
        println!("{e:#}");
    }

    match (boundaries, sizes) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(_), Ok(())) => bail!("crate boundaries: see above"),
        (Ok(()), Err(_)) => bail!("product source files over {MAX_LINES} lines: see above"),
        (Err(_), Err(_)) => {
            bail!("crate boundaries, and source files over {MAX_LINES} lines: see above")
        }
    }
}

fn crate_boundaries() -> Result<()> {
    let out = cargo()
        .args(["metadata", "--format-version", "1"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let metadata: Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata's output")?;
    let graph = Graph::from_metadata(&metadata)?;
    println!(
        "{} workspace crates, {} crates in all",
        graph.members().count(),
        graph.crates.len()
    );
    let report = check(&graph);
    for note in &report.skipped {
        println!("note: {note}");
    }
    if !report.violations.is_empty() {
        bail!(
            "{} dependency paths cross a crate boundary (a dev-dependency would not count):\n  {}",
            report.violations.len(),
            report
                .violations
                .iter()
                .map(Violation::to_string)
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
    println!("none crossed");
    Ok(())
}

fn file_sizes() -> Result<()> {
    let root = root_dir();
    let mut texts = Vec::new();
    for path in product_sources(&root)? {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let shown = path.strip_prefix(&root).unwrap_or(&path).to_path_buf();
        texts.push((shown, text));
    }
    let long = too_long(
        texts.iter().map(|(p, t)| (p.as_path(), t.as_str())),
        MAX_LINES,
    );
    if !long.is_empty() {
        bail!(
            "{} product source files are over {MAX_LINES} lines (split each by job):\n  {}",
            long.len(),
            long.iter()
                .map(|(p, n)| format!("{}: {n} lines", p.display()))
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
    println!("none");
    Ok(())
}

#[cfg(test)]
mod tests;
