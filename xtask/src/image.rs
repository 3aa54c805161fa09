//! `cargo xtask image`: the agent's container image (deploy/Containerfile)
//! as an OCI archive, built with Debian's buildah, then checked: the
//! archive is read back into a fresh container and its entrypoint runs
//! `--version` under runc, a real OCI runtime (crun 1.8 refuses this
//! machine kind's hybrid cgroup layout; runc runs on it and on cgroup v2).
//!
//! buildah keeps everything in a private store under the target directory
//! (the vfs driver: no mounts, any filesystem), removed afterwards. Its one
//! file outside that store, the blob-info cache that push and pull write to
//! /var/lib/containers/cache whatever `--root` says, is removed too when
//! this run created it, so nothing is left in /var/lib/containers.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{cargo, is_root, root_dir, run, step};

/// The image's name (`localhost/`: built here, pushed to no registry).
const NAME: &str = "localhost/tpbpf-agent";
/// The agent's package and binary.
const AGENT: &str = "tpbpf-agent";

/// Builds the agent (debug, or `release`), the image, the archive at `out`
/// (default `target/image/tpbpf-agent.oci.tar`), and checks the archive.
pub fn build_and_check(release: bool, out: Option<PathBuf>) -> Result<()> {
    let started = Instant::now();
    if !is_root() {
        bail!("building and running the agent image uses buildah with a private store and runc, which need root here: run `cargo xtask image` as root");
    }
    let has_buildah = Command::new("buildah")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_buildah {
        bail!("buildah not found: `sudo bash xtask/setup.sh` installs Debian's buildah and runc");
    }
    let agent = Agent::from_cargo_metadata()?;
    let image_dir = agent.target_dir.join("image");
    let out = match out {
        Some(p) => env::current_dir()?.join(p),
        None => image_dir.join("tpbpf-agent.oci.tar"),
    };
    if out.to_string_lossy().contains(':') {
        bail!(
            "{}: buildah's oci-archive:PATH:NAME cannot take a path with ':'; choose another --out",
            out.display()
        );
    }

    let profile = if release { "release" } else { "debug" };
    step(&format!("build {AGENT} ({profile})"));
    let mut build = cargo();
    build.args(["build", "-p", AGENT]);
    if release {
        build.arg("--release");
    }
    run(&mut build)?;
    let bin = agent.target_dir.join(profile).join(AGENT);

    step("stage the image's files: the binary (debug info stripped) and the libraries ldd names");
    let context = image_dir.join("context");
    let files = stage(&bin, &context)?;
    let mut unpacked = 0;
    for (path, size) in &files {
        println!("  {path:<45} {:>8.1} MiB", mib(*size));
        unpacked += size;
    }

    let tag = format!("{NAME}:{}", agent.version);
    let store = Store::new(&image_dir)?;
    step(&format!(
        "build {tag} (deploy/Containerfile, buildah, vfs store in {})",
        image_dir.display()
    ));
    let mut bud = store.buildah();
    bud.args(["bud", "-f"])
        .arg(root_dir().join("deploy/Containerfile"))
        .args(["-t", &tag])
        .args(["--build-arg", &format!("VERSION={}", agent.version)])
        .args(["--build-arg", &format!("LICENSE={}", agent.license)]);
    if !agent.source.is_empty() {
        bud.args([
            "--label",
            &format!("org.opencontainers.image.source={}", agent.source),
        ]);
    }
    run(bud.arg(&context))?;

    step(&format!("write the OCI archive {}", out.display()));
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match fs::remove_file(&out) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing the old {}", out.display()))
        }
        _ => {}
    }
    run(store
        .buildah()
        .args(["push", "--quiet", &tag])
        .arg(format!("oci-archive:{}:{tag}", out.display())))?;
    // The check reads the archive, not the image still in the store.
    run(store
        .buildah()
        .args(["rmi", "--force", &tag])
        .stdout(quiet()))?;

    step("check the archive: its entrypoint with --version, under runc");
    let ctr = output(
        store
            .buildah()
            .args(["from", "--quiet", "--name", "tpbpf-agent-check"])
            .arg(format!("oci-archive:{}", out.display())),
    )?;
    let ctr = ctr.trim();
    let config = output(
        store
            .buildah()
            .args(["inspect", "--type", "container", ctr]),
    )?;
    let config: Value = serde_json::from_str(&config).context("reading `buildah inspect`")?;
    let entrypoint: Vec<String> = config["OCIv1"]["config"]["Entrypoint"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if entrypoint != ["/tpbpf-agent"] {
        bail!("the image's entrypoint is {entrypoint:?}, not [\"/tpbpf-agent\"]: see deploy/Containerfile");
    }
    let label = &config["OCIv1"]["config"]["Labels"]["org.opencontainers.image.version"];
    if label != agent.version.as_str() {
        bail!(
            "the image's version label is {label}, not {}",
            agent.version
        );
    }
    let mut check = store.buildah();
    check
        .args(["run", "--runtime", "runc", "--network", "none", ctr, "--"])
        .args(&entrypoint)
        .arg("--version");
    println!("$ buildah run --runtime runc --network none {ctr} -- /tpbpf-agent --version");
    let got = output(&mut check)?;
    print!("{got}");
    let want = format!("{AGENT} {}", agent.version);
    if got.trim() != want {
        bail!(
            "the image's agent says {:?}, not {want:?}: the archive holds another build",
            got.trim()
        );
    }
    drop(store);

    let size = fs::metadata(&out)
        .with_context(|| format!("reading {}", out.display()))?
        .len();
    println!(
        "{}: {tag}, {:.1} MiB (compressed; {:.1} MiB of files unpacked, {} files), built and checked in {:.0} s",
        out.display(),
        mib(size),
        mib(unpacked),
        files.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the image needs to know about the agent's package.
struct Agent {
    version: String,
    license: String,
    source: String,
    /// Cargo's target directory (`CARGO_TARGET_DIR` or `target/`).
    target_dir: PathBuf,
}

impl Agent {
    fn from_cargo_metadata() -> Result<Agent> {
        let json = output(cargo().args(["metadata", "--no-deps", "--format-version", "1"]))?;
        let meta: Value = serde_json::from_str(&json).context("reading `cargo metadata`")?;
        let Some(pkg) = meta["packages"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == AGENT))
        else {
            bail!("`cargo metadata` lists no {AGENT} package");
        };
        let field = |k: &str| pkg[k].as_str().unwrap_or_default().to_string();
        Ok(Agent {
            version: field("version"),
            license: field("license"),
            source: field("repository"),
            target_dir: meta["target_directory"]
                .as_str()
                .map(PathBuf::from)
                .unwrap_or_else(|| root_dir().join("target")),
        })
    }
}

/// Fills `context` (emptied first) with what deploy/Containerfile copies:
/// `tpbpf-agent` and `rootfs/` holding each library at the path ldd printed.
/// Returns each file's path in the image and its size.
fn stage(bin: &Path, context: &Path) -> Result<Vec<(String, u64)>> {
    if context.exists() {
        fs::remove_dir_all(context).with_context(|| format!("emptying {}", context.display()))?;
    }
    let rootfs = context.join("rootfs");
    fs::create_dir_all(&rootfs).with_context(|| format!("creating {}", rootfs.display()))?;
    let staged = context.join(AGENT);
    fs::copy(bin, &staged).with_context(|| format!("copying {}", bin.display()))?;
    // Symbols stay (function names in backtraces); DWARF goes.
    run(Command::new("strip").arg("--strip-debug").arg(&staged))?;
    let mut files = vec![(format!("/{AGENT}"), fs::metadata(&staged)?.len())];
    for lib in linked_libraries(bin)? {
        let dest = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // fs::copy follows symlinks: the image gets the file itself.
        let size = fs::copy(&lib, &dest).with_context(|| format!("copying {}", lib.display()))?;
        files.push((lib.display().to_string(), size));
    }
    Ok(files)
}

/// The files `bin` loads at run time, as ldd resolves them on this machine:
/// the libraries and the dynamic loader (the vDSO has no file; a static
/// binary has none).
fn linked_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd (Debian's libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    if text.contains("not a dynamic executable") || err.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!("ldd {} failed ({}): {err}", bin.display(), out.status);
    }
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`,
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`, `linux-vdso.so.1 (0x...)`
        if line.contains("not found") {
            bail!(
                "{} needs a library this machine lacks: {line}",
                bin.display()
            );
        }
        let path = line.split_once(" => ").map_or(line, |(_, p)| p);
        let path = path.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    if libs.is_empty() {
        bail!("ldd named no library for {}:\n{text}", bin.display());
    }
    Ok(libs)
}

/// buildah's private store (`--root`, `--runroot`) under `dir`; dropping it
/// removes its containers and images, then the store itself.
struct Store {
    root: PathBuf,
    runroot: PathBuf,
    /// The outermost of /var/lib/containers/cache/blob-info-cache-v1.boltdb
    /// and its directories that did not exist before this run.
    made_cache: Option<PathBuf>,
}

impl Store {
    fn new(dir: &Path) -> Result<Store> {
        let cache = Path::new("/var/lib/containers/cache/blob-info-cache-v1.boltdb");
        let store = Store {
            root: dir.join("store"),
            runroot: dir.join("runroot"),
            made_cache: cache
                .ancestors()
                .take(3)
                .filter(|p| !p.exists())
                .last()
                .map(Path::to_path_buf),
        };
        // What an interrupted run left.
        store.remove_dirs();
        Ok(store)
    }

    fn buildah(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(["--storage-driver", "vfs"]);
        cmd
    }

    fn remove_dirs(&self) {
        for d in [&self.root, &self.runroot] {
            if d.exists() {
                if let Err(e) = fs::remove_dir_all(d) {
                    eprintln!("xtask: could not remove {}: {e}", d.display());
                }
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        for args in [&["rm", "--all"][..], &["rmi", "--all", "--force"]] {
            let _ = self
                .buildah()
                .args(args)
                .stdout(quiet())
                .stderr(quiet())
                .status();
        }
        self.remove_dirs();
        if let Some(p) = &self.made_cache {
            let removed = if p.is_dir() {
                fs::remove_dir_all(p)
            } else {
                fs::remove_file(p)
            };
            match removed {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    eprintln!("xtask: could not remove {}: {e}", p.display());
                }
                _ => {}
            }
        }
    }
}

fn quiet() -> std::process::Stdio {
    std::process::Stdio::null()
}

/// Runs `cmd` and returns its standard output (its errors go to ours).
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
