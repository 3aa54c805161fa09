//! The book's reference pages, generated from what the binary itself
//! knows (`tpbpf __reference DIR`, run by `cargo xtask book`): every
//! command with its usage, arguments and help from clap, and the project
//! file's keys from its JSON Schema. Generated, so they cannot drift.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use clap::Command;
use serde_json::Value;

/// Writes `cli.md` and `config-keys.md` into `dir`.
pub fn write(root: Command, schema: &Value, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    let cli = dir.join("cli.md");
    std::fs::write(&cli, cli_page(root)).with_context(|| format!("writing {}", cli.display()))?;
    let keys = dir.join("config-keys.md");
    std::fs::write(&keys, config_page(schema))
        .with_context(|| format!("writing {}", keys.display()))?;
    Ok(())
}

fn cli_page(mut root: Command) -> String {
    root.build();
    let mut out = String::from(
        "# Command reference\n\nGenerated from `tpbpf` itself (`cargo xtask book`); `tpbpf COMMAND --help` says the same.\n\n",
    );
    let mut stack = vec![("tpbpf".to_string(), root)];
    let mut pages = Vec::new();
    while let Some((name, cmd)) = stack.pop() {
        let mut subs: Vec<Command> = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .cloned()
            .collect();
        subs.reverse();
        for sub in subs {
            stack.push((format!("{name} {}", sub.get_name()), sub));
        }
        pages.push((name, cmd));
    }
    for (name, mut cmd) in pages {
        let depth = name.matches(' ').count();
        let hashes = "#".repeat((depth + 2).min(4));
        let _ = writeln!(out, "{hashes} `{name}`\n");
        if let Some(about) = cmd.get_long_about().or(cmd.get_about()) {
            let _ = writeln!(out, "{about}\n");
        }
        let usage = cmd.render_usage().to_string();
        let usage = usage.trim_start_matches("Usage: ");
        let _ = writeln!(out, "```text\n{usage}\n```\n");
        // Global options are listed once, under `tpbpf`.
        let top = depth == 0;
        let args: Vec<_> = cmd
            .get_arguments()
            .filter(|a| !a.is_hide_set() && a.get_id() != "help" && a.get_id() != "version")
            .filter(|a| top || !a.is_global_set())
            .collect();
        if !args.is_empty() {
            out.push_str("| Argument | What it does |\n|---|---|\n");
            for a in args {
                let spelled = match (a.get_short(), a.get_long()) {
                    (Some(s), Some(l)) => format!("`-{s}`, `--{l}`"),
                    (None, Some(l)) => format!("`--{l}`"),
                    (Some(s), None) => format!("`-{s}`"),
                    (None, None) => format!("`{}`", a.get_id().as_str().to_uppercase()),
                };
                let mut help = a
                    .get_long_help()
                    .or(a.get_help())
                    .map(|h| h.to_string())
                    .unwrap_or_default()
                    .replace('\n', " ")
                    .replace('|', "\\|")
                    .replace('<', "&lt;")
                    .replace('>', "&gt;");
                if !help.is_empty() && !help.ends_with('.') && !help.ends_with(')') {
                    help.push('.');
                }
                let values: Vec<String> = a
                    .get_possible_values()
                    .iter()
                    .filter(|v| !v.is_hide_set())
                    .map(|v| format!("`{}`", v.get_name()))
                    .collect();
                if !values.is_empty() {
                    let _ = write!(help, " One of {}.", values.join(", "));
                }
                let defaults: Vec<String> = a
                    .get_default_values()
                    .iter()
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect();
                if !defaults.is_empty() {
                    let _ = write!(help, " Default: `{}`.", defaults.join(","));
                }
                if let Some(env) = a.get_env() {
                    let _ = write!(help, " Environment: `{}`.", env.to_string_lossy());
                }
                let _ = writeln!(out, "| {spelled} | {} |", help.trim());
            }
            out.push('\n');
        }
    }
    out
}

fn config_page(schema: &Value) -> String {
    let mut out = String::from(
        "# Project file keys\n\nGenerated from the JSON Schema `tpbpf config schema` prints (`cargo xtask book`); the guide is [Project settings](../config.md).\n\n",
    );
    table(&mut out, "`tpbpf.yaml`", &schema["properties"]);
    for (name, def) in schema["$defs"].as_object().into_iter().flatten() {
        if def["properties"].is_object() {
            table(
                &mut out,
                &format!("`{name}` (each intercept)"),
                &def["properties"],
            );
        } else {
            let _ = writeln!(out, "## `{name}`\n\n{}\n", describe(def).replace('\n', " "));
        }
    }
    out
}

fn table(out: &mut String, title: &str, props: &Value) {
    let _ = writeln!(
        out,
        "## {title}\n\n| Key | Type | What it sets |\n|---|---|---|"
    );
    for (key, p) in props.as_object().into_iter().flatten() {
        let _ = writeln!(
            out,
            "| `{key}` | {} | {} |",
            type_of(p),
            p["description"]
                .as_str()
                .unwrap_or("")
                .replace('\n', " ")
                .replace('|', "\\|")
        );
    }
    out.push('\n');
}

fn describe(def: &Value) -> String {
    let mut text = def["description"].as_str().unwrap_or("").to_string();
    let values: Vec<String> = def["enum"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(
            def["oneOf"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.get("const")),
        )
        .filter_map(|v| v.as_str().map(|s| format!("`{s}`")))
        .collect();
    if !values.is_empty() {
        let _ = write!(text, " One of {}.", values.join(", "));
    }
    text
}

fn type_of(p: &Value) -> String {
    if let Some(r) = p["$ref"].as_str() {
        return format!("`{}`", r.rsplit('/').next().unwrap_or(r));
    }
    if let Some(any) = p["anyOf"].as_array() {
        return any
            .iter()
            .map(type_of)
            .filter(|t| t != "null")
            .collect::<Vec<_>>()
            .join(" or ");
    }
    let types: Vec<&str> = match &p["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let types: Vec<String> = types
        .into_iter()
        .filter(|t| *t != "null")
        .map(|t| match t {
            "array" => format!("list of {}", type_of(&p["items"])),
            other => other.to_string(),
        })
        .collect();
    if types.is_empty() {
        "null".into()
    } else {
        types.join(" or ")
    }
}
