//! `cargo xtask vm-test --kernel VERSION`: the privileged suite on another
//! kernel. One of Debian's kernel packages (bullseye's 5.10, bookworm's
//! 6.1, trixie's 6.12) is fetched from Debian's archive (the archive's
//! signature checked with gpgv and the keyring Debian ships, then each
//! file's SHA-256), unpacked under `target/vm/`, and booted under qemu with
//! a busybox initramfs. The guest shares this machine's `/` read-only over
//! 9p, lays a tmpfs over it, and runs the already built test binaries in a
//! chroot of that: the same binaries, the same servers, another kernel. It
//! has no network device, so nothing it does leaves the guest.
//!
//! Results come back through a second, writable 9p share; each test is
//! reported as pass, fail or skip (with the skip's reason, which names the
//! missing kernel feature), and `--record` writes them into
//! `docs/kernels.json` and the matrix in `docs/kernels.md`.
mod guest;
mod kernel;
mod results;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{cargo, is_root, root_dir, run, step};

use guest::*;
use kernel::*;
use results::*;

/// A subset that runs in CI on 6.1, inside its time box: the datapath,
/// `run`, next to other eBPF, `up`, an intercept through the lab, and the
/// tunnel over kernel TLS. Each entry is a test
/// binary and the test-name filters passed to it (empty: all of it).
const CI_SUBSET: &[(&str, &[&str])] = &[
    ("doctor", &["doctor_as_root_meets_every_requirement"]),
    ("redirect", &[]),
    (
        "bridge",
        &[
            "run_bridges_curl_to_cluster_ipv4_and_ipv6",
            "run_resolves_cluster_names_and_forwards_the_rest",
            "tc_path_bridges_a_container_namespace_and_sigkill_leaves_nothing",
        ],
    ),
    ("coexist", &[]),
    (
        "up",
        &["up_discovers_the_cluster_and_bridges_a_subtree_until_down"],
    ),
    (
        "intercept_up",
        &["intercept_sends_a_deployments_connections_to_the_developer_and_gives_them_back"],
    ),
    // The tunnel's TLS in the kernel (this machine's kernel has none).
    ("mux_resume", &["over_tls", "replaced_for_new_keys"]),
    ("mux_auth", &["tls_with_a_pinned_certificate"]),
];

#[derive(clap::Args)]
pub struct Args {
    /// The kernel: 5.10, 6.1 or 6.12 (Debian's newest package of that line).
    #[arg(long)]
    kernel: String,
    /// Run only the CI subset (the datapath, run, up, an intercept).
    #[arg(long)]
    ci_subset: bool,
    /// Run only these test binaries (vm-tests/tests/NAME.rs), or with
    /// NAME::FILTER the tests of NAME whose names contain FILTER; repeatable.
    #[arg(long = "test", value_name = "NAME")]
    tests: Vec<String>,
    /// Also install this .deb in the guest (`dpkg -i`) and run
    /// `tpbpf doctor` and `tpbpf debug redirect` from it.
    #[arg(long, value_name = "DEB")]
    pub deb: Option<PathBuf>,
    /// Write the results into docs/kernels.json and docs/kernels.md.
    #[arg(long)]
    record: bool,
    /// Run this shell command in the guest instead of the suite (its
    /// output goes to the console), for a look at that kernel.
    #[arg(long, value_name = "CMD")]
    exec: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 4096)]
    memory: u32,
    /// Give up on the guest after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// Each test binary is killed after this many seconds.
    #[arg(long, default_value_t = 600)]
    binary_timeout: u64,
}

impl Args {
    /// The CI subset on kernel `line`, with the default limits.
    pub fn ci_subset(line: &str) -> Self {
        Self {
            kernel: line.into(),
            ci_subset: true,
            tests: Vec::new(),
            deb: None,
            record: false,
            exec: None,
            memory: 4096,
            timeout: 1500,
            binary_timeout: 600,
        }
    }
}

pub fn vm_test(args: Args) -> Result<()> {
    if !is_root() {
        bail!("the guest runs the privileged suite as root in a chroot of this machine's /, which needs root here: run `sudo bash xtask/dev.sh vm-test --kernel {}`", args.kernel);
    }
    for tool in [
        "qemu-system-x86_64",
        "busybox",
        "depmod",
        "gpgv",
        "xz",
        "dpkg-deb",
    ] {
        if !on_path(tool) {
            bail!("{tool} not found: `sudo bash xtask/setup.sh vm-test` installs qemu-system-x86, busybox-static, kmod, gpgv and xz-utils");
        }
    }
    let started = Instant::now();
    let vm_dir = root_dir().join("target/vm");
    fs::create_dir_all(&vm_dir)?;

    step(&format!("Debian's {} kernel", args.kernel));
    let kernel = fetch_kernel(&args.kernel, &vm_dir)?;
    println!(
        "{} ({}), unpacked in {}",
        kernel.package,
        kernel.version,
        kernel.root.display()
    );

    let binaries = if args.exec.is_some() {
        Vec::new()
    } else {
        step("build the privileged suite (vm-tests) and tpbpf");
        build_suite()?
    };
    let selected = if args.exec.is_some() {
        Vec::new()
    } else {
        select(&binaries, &args)?
    };

    step("initramfs (busybox, the modules to reach the shared root)");
    let run_dir = vm_dir.join(format!("run-{}-{}", args.kernel, std::process::id()));
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(run_dir.join("out/logs"))?;
    let _cleanup = RemoveDir(run_dir.clone());
    let initrd = build_initramfs(&kernel, &run_dir)?;
    let selected = snapshot(selected, &run_dir)?;
    write_job(&kernel, &selected, &args, &run_dir)?;

    step(&format!(
        "boot {} under qemu ({}) and run {} test binaries",
        kernel.release,
        accel(),
        selected.len()
    ));
    let boot = Instant::now();
    let console = run_dir.join("console.log");
    boot_guest(&kernel, &initrd, &run_dir, &args, &console)?;
    let guest_secs = boot.elapsed().as_secs_f64();

    let out = run_dir.join("out");
    if args.exec.is_some() {
        print!("{}", fs::read_to_string(&console).unwrap_or_default());
        return Ok(());
    }
    let results = collect(&out, &selected)?;
    print_results(&results);
    let mut failed = results
        .iter()
        .filter(|r| r.outcome == Outcome::Fail)
        .count();
    if let Some(deb) = &args.deb {
        let deb_log = fs::read_to_string(out.join("deb.log")).unwrap_or_default();
        let deb_ok = fs::read_to_string(out.join("deb.status"))
            .map(|s| s.trim() == "0")
            .unwrap_or(false);
        println!(
            "\n{} {}: dpkg -i, tpbpf doctor, tpbpf debug redirect in the guest\n{}",
            if deb_ok { "PASS" } else { "FAIL" },
            deb.display(),
            indent(&deb_log)
        );
        if !deb_ok {
            failed += 1;
        }
    }
    let ran_all = results.iter().any(|r| r.outcome != Outcome::NotRun);
    if !ran_all {
        let tail = tail_lines(&fs::read_to_string(&console).unwrap_or_default(), 40);
        bail!(
            "the guest ran no test (kernel {}); its console ended with:\n{}",
            kernel.release,
            indent(&tail)
        );
    }
    let (pass, fail, skip) = counts(&results);
    println!(
        "\nkernel {}: {pass} passed, {fail} failed, {skip} skipped; guest {guest_secs:.0} s, all {:.0} s",
        kernel.release,
        started.elapsed().as_secs_f64()
    );
    if args.record {
        record(
            &kernel,
            &results,
            guest_secs,
            args.ci_subset || !args.tests.is_empty(),
        )?;
    }
    if failed > 0 {
        let kept = vm_dir.join(format!("last-{}", args.kernel));
        let _ = fs::remove_dir_all(&kept);
        fs::rename(&out, &kept).ok();
        fs::copy(&console, kept.join("console.log")).ok();
        bail!(
            "{failed} failed on kernel {}; the guest's logs are in {}",
            kernel.release,
            kept.display()
        );
    }
    Ok(())
}

/// A test binary of vm-tests: its name (`tests/NAME.rs`) and path.
#[derive(Clone)]
struct TestBinary {
    name: String,
    path: PathBuf,
}

/// Test binaries of other crates that also run in the guest, under the
/// name given here: the tunnel's resume and authentication tests, for the
/// kernel's TLS.
const OTHER_BINARIES: &[(&str, &str, &str)] = &[
    ("tpbpf-mux", "resume", "mux_resume"),
    ("tpbpf-mux", "auth", "mux_auth"),
];

fn build_suite() -> Result<Vec<TestBinary>> {
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    let mut bins = test_binaries(&["-p", "tpbpf-vm-tests"])?;
    for (package, test, name) in OTHER_BINARIES {
        for b in test_binaries(&["-p", package, "--test", test])? {
            bins.push(TestBinary {
                name: name.to_string(),
                ..b
            });
        }
    }
    bins.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(bins)
}

/// The test binaries `cargo test --no-run` builds with `select`.
fn test_binaries(select: &[&str]) -> Result<Vec<TestBinary>> {
    let out = cargo()
        .arg("test")
        .args(select)
        .args(["--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test binaries ({}) failed", select.join(" "));
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let is_test = v["reason"] == "compiler-artifact"
            && v["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
            && v["profile"]["test"] == true;
        if let (true, Some(exe)) = (is_test, v["executable"].as_str()) {
            bins.push(TestBinary {
                name: v["target"]["name"].as_str().unwrap_or("?").to_string(),
                path: exe.into(),
            });
        }
    }
    Ok(bins)
}

/// What runs in the guest: a binary and its test-name filters.
struct Selected {
    bin: TestBinary,
    filters: Vec<String>,
}

/// The binaries a test finds beside its own (`target/debug/NAME`).
const SIBLINGS: &[&str] = &[
    "tpbpf",
    "tpbpf-agent",
    "tpbpf-testclient",
    "tpbpf-testserver",
];

/// Copies the selected test binaries and their siblings into the run's
/// directory, laid out as `debug/deps/` and `debug/`, so that a build that
/// replaces them while the guest runs does not change them under it.
fn snapshot(selected: Vec<Selected>, run_dir: &Path) -> Result<Vec<Selected>> {
    let deps = run_dir.join("snap/debug/deps");
    fs::create_dir_all(&deps)?;
    let mut out = Vec::new();
    let mut from_dir = None;
    for s in selected {
        let dst = deps.join(s.bin.path.file_name().context("a test binary's name")?);
        fs::copy(&s.bin.path, &dst).with_context(|| format!("copying {}", s.bin.path.display()))?;
        from_dir = s
            .bin
            .path
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        out.push(Selected {
            bin: TestBinary { path: dst, ..s.bin },
            filters: s.filters,
        });
    }
    if let Some(dir) = from_dir {
        for name in SIBLINGS {
            let src = dir.join(name);
            if src.exists() {
                fs::copy(&src, run_dir.join("snap/debug").join(name))
                    .with_context(|| format!("copying {}", src.display()))?;
            }
        }
    }
    Ok(out)
}

fn select(bins: &[TestBinary], args: &Args) -> Result<Vec<Selected>> {
    let find = |name: &str| {
        bins.iter()
            .find(|b| b.name == name)
            .cloned()
            .with_context(|| format!("no test binary `{name}` in vm-tests/tests"))
    };
    if args.ci_subset {
        return CI_SUBSET
            .iter()
            .map(|(name, filters)| {
                Ok(Selected {
                    bin: find(name)?,
                    filters: filters.iter().map(|f| f.to_string()).collect(),
                })
            })
            .collect();
    }
    if !args.tests.is_empty() {
        return args
            .tests
            .iter()
            .map(|spec| {
                let (name, filter) = match spec.split_once("::") {
                    Some((n, f)) => (n, vec![f.to_string()]),
                    None => (spec.as_str(), Vec::new()),
                };
                Ok(Selected {
                    bin: find(name)?,
                    filters: filter,
                })
            })
            .collect();
    }
    Ok(bins
        .iter()
        .map(|bin| Selected {
            bin: bin.clone(),
            filters: Vec::new(),
        })
        .collect())
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn on_path(tool: &str) -> bool {
    which(tool).is_some()
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
