//! Settings from a project file (`tpbpf.yaml`, found upward from the
//! current directory, or `--config FILE`) and from a kubeconfig context's
//! extension (`extensions: - name: tpbpf`), and `tpbpf config
//! show|check|schema`.
//!
//! Precedence, per setting: a flag, then the environment (`TPBPF_CONTEXT`,
//! `TPBPF_NAMESPACES`, `TPBPF_MAPPED_NAMESPACES`, `TPBPF_TRANSPORT`), then
//! the project file, then the kubeconfig extension, then what `up`
//! discovers. Unknown keys and bad values are refused with the file, line
//! and key.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::Output;

/// The project file's name.
pub const FILE_NAME: &str = "tpbpf.yaml";

/// What a project file (or a kubeconfig extension) may set.
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// The kubeconfig context (default: the kubeconfig's current one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// The kubeconfig file, relative to the project file (project file
    /// only; default: $KUBECONFIG or ~/.kube/config).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Connected namespaces; bare names resolve in the first.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "namespaces"
    )]
    pub namespaces: Option<Vec<String>>,
    /// Only these namespaces' `svc.NS` names go to the cluster.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "namespaces"
    )]
    pub mapped_namespaces: Option<Vec<String>>,
    /// More ranges to bridge (CIDR).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "ranges"
    )]
    pub also_proxy: Option<Vec<String>>,
    /// Ranges never to bridge (CIDR).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "ranges"
    )]
    pub never_proxy: Option<Vec<String>>,
    /// The cluster domain (default `cluster.local`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "domain"
    )]
    pub cluster_domain: Option<String>,
    /// More DNS suffixes the cluster answers (beside the cluster domain).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "domains"
    )]
    pub dns_suffixes: Option<Vec<String>>,
    /// How the tunnel reaches the agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// Intercepts that `up` starts (and `down` ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intercepts: Option<Vec<InterceptSpec>>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Through the API server's port-forward.
    Portforward,
    /// TLS straight to the agent's node.
    Direct,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Portforward => "portforward",
            Transport::Direct => "direct",
        }
    }
}

/// One intercept `up` starts, as `tpbpf intercept` takes it.
#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InterceptSpec {
    /// A deployment, statefulset, daemonset, replicaset or pod, or
    /// `svc/NAME` (a service's selector's pods); NAME or KIND/NAME.
    pub workload: String,
    /// REMOTE[:LOCAL]: the workload's port (number or name) and the local
    /// one; or a list of them, one intercept each.
    #[serde(alias = "ports")]
    pub port: Ports,
    /// The workload's namespace (default: the first connected one).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "namespace"
    )]
    pub namespace: Option<String>,
    /// The intercept's name (default: WORKLOAD-REMOTE).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `steal` (default) or `mirror`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<InterceptMode>,
    /// Only HTTP requests with this header (NAME=VALUE).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_header: Option<String>,
    /// Only HTTP requests whose path starts with this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_path_prefix: Option<String>,
    /// Where to write the pod's environment (relative to the project file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InterceptMode {
    Steal,
    Mirror,
}

fn check_namespace<E: serde::de::Error>(n: &str) -> Result<(), E> {
    if tpbpf_sys::is_dns_label(n) {
        Ok(())
    } else {
        Err(E::custom(format!(
            "`{n}` is not a namespace name (lower case letters, digits and `-`, at most 63)"
        )))
    }
}

/// A namespace name, checked where it is read (so an error points at it).
struct Namespace(String);

impl<'de> Deserialize<'de> for Namespace {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = String::deserialize(d)?;
        check_namespace(&n)?;
        Ok(Self(n))
    }
}

/// A CIDR range, checked where it is read.
struct Range(String);

impl<'de> Deserialize<'de> for Range {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let c = String::deserialize(d)?;
        c.parse::<tpbpf_sys::Cidr>()
            .map_err(serde::de::Error::custom)?;
        Ok(Self(c))
    }
}

fn namespaces<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let v: Option<Vec<Namespace>> = Option::deserialize(d)?;
    Ok(v.map(|v| v.into_iter().map(|n| n.0).collect()))
}

fn namespace<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v: Option<Namespace> = Option::deserialize(d)?;
    Ok(v.map(|n| n.0))
}

fn ranges<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let v: Option<Vec<Range>> = Option::deserialize(d)?;
    Ok(v.map(|v| v.into_iter().map(|r| r.0).collect()))
}

/// A DNS domain, checked where it is read.
struct Domain(String);

impl<'de> Deserialize<'de> for Domain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = String::deserialize(d)?;
        if n.len() > 253 || !n.split('.').all(tpbpf_sys::is_dns_label) {
            return Err(serde::de::Error::custom(format!(
                "`{n}` is not a DNS domain (labels of lower case letters, digits and `-`)"
            )));
        }
        Ok(Self(n))
    }
}

fn domain<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v: Option<Domain> = Option::deserialize(d)?;
    Ok(v.map(|n| n.0))
}

fn domains<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let v: Option<Vec<Domain>> = Option::deserialize(d)?;
    Ok(v.map(|v| v.into_iter().map(|n| n.0).collect()))
}

/// One port (`"80:8080"`) or several (`["80:8080", "https:8443"]`).
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Ports {
    One(String),
    Many(Vec<String>),
}

impl Ports {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Ports::One(p) => vec![p],
            Ports::Many(v) => v,
        }
    }
}

/// A port, checked where it is read.
struct Port(String);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = String::deserialize(d)?;
        super::intercept::parse_port(&v)
            .map_err(|e| serde::de::Error::custom(format!("{e:#}").replace("--port ", "port ")))?;
        Ok(Self(v))
    }
}

impl<'de> Deserialize<'de> for Ports {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Ports;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a port (\"80:8080\") or a list of ports")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Ports, E> {
                let p = Port::deserialize(serde::de::value::StrDeserializer::<E>::new(v))?;
                Ok(Ports::One(p.0))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Ports, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Ports, A::Error> {
                let mut all = Vec::new();
                while let Some(p) = seq.next_element::<Port>()? {
                    if all.len() == 16 {
                        return Err(serde::de::Error::custom(
                            "at most 16 ports in one intercept",
                        ));
                    }
                    all.push(p.0);
                }
                if all.is_empty() {
                    return Err(serde::de::Error::custom("an empty list of ports"));
                }
                Ok(Ports::Many(all))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env(&'static str),
    Project(PathBuf),
    Kubeconfig(PathBuf, String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag => write!(f, "flag"),
            Source::Env(v) => write!(f, "environment ({v})"),
            Source::Project(p) => write!(f, "project file {}", p.display()),
            Source::Kubeconfig(p, c) => {
                write!(
                    f,
                    "kubeconfig {} (context {c}, extension tpbpf)",
                    p.display()
                )
            }
        }
    }
}

/// The project file: `explicit`, else `tpbpf.yaml` in the current
/// directory or the nearest parent that has one.
pub fn find_project(explicit: Option<&Path>) -> Result<Option<PathBuf>> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("--config {}: no such file", p.display());
        }
        return Ok(Some(p.to_path_buf()));
    }
    let mut dir = std::env::current_dir().ok();
    while let Some(d) = dir {
        let candidate = d.join(FILE_NAME);
        if candidate.is_file() {
            return Ok(Some(candidate));
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    Ok(None)
}

/// Reads a project file; paths in it become relative to its directory.
pub fn read_project(path: &Path) -> Result<Settings> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut s: Settings = serde_saphyr::from_str(&text).map_err(|e| {
        // The parser says `error:` and `<input>`; the file is the input.
        let e = e.to_string();
        let e = e.strip_prefix("error: ").unwrap_or(&e);
        anyhow::anyhow!(
            "{}: {}",
            path.display(),
            e.replace("<input>", &path.display().to_string())
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    if let Some(k) = &s.kubeconfig {
        s.kubeconfig = Some(base.join(k));
    }
    for i in s.intercepts.iter_mut().flatten() {
        if let Some(f) = &i.env_file {
            i.env_file = Some(base.join(f));
        }
    }
    Ok(s)
}

/// The kubeconfig file that will be read: `given`, else the first of
/// $KUBECONFIG, else ~/.kube/config.
fn kubeconfig_file(given: Option<&Path>) -> Option<PathBuf> {
    given.map(Path::to_path_buf).or_else(|| {
        std::env::var_os("KUBECONFIG")
            .filter(|k| !k.is_empty())
            .and_then(|k| std::env::split_paths(&k).next())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config")))
    })
}

/// The `tpbpf` extension of kubeconfig `file`'s context `context` (its
/// current one if `None`): the context's name and its settings.
fn read_extension(file: &Path, context: Option<&str>) -> Result<Option<(String, Settings)>> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Ok(None);
    };
    let kc: Value = serde_saphyr::from_str(&text)
        .map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", file.display()))?;
    let Some(name) = context
        .map(str::to_string)
        .or_else(|| kc["current-context"].as_str().map(str::to_string))
    else {
        return Ok(None);
    };
    let ctx = kc["contexts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"].as_str() == Some(&name));
    let ext = ctx
        .and_then(|c| c["context"]["extensions"].as_array())
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "tpbpf");
    let Some(ext) = ext else {
        return Ok(None);
    };
    let mut s: Settings = serde_json::from_value(ext["extension"].clone()).map_err(|e| {
        anyhow::anyhow!(
            "kubeconfig {}, context {name}, extension tpbpf: {e}",
            file.display()
        )
    })?;
    // A kubeconfig does not name another kubeconfig.
    s.kubeconfig = None;
    Ok(Some((name, s)))
}

/// The flags `up` was given, as settings (what the command line sets).
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub settings: Settings,
}

/// Every setting in force, with where it came from.
#[derive(Debug, Default)]
pub struct Resolved {
    pub settings: Settings,
    pub sources: BTreeMap<&'static str, Source>,
    pub project: Option<PathBuf>,
}

fn env_list(var: &str) -> Option<Vec<String>> {
    let v = std::env::var(var).ok().filter(|v| !v.is_empty())?;
    Some(v.split(',').map(|s| s.trim().to_string()).collect())
}

/// Merges the sources, highest first: flags, environment, project file,
/// kubeconfig extension.
pub fn resolve(flags: &Flags) -> Result<Resolved> {
    let project_path = find_project(flags.config.as_deref())?;
    let project = match &project_path {
        Some(p) => Some(read_project(p)?),
        None => None,
    };
    let env = Settings {
        context: std::env::var("TPBPF_CONTEXT")
            .ok()
            .filter(|v| !v.is_empty()),
        namespaces: env_list("TPBPF_NAMESPACES"),
        mapped_namespaces: env_list("TPBPF_MAPPED_NAMESPACES"),
        transport: match std::env::var("TPBPF_TRANSPORT").ok().as_deref() {
            None | Some("") => None,
            Some("portforward") => Some(Transport::Portforward),
            Some("direct") => Some(Transport::Direct),
            Some(other) => bail!("TPBPF_TRANSPORT={other}: portforward or direct"),
        },
        ..Settings::default()
    };
    let mut r = Resolved {
        project: project_path.clone(),
        ..Resolved::default()
    };
    let mut layers: Vec<(Source, Settings)> = vec![
        (Source::Flag, flags.settings.clone()),
        (Source::Env("TPBPF_*"), env),
    ];
    if let (Some(p), Some(s)) = (&project_path, project) {
        layers.push((Source::Project(p.clone()), s));
    }
    // The kubeconfig and context the layers above chose pick the extension.
    let kubeconfig = layers.iter().find_map(|(_, s)| s.kubeconfig.clone());
    let context = layers.iter().find_map(|(_, s)| s.context.clone());
    if let Some(file) = kubeconfig_file(kubeconfig.as_deref()) {
        if let Some((name, s)) = read_extension(&file, context.as_deref())? {
            layers.push((Source::Kubeconfig(file, name), s));
        }
    }
    macro_rules! take {
        ($($field:ident => $key:literal),* $(,)?) => {$(
            for (src, s) in &layers {
                if let Some(v) = &s.$field {
                    r.settings.$field = Some(v.clone());
                    let src = match src {
                        Source::Env(_) => Source::Env(env_name($key)),
                        other => other.clone(),
                    };
                    r.sources.insert($key, src);
                    break;
                }
            }
        )*};
    }
    take!(
        context => "context",
        kubeconfig => "kubeconfig",
        namespaces => "namespaces",
        mapped_namespaces => "mapped-namespaces",
        also_proxy => "also-proxy",
        never_proxy => "never-proxy",
        cluster_domain => "cluster-domain",
        dns_suffixes => "dns-suffixes",
        transport => "transport",
        intercepts => "intercepts",
    );
    Ok(r)
}

fn env_name(key: &str) -> &'static str {
    match key {
        "context" => "TPBPF_CONTEXT",
        "namespaces" => "TPBPF_NAMESPACES",
        "mapped-namespaces" => "TPBPF_MAPPED_NAMESPACES",
        "transport" => "TPBPF_TRANSPORT",
        _ => "TPBPF_*",
    }
}

#[derive(clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    action: ConfigAction,
    /// The project file (default: tpbpf.yaml here or in a parent directory).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Subcommand)]
enum ConfigAction {
    /// The settings `up` would use, and where each comes from.
    Show,
    /// Check the project file (and the kubeconfig extension): unknown keys
    /// and bad values, with file, line and key.
    Check,
    /// The project file's JSON Schema (for editors: `# yaml-language-server:
    /// $schema=...`).
    Schema,
}

/// The project file's JSON Schema, from the types `up` reads.
pub fn schema() -> Value {
    serde_json::to_value(schemars::schema_for!(Settings)).unwrap_or_default()
}

pub fn run(args: ConfigArgs) -> Result<ExitCode> {
    let flags = Flags {
        config: args.config.clone(),
        settings: Settings::default(),
    };
    match args.action {
        ConfigAction::Schema => println!("{}", serde_json::to_string_pretty(&schema())?),
        ConfigAction::Check => {
            let r = resolve(&flags)?;
            let what = match &r.project {
                Some(p) => format!("{} is valid", p.display()),
                None => format!("no {FILE_NAME} here or above (settings from flags, the environment and the kubeconfig only)"),
            };
            match args.output {
                Output::Table => println!("{what}"),
                o => print!(
                    "{}",
                    o.render(&json!({"project": r.project, "valid": true}))
                ),
            }
        }
        ConfigAction::Show => {
            let r = resolve(&flags)?;
            let values = serde_json::to_value(&r.settings)?;
            match args.output {
                Output::Table => {
                    println!("{:<18} {:<40} FROM", "SETTING", "VALUE");
                    for (key, src) in &r.sources {
                        let field = key.replace('-', "_");
                        let v = &values[key.to_string()];
                        let v = if v.is_null() { &values[&field] } else { v };
                        println!("{key:<18} {:<40} {src}", v.to_string());
                    }
                    if r.sources.is_empty() {
                        println!("(nothing set: `up` discovers everything)");
                    }
                }
                o => {
                    let sources: BTreeMap<&str, String> =
                        r.sources.iter().map(|(k, s)| (*k, s.to_string())).collect();
                    print!(
                        "{}",
                        o.render(
                            &json!({"project": r.project, "settings": values, "sources": sources})
                        )
                    )
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
