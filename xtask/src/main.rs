//! tpbpf's tasks: `cargo xtask test | lint | demo`.
//!
//! `bash xtask/dev.sh TASK` installs what is missing first (xtask/setup.sh)
//! and then runs the task; that is what the README and CI use.
use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod book;
mod demo;
mod dist;
mod image;
mod layering;
mod manifests;
mod vm;

#[derive(Parser)]
#[command(name = "xtask", about = "tpbpf's build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Format check, clippy (userspace, then the eBPF crate on its own
    /// target), unit tests, then the privileged tests (root).
    Test,
    /// Format check, clippy, and the workspace's shape (no `ip` command,
    /// crate boundaries, file sizes).
    Lint,
    /// Only the shape checks of `lint`: which crate may depend on which,
    /// and no product source file over 800 lines. No build needed.
    Layering,
    /// The main job: `tpbpf doctor`, then a real redirected connection.
    Demo,
    /// The docs as a book (mdBook) in target/book, with the reference pages
    /// generated from tpbpf itself.
    Book,
    /// Benchmarks (release build): the cost tpbpf's hooks add to connect(),
    /// the tunnel multiplexer against plain TCP, yamux and h2, and the lab
    /// end to end against the direct route, socat and sshuttle.
    Bench {
        /// Only this one: hooks, mux or e2e (default: all).
        which: Option<String>,
    },
    /// Render the Helm chart (deploy/helm/tpbpf) from what `tpbpf install`
    /// applies.
    Chart,
    /// The privileged suite on one of Debian's kernels, booted under qemu
    /// (TCG here; TPBPF_VM_ACCEL=kvm where the host can), printing pass,
    /// fail or skip per test; --record writes docs/kernels.md.
    VmTest(vm::Args),
    /// The release artifacts in target/dist: the .deb (tpbpf, the tpbpfd
    /// unit, group tpbpf made at install), its -dbgsym, the agent image.
    Dist(dist::Args),
    /// A short run of each fuzz target (cargo fuzz): the wire protocol's
    /// decoder, then the intercept's HTTP filter.
    Fuzz {
        /// How long to fuzz each target, in seconds.
        #[arg(long, default_value_t = 30)]
        seconds: u32,
    },
    /// The agent's container image (deploy/Containerfile) as an OCI archive,
    /// built with buildah and checked by running it (root).
    Image {
        /// Build the agent in release mode (to publish); the default debug
        /// build is the one the tests already made.
        #[arg(long)]
        release: bool,
        /// The archive (default: target/image/tpbpf-agent.oci.tar).
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Test => test(),
        Task::Lint => lint(),
        Task::Layering => layering::check_workspace(),
        Task::Demo => demo::run(),
        Task::Book => book::build(),
        Task::Bench { which } => bench(which.as_deref()),
        Task::Fuzz { seconds } => fuzz(seconds),
        Task::Image { release, out } => image::build_and_check(release, out),
        Task::VmTest(args) => vm::vm_test(args),
        Task::Dist(args) => dist::dist(&args).map(|_| ()),
        Task::Chart => {
            run(cargo().args(["run", "-q", "-p", "tpbpf-deploy", "--bin", "render-chart"]))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn step(what: &str) {
    println!("\n\x1b[1m==> {what}\x1b[0m");
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root_dir());
    cmd
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

pub fn is_root() -> bool {
    // /proc/self/status: "Uid: real effective saved fs"
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn lint() -> Result<()> {
    step("rustfmt --check (workspace, then the eBPF crate)");
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo()
        .args(["fmt", "--check"])
        .current_dir(root_dir().join("bpf/ebpf")))?;

    step("clippy -D warnings (userspace)");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    step("clippy -D warnings (eBPF crate, bpfel-unknown-none)");
    run(&mut ebpf_clippy()?)?;

    step("no product crate runs `ip` (routes, rules and links go over rtnetlink)");
    no_ip_command()?;

    layering::check_workspace()
}

/// The product crates (all but the lab, which builds its namespaces with
/// iproute2 like a CNI's scripts would) never name the `ip` command.
fn no_ip_command() -> Result<()> {
    let mut found = Vec::new();
    let mut dirs: Vec<PathBuf> = vec![root_dir().join("agent/src")];
    for e in std::fs::read_dir(root_dir().join("userspace"))?.flatten() {
        let name = e.file_name();
        if name != "lab" && name != "lab-api" {
            dirs.push(e.path().join("src"));
        }
    }
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&path)?;
                for (i, line) in text.lines().enumerate() {
                    if line.contains("\"ip\"") {
                        found.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
                    }
                }
            }
        }
    }
    if !found.is_empty() {
        bail!(
            "product code names the `ip` command (use tpbpf_sys::netlink):\n  {}",
            found.join("\n  ")
        );
    }
    println!("none");
    Ok(())
}

/// Clippy for the kernel crate needs the same compiler that builds it:
/// Debian's rustc-web clippy, or rustup nightly's.
fn ebpf_clippy() -> Result<Command> {
    let dir = root_dir().join("bpf/ebpf");
    let target_dir = root_dir().join("target/ebpf");
    let debian = Path::new("/usr/bin/cargo-clippy");
    let mut cmd = if debian.exists() && Path::new("/usr/lib/rustlib/src/rust/library").exists() {
        let mut c = Command::new(debian);
        c.arg("clippy")
            .env("RUSTC", "/usr/bin/rustc")
            .env("CARGO", "/usr/bin/cargo")
            .env(
                "PATH",
                format!("/usr/bin:{}", env::var("PATH").unwrap_or_default()),
            );
        c
    } else {
        let mut c = Command::new("cargo");
        c.args(["+nightly", "clippy"]);
        c
    };
    cmd.current_dir(&dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
            "--target-dir",
        ])
        .arg(target_dir)
        .args(["--", "-D", "warnings"]);
    Ok(cmd)
}

fn bench(which: Option<&str>) -> Result<()> {
    if !is_root() {
        bail!("the benchmarks load eBPF programs and create network namespaces: run them as root (sudo bash xtask/dev.sh bench)");
    }
    let all = which.is_none();
    if let Some(w) = which {
        if !["hooks", "mux", "e2e"].contains(&w) {
            bail!("no benchmark `{w}`: hooks, mux or e2e");
        }
    }
    step("build (release)");
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "tpbpf",
        "-p",
        "tpbpf-agent",
        "-p",
        "tpbpf-vm-tests",
        "-p",
        "tpbpf-mux-bench",
    ]))?;
    let dir = root_dir().join("target/release");
    if all || which == Some("hooks") {
        step("connect() + close(): tpbpf's hooks against the same loop without tpbpf");
        run(Command::new(dir.join("tpbpf-bench")).env("TPBPF_BIN", dir.join("tpbpf")))?;
    }
    if all || which == Some("mux") {
        step("the tunnel's multiplexer against plain TCP, yamux and h2 (loopback)");
        run(&mut Command::new(dir.join("tpbpf-tunnel-bench")))?;
    }
    if all || which == Some("e2e") {
        step("end to end in the lab: direct route, tpbpf (direct, port-forward), socat, sshuttle");
        run(Command::new(dir.join("tpbpf-e2e-bench")).env("TPBPF_BIN", dir.join("tpbpf")))?;
    }
    Ok(())
}

fn fuzz(seconds: u32) -> Result<()> {
    let has_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_fuzz {
        step("install cargo-fuzz (cargo install cargo-fuzz --locked)");
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    // libFuzzer needs nightly flags: a nightly toolchain where there is one,
    // else the installed toolchain with RUSTC_BOOTSTRAP.
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    for (dir, target, what) in [
        ("userspace/proto", "decode", "the tunnel protocol's decoder"),
        (
            "userspace/http-filter",
            "filter",
            "the intercept's HTTP filter",
        ),
    ] {
        step(&format!(
            "fuzz {what} for {seconds} s ({dir}/fuzz, target {target})"
        ));
        let mut cmd = Command::new("cargo");
        if nightly {
            cmd.arg("+nightly");
        } else {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
        run(cmd
            .current_dir(root_dir().join(dir))
            .args(["fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={seconds}")))?;
    }
    Ok(())
}

fn test() -> Result<()> {
    lint()?;

    step("build (workspace, with the embedded kernel programs)");
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;

    step("unit tests");
    run(cargo().args(["test", "--workspace", "--exclude", "tpbpf-vm-tests"]))?;

    book::build()?;

    step("privileged tests (vm-tests: real programs in this kernel, cgroups, network namespaces)");
    if !is_root() {
        println!("not root: the privileged tests will print SKIP; run `sudo bash xtask/dev.sh test` to run them");
    }
    run(cargo().args(["test", "-p", "tpbpf-vm-tests"]))?;

    step("privileged tests on Debian's 6.1 under qemu (the CI subset: datapath, run, up, an intercept; the .deb)");
    if is_root() {
        step("the .deb of this build (cargo xtask dist --debug), to install in the guest");
        let made = dist::dist(&dist::Args {
            debug: true,
            no_image: true,
        })?;
        let mut args = vm::Args::ci_subset("6.1");
        args.deb = Some(made.deb);
        vm::vm_test(args)?;
    } else {
        println!(
            "SKIP vm-test: the guest runs the suite as root; run `sudo bash xtask/dev.sh test`"
        );
    }

    step("manifest security linter (checkov on `tpbpf install`'s manifests, skips in deploy/checkov.yaml)");
    manifests::lint()?;

    step("agent image (deploy/Containerfile): build the OCI archive, run it");
    if is_root() {
        image::build_and_check(false, None)?;
    } else {
        println!(
            "SKIP agent image: buildah and runc need root here; run `sudo bash xtask/dev.sh test`"
        );
    }
    Ok(())
}
