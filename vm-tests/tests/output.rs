//! Every command that reports something says the same in `-o yaml` as in
//! `-o json`: the YAML parses, and as a value it is the JSON. Through the
//! lab, for the commands that need a cluster (up, status, list, intercept,
//! leave, down) and without, for those that do not (doctor, version).
use std::{process::Command, time::Duration};

use serde_json::Value;
use tpbpf_vm_tests::*;

/// `tpbpf ARGS -o FORMAT`, its stdout parsed as that format (YAML: as the
/// JSON value it spells). Any exit status: `status` of a bridge that is
/// down exits 3 and still reports.
fn report(args: &[&str], format: &str) -> Value {
    try_report(args, format).unwrap_or_else(|e| panic!("{e}"))
}

fn try_report(args: &[&str], format: &str) -> Result<Value, String> {
    let out = Command::new(tpbpf_bin())
        .args(args)
        .args(["-o", format])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let parsed = match format {
        "json" => serde_json::from_str::<Value>(&text).map_err(|e| e.to_string()),
        _ => serde_saphyr::from_str::<Value>(&text).map_err(|e| e.to_string()),
    };
    parsed.map_err(|e| {
        format!(
            "tpbpf {args:?} -o {format} is not {format} ({e}):\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn same(args: &[&str]) -> Value {
    let (json, yaml) = (report(args, "json"), report(args, "yaml"));
    assert_eq!(yaml, json, "tpbpf {args:?}: -o yaml and -o json differ");
    json
}

#[test]
fn yaml_says_what_json_says_for_every_reporting_command() {
    if !require_root() {
        return;
    }
    // Without a cluster.
    // The doctor's cgroup check names its own pid: the rest is the same.
    let checks = |v: &Value| -> Vec<(Value, Value)> {
        v["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| (c["name"].clone(), c["status"].clone()))
            .collect()
    };
    let (json, yaml) = (report(&["doctor"], "json"), report(&["doctor"], "yaml"));
    assert!(!checks(&json).is_empty(), "{json}");
    assert_eq!(checks(&yaml), checks(&json));
    assert_eq!(yaml["ok"], json["ok"]);
    let version = same(&["version", "--client"]);
    assert_eq!(version["protocol"]["version"], 3, "{version}");
    let nothing = Instance(unique_name("oy"));
    let down = same(&["status", "--instance", &nothing.0]);
    assert_eq!(down["up"], false, "{down}");
    same(&["down", "--instance", &nothing.0]);

    let Some(lab) = LabGuard::up("oy") else {
        return;
    };
    same(&["lab", "--name", &lab.name, "status"]);
    let cg = TestCgroup::new();
    let instance = Instance(unique_name("oy"));
    let up_args = lab.up_args(&instance.0, cg.path());
    let mut up = report(
        &up_args.iter().map(String::as_str).collect::<Vec<_>>(),
        "yaml",
    );
    // Beside the state: the steps `up` took, each with its time.
    let steps = up.as_object_mut().and_then(|o| o.remove("steps"));
    let names: Vec<&str> = steps
        .as_ref()
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|s| s["seconds"].is_number())
        .filter_map(|s| s["step"].as_str())
        .collect();
    assert!(
        names.contains(&"opening the tunnel")
            && names.contains(&"attaching the eBPF programs (tpbpfd)"),
        "{steps:?}"
    );
    // What `up` reports is the bridge's recorded state.
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new("/run/tpbpf")
                .join(&instance.0)
                .join("state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(up, state);
    let agent = same(&[
        "--netns",
        &lab.dev_netns(),
        "version",
        "--kubeconfig",
        &lab.kubeconfig(),
    ]);
    assert!(agent["agent"]["version"].is_string(), "{agent}");
    same(&["list", "--instance", &instance.0]);

    let intercept = [
        "intercept",
        "web",
        "--port",
        "80:18080",
        "--instance",
        &instance.0,
    ];
    let leave = ["leave", "web-80", "--instance", &instance.0];
    let first = report(&intercept, "yaml");
    assert_eq!(report(&leave, "yaml")["removed"], true);
    // The agent may still be removing the first intercept's program.
    let mut second = Value::Null;
    assert!(
        wait_for_every(Duration::from_secs(10), Duration::from_millis(200), || {
            second = try_report(&intercept, "json").unwrap_or(Value::Null);
            second["pods"].is_array()
        }),
        "the second intercept: {second}"
    );
    assert_eq!(first, second);
    assert_eq!(report(&leave, "json")["removed"], true);
    let stopped = report(&["down", "--instance", &instance.0], "yaml");
    assert_eq!(stopped["stopped"], true, "{stopped}");
}

/// `tpbpf completion bash|zsh|fish` and the manual pages (what the package
/// ships): bash's script parses (`bash -n`) and completes subcommands, and
/// every visible command has its page.
#[test]
fn completions_for_three_shells_and_a_manual_page_per_command() {
    let gen = |shell: &str| {
        let out = Command::new(tpbpf_bin())
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "completion {shell}");
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = gen("bash");
    for (shell, mark) in [("zsh", "#compdef tpbpf"), ("fish", "complete -c tpbpf")] {
        assert!(gen(shell).contains(mark), "{shell}'s script");
    }
    let dir = TempDir::new("tpbpf-man");
    let script = dir.0.join("tpbpf.bash");
    std::fs::write(&script, &bash).unwrap();
    let check = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    // Completing `tpbpf inter<TAB>` offers `intercept`.
    let complete = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {}; COMP_WORDS=(tpbpf inter); COMP_CWORD=1; _tpbpf tpbpf inter tpbpf; echo \"${{COMPREPLY[@]}}\"",
            script.display()
        ))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&complete.stdout).contains("intercept"),
        "{}{}",
        String::from_utf8_lossy(&complete.stdout),
        String::from_utf8_lossy(&complete.stderr)
    );
    let man = dir.0.join("man1");
    let out = Command::new(tpbpf_bin())
        .arg("__man")
        .arg(&man)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "tpbpf",
        "tpbpf-up",
        "tpbpf-intercept",
        "tpbpf-lab-up",
        "tpbpf-version",
    ] {
        let text = std::fs::read_to_string(man.join(format!("{page}.1")))
            .unwrap_or_else(|e| panic!("{page}.1: {e}"));
        assert!(text.contains(".TH"), "{page}.1 is not a manual page");
    }
}

/// `up` says each step: one plain line per step in a log, a spinner with
/// the step on a terminal, and the time each took at the end.
#[test]
fn up_shows_its_steps_in_a_log_and_on_a_terminal() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("op") else {
        return;
    };
    let cg = TestCgroup::new();
    let up_args = |instance: &str| lab.up_args(instance, cg.path());

    // A log: stderr is a pipe.
    let instance = Instance(unique_name("op"));
    let out = Command::new(tpbpf_bin())
        .args(up_args(&instance.0))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for line in [
        "tpbpf up: reading the settings",
        "tpbpf up: reading the kubeconfig",
        "tpbpf up: discovering the cluster's ranges and DNS",
        "tpbpf up: opening the tunnel",
        "tpbpf up: attaching the eBPF programs (tpbpfd)",
    ] {
        assert!(err.lines().any(|l| l == line), "no `{line}` in:\n{err}");
    }
    let done = err
        .lines()
        .find(|l| l.starts_with("tpbpf up: done in "))
        .unwrap_or_else(|| panic!("no summary in:\n{err}"));
    assert!(
        done.contains("opening the tunnel ") && done.contains(" s"),
        "{done}"
    );
    assert!(
        !err.contains('\r') && !err.contains('\u{1b}'),
        "terminal codes in a log:\n{err:?}"
    );
    drop(instance);

    // A terminal (script(1) gives one): the spinner redraws the step in
    // place, and the summary stays.
    let instance = Instance(unique_name("op"));
    let mut line = format!("{}", tpbpf_bin().display());
    for a in up_args(&instance.0) {
        line.push(' ');
        line.push_str(&a);
    }
    let out = Command::new("script")
        .args(["-qefc", &line, "/dev/null"])
        .output()
        .unwrap();
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(tty.contains("up: opening the tunnel"), "{tty:?}");
    assert!(
        tty.contains('\r') || tty.contains("\u{1b}["),
        "no redraw: {tty:?}"
    );
    assert!(tty.contains("tpbpf up: done in "), "{tty:?}");
    assert!(tty.contains("tpbpf is up"), "{tty:?}");
}
